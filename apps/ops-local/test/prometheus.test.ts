// ops/prometheus cannot run here (no Docker daemon), so promtool, Prometheus' own checker,
// holds it: the config and its rule file load, every alert fires on the series it guards
// against and stays quiet otherwise (alerts.test.yml), and every metric an alert reads is one
// that Keyway's processes really serve, so a renamed metric cannot silence an alert.
import assert from "node:assert/strict"
import { execFile } from "node:child_process"
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { test } from "node:test"
import { promisify } from "node:util"
import { createKeyedConsumer } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { createRelay } from "@keyway/outbox"
import { createMetricsRegistry } from "@keyway/telemetry"
import { createTestDatabase, findPromtool } from "@keyway/testkit"
import { jetstream } from "@nats-io/jetstream"
import { Redis } from "ioredis"
import { repositoryRoot } from "../src/site-plan.ts"

const run = promisify(execFile)
const dir = join(repositoryRoot(), "ops/prometheus")

test("promtool accepts the Prometheus config and its alert rules", async () => {
  const { stdout } = await run(await findPromtool(), ["check", "config", "prometheus.yml"], {
    cwd: dir,
  })
  const rules = readFileSync(join(dir, "alerts.yml"), "utf8").match(/^ {6}- alert: /gm)?.length
  assert.ok(rules && rules >= 9, `alerts.yml holds ${rules} alerts`)
  assert.match(stdout, new RegExp(`SUCCESS: ${rules} rules found`), "every alert loaded")
})

test("each alert fires on the series it guards against, and not before (promtool test rules)", async () => {
  const { stdout } = await run(await findPromtool(), ["test", "rules", "alerts.test.yml"], {
    cwd: dir,
  })
  assert.match(stdout, /SUCCESS/)
})

test("every metric an alert reads is one that the relay or a consumer group serves", async () => {
  const t = await createTestDatabase({ prefix: "keyway_ops" })
  const nc = await connectNats({
    servers: process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222",
  })
  const redis = new Redis({ lazyConnect: true })
  try {
    // The processes' own registrations, with the prefix the apps give their registry.
    const metrics = createMetricsRegistry({ prefix: "keyway_", defaultMetrics: false })
    createRelay({ connectionString: t.url, jetstream: jetstream(nc), site: "ops", metrics })
    createKeyedConsumer({
      group: "ops",
      stream: "OPS",
      nats: nc,
      db: t.db,
      redis,
      handlers: {},
      metrics,
    })
    const body = (await metrics.render()).body
    const served = new Set(
      [...body.matchAll(/^# TYPE (\S+) (\w+)$/gm)].flatMap(([, name, type]) =>
        type === "histogram" ? [`${name}_bucket`, `${name}_sum`, `${name}_count`] : [name!],
      ),
    )
    const read = new Set(readFileSync(join(dir, "alerts.yml"), "utf8").match(/\bkeyway_\w+/g))
    assert.ok(read.size >= 8, `alerts.yml reads ${read.size} keyway metrics`)
    for (const name of read)
      assert.ok(served.has(name), `alerts.yml reads ${name}, which nothing serves`)
  } finally {
    redis.disconnect()
    await nc.close()
    await t.drop()
  }
})
