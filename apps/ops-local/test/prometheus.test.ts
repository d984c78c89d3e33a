// ops/prometheus and ops/grafana cannot run here (no Docker daemon), so promtool, Prometheus'
// own checker, holds them: the config and its rule file load, every alert fires on the series
// it guards against and stays quiet otherwise (alerts.test.yml), every query of the Grafana
// dashboard parses, and every metric an alert or a panel reads is one that Keyway's processes
// really serve, so a renamed metric cannot silence an alert or blank a panel.
import assert from "node:assert/strict"
import { execFile } from "node:child_process"
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
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
const grafana = join(repositoryRoot(), "ops/grafana/provisioning")

type Panel = {
  type: string
  title: string
  datasource?: { uid: string }
  targets?: { expr: string }[]
}
const dashboard = JSON.parse(readFileSync(join(grafana, "dashboards/keyway.json"), "utf8")) as {
  panels: Panel[]
}
const panels = dashboard.panels.filter((p) => p.type !== "row")
// Grafana fills in $__rate_interval; promtool needs a duration there.
const queries = panels.flatMap((p) =>
  (p.targets ?? []).map((t) => t.expr.replaceAll("$__rate_interval", "1m")),
)

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

test("every query of the Grafana dashboard parses, against the site's Prometheus", async () => {
  assert.ok(panels.length >= 15, `${panels.length} panels`)
  const datasources = readFileSync(join(grafana, "datasources/datasources.yml"), "utf8")
  for (const p of panels) {
    assert.ok(p.targets && p.targets.length > 0, `${p.title} queries nothing`)
    assert.equal(p.datasource?.uid, "prometheus", p.title)
  }
  assert.match(datasources, /- name: Prometheus\n\s+uid: prometheus\n/)
  // Each query as a recording rule: promtool parses every expression of a rule file.
  const scratch = mkdtempSync(join(tmpdir(), "keyway-dashboard-"))
  try {
    const rules = {
      groups: [
        {
          name: "dashboard",
          rules: queries.map((expr, n) => ({ record: `dashboard:q${n}`, expr })),
        },
      ],
    }
    writeFileSync(join(scratch, "rules.yml"), JSON.stringify(rules))
    const { stdout } = await run(await findPromtool(), ["check", "rules", "rules.yml"], {
      cwd: scratch,
    })
    assert.match(stdout, new RegExp(`SUCCESS: ${queries.length} rules found`))
  } finally {
    rmSync(scratch, { recursive: true, force: true })
  }
})

test("every metric an alert or a dashboard panel reads is one that the relay or a consumer group serves", async () => {
  const t = await createTestDatabase({ prefix: "keyway_ops" })
  const nc = await connectNats({
    servers: process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222",
  })
  const redis = new Redis({ lazyConnect: true })
  try {
    // The processes' own registrations, with the prefix the apps give their registry.
    const metrics = createMetricsRegistry({ prefix: "keyway_", defaultMetrics: false })
    createRelay({
      connectionString: t.url,
      jetstream: jetstream(nc),
      connection: nc,
      site: "ops",
      metrics,
    })
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
    const shown = new Set(queries.join("\n").match(/\bkeyway_\w+/g))
    assert.ok(shown.size >= 20, `the dashboard reads ${shown.size} keyway metrics`)
    for (const name of shown)
      assert.ok(served.has(name), `the dashboard reads ${name}, which nothing serves`)
  } finally {
    redis.disconnect()
    await nc.close()
    await t.drop()
  }
})
