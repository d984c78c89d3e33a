// Store and forward (issue 4, must-show 2): the leaf link runs through a TCP proxy that the
// test cuts. The factory keeps enqueuing and handling its own events meanwhile; after the
// link returns, every one of them reaches the cloud once, in order per key.
import assert from "node:assert/strict"
import { after, before, describe, test } from "node:test"
import { createMetricsRegistry } from "@keyway/telemetry"
import { metricValue, readStream, streamCount, waitFor } from "@keyway/testkit"
import { Redis } from "ioredis"
import {
  assertEffects,
  assertNoSecrets,
  effectCount,
  SHARED_REDIS,
  type SiteApp,
  type Sites,
  startConsumer,
  startSiteApp,
  startSites,
} from "./support.ts"

const EVENTS = 10_000

describe("store and forward across a leaf-link outage", () => {
  let sites: Sites
  let factory: SiteApp
  let cloudDb: SiteApp
  let redis: Redis
  const log: string[] = []
  const cleanups: (() => Promise<unknown>)[] = []

  before(async () => {
    sites = await startSites({ proxy: true })
    redis = new Redis(SHARED_REDIS)
    factory = await startSiteApp(sites, "factory", log)
    // The cloud's database holds the cloud consumer's inbox and effects.
    cloudDb = await startSiteApp(sites, "cloud", log)
  })
  after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => {})
    await factory?.close()
    await cloudDb?.close()
    redis?.disconnect()
    if (sites) assertNoSecrets(`${await sites.logs()}\n${log.join("\n")}`, sites.passwords)
    await sites?.close()
  })

  test(`${EVENTS} factory events enqueued while the link is cut all reach the cloud after restore`, async () => {
    const metrics = createMetricsRegistry({ defaultMetrics: false })
    const sourceIdle = async () =>
      metricValue((await metrics.render()).body, "stream_source_idle_seconds")!
    const inCloud = await startConsumer(
      sites,
      "cloud",
      "FACTORY_IN",
      cloudDb.db,
      redis,
      log,
      metrics,
    )
    cleanups.push(() => inCloud.close())
    const atFactory = await startConsumer(sites, "factory", "FACTORY", factory.db, redis, log)
    cleanups.push(() => atFactory.close())
    const admin = await sites.connect("cloud", "cloud-admin")
    cleanups.push(() => admin.close())

    // The link works before the cut: a first event crosses.
    await factory.write(1, { keys: 1 })
    await waitFor(async () => (await effectCount(cloudDb.db.db, inCloud.group)) === 1, {
      timeoutMs: 20_000,
      message: "the first event crossed",
    })

    // The leaf link's state on the cloud worker's /metrics: heard from within a second or two
    // while up, silent and counting once cut.
    await waitFor(async () => (await sourceIdle()) < 3, {
      timeoutMs: 10_000,
      message: "the source was heard from while the link is up",
    })
    sites.proxy!.cut()
    const cutAt = performance.now()
    await factory.write(EVENTS, { keys: 200, perTx: 50 })
    const expected = await factory.ids()
    assert.equal(expected.size, EVENTS + 1)
    // The factory works alone: its own consumer handles every event, the cloud sees none.
    await waitFor(
      async () => (await effectCount(factory.db.db, atFactory.group)) === expected.size,
      {
        timeoutMs: 120_000,
        message: "the factory handled its own events during the outage",
      },
    )
    assert.equal(await streamCount(admin, "FACTORY_IN"), 1, "nothing crossed during the outage")
    assert.equal(await effectCount(cloudDb.db.db, inCloud.group), 1)

    await waitFor(async () => (await sourceIdle()) > 5, {
      timeoutMs: 20_000,
      message: "the source's idle time grew while the link was cut",
    })
    const idleWhileCut = await sourceIdle()
    assert.ok(
      idleWhileCut <= (performance.now() - cutAt) / 1000 + 3,
      `idle ${idleWhileCut} s began around the cut`,
    )

    const restoredAt = performance.now()
    sites.proxy!.restore()
    await waitFor(async () => (await streamCount(admin, "FACTORY_IN")) >= expected.size, {
      timeoutMs: 120_000,
      message: "the backlog reached FACTORY_IN",
    })
    const seconds = (performance.now() - restoredAt) / 1000
    console.log(
      `catch-up: ${EVENTS} events in FACTORY_IN ${seconds.toFixed(2)} s after restore ` +
        `(${Math.round(EVENTS / seconds)} events/s, leaf reconnect included)`,
    )
    const copied = await readStream(admin, "FACTORY_IN")
    const copiedIds = copied.map((e) => e.id)
    assert.equal(new Set(copiedIds).size, copiedIds.length, "no event twice in FACTORY_IN")
    assert.deepEqual(new Set(copiedIds), expected, "FACTORY_IN holds exactly the factory's events")

    await waitFor(async () => (await effectCount(cloudDb.db.db, inCloud.group)) >= expected.size, {
      timeoutMs: 120_000,
      message: "the cloud consumer handled the backlog",
    })
    await assertEffects(cloudDb.db.db, inCloud.group, expected)
    await waitFor(async () => (await sourceIdle()) < 3, {
      timeoutMs: 10_000,
      message: "the source is heard from again after the restore",
    })
    assert.equal(
      metricValue((await metrics.render()).body, "stream_source_lag_messages"),
      0,
      "nothing left to copy",
    )
    await assertEffects(factory.db.db, atFactory.group, expected)
  })
})
