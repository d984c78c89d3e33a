// Events cross between the sites through the repo's own configs and stream definitions
// (issue 4, must-shows 1 and 3): the cloud hub from nats/hub.conf, the factory leaf from
// nats/leaf.conf, each site's relay and workers connected as their own users. Each side
// checks only what the other side's keyed consumer wrote.
import { after, before, describe, test } from "node:test"
import { waitFor } from "@keyway/testkit"
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

describe("factory and cloud through the leaf link", () => {
  let sites: Sites
  let factory: SiteApp
  let cloud: SiteApp
  let redis: Redis
  const log: string[] = []
  const cleanups: (() => Promise<unknown>)[] = []

  before(async () => {
    sites = await startSites()
    redis = new Redis(SHARED_REDIS)
    factory = await startSiteApp(sites, "factory", log)
    cloud = await startSiteApp(sites, "cloud", log)
  })
  after(async () => {
    for (const c of cleanups.reverse()) await c().catch(() => {})
    await factory?.close()
    await cloud?.close()
    redis?.disconnect()
    // Server logs and everything the relays and consumers logged, restarts included.
    if (sites) assertNoSecrets(`${await sites.logs()}\n${log.join("\n")}`, sites.passwords)
    await sites?.close()
  })

  test("factory events are handled by a cloud consumer on FACTORY_IN, cloud commands by a factory consumer on CLOUD_IN, in order per key", async () => {
    // Both directions at once, consumers started before the writes so the groups see them arrive.
    const inCloud = await startConsumer(sites, "cloud", "FACTORY_IN", cloud.db, redis, log)
    cleanups.push(() => inCloud.close())
    const inFactory = await startConsumer(sites, "factory", "CLOUD_IN", factory.db, redis, log)
    cleanups.push(() => inFactory.close())
    await Promise.all([
      factory.write(300, { keys: 12, perTx: 7, keyPrefix: "a" }),
      cloud.write(300, { keys: 12, perTx: 7, keyPrefix: "a" }),
    ])
    await waitFor(
      async () =>
        (await effectCount(cloud.db.db, inCloud.group)) >= 300 &&
        (await effectCount(factory.db.db, inFactory.group)) >= 300,
      { timeoutMs: 60_000, message: "both sites handled the other's 300 events" },
    )
    await assertEffects(cloud.db.db, inCloud.group, await factory.ids())
    await assertEffects(factory.db.db, inFactory.group, await cloud.ids())
    await inCloud.close()
    await inFactory.close()
    cleanups.length = 0
  })

  test("a hub crash and a leaf crash in the middle of a flow in both directions: nothing lost, nothing twice", async () => {
    const inCloud = await startConsumer(sites, "cloud", "FACTORY_IN", cloud.db, redis, log)
    cleanups.push(() => inCloud.close())
    const inFactory = await startConsumer(sites, "factory", "CLOUD_IN", factory.db, redis, log)
    cleanups.push(() => inFactory.close())
    // Writers keep enqueuing at both sites for the whole test; their outboxes hold the
    // events while a site's NATS is down.
    let writing = true
    const writer = (app: SiteApp) =>
      (async () => {
        while (writing) {
          await app.write(5, { keys: 20, perTx: 5, keyPrefix: "b" })
          await new Promise((r) => setTimeout(r, 10))
        }
      })()
    const writers = [writer(factory), writer(cloud)]
    const pause = (ms: number) => new Promise((r) => setTimeout(r, ms))
    await pause(1500)
    await sites.hub.kill()
    await pause(1500)
    await sites.hub.start()
    await pause(2000)
    await sites.leaf.kill()
    await pause(1500)
    await sites.leaf.start()
    await pause(2000)
    writing = false
    await Promise.all(writers)
    // The first test's events are in the same databases; these groups start from the
    // beginning of the streams, so they handle those too.
    const factoryIds = await factory.ids()
    const cloudIds = await cloud.ids()
    await waitFor(
      async () =>
        (await effectCount(cloud.db.db, inCloud.group)) >= factoryIds.size &&
        (await effectCount(factory.db.db, inFactory.group)) >= cloudIds.size,
      {
        timeoutMs: 90_000,
        message: `the cloud handled ${factoryIds.size} factory events and the factory ${cloudIds.size} cloud events`,
      },
    )
    await assertEffects(cloud.db.db, inCloud.group, factoryIds)
    await assertEffects(factory.db.db, inFactory.group, cloudIds)
  })
})
