// `just up`'s plan without starting anything: ports clear of the machine's shared servers,
// and each process given exactly the secrets its role needs.
import assert from "node:assert/strict"
import { test } from "node:test"
import {
  type LaunchContext,
  NATS_USERS,
  passwordVariable,
  repositoryRoot,
  SITE_NAMES,
  SITES,
  siteProcesses,
} from "../src/site-plan.ts"

const passwords = Object.fromEntries(NATS_USERS.map((u) => [u, `k${u.replaceAll("-", "")}0secret`]))
const ctx: LaunchContext = {
  root: repositoryRoot(),
  runDir: "/tmp/keyway-plan-test",
  postgresUrl: "postgres://postgres@127.0.0.1:5432/postgres",
  passwords,
  nodeBinary: "node",
  natsServerBinary: "nats-server",
  redisServerBinary: "redis-server",
  demoRate: 10,
}

test("ports are distinct and clear of the shared Postgres, Redis and NATS", () => {
  const ports = SITE_NAMES.flatMap((s) => {
    const p = SITES[s]
    return [p.natsPort, p.natsHttpPort, p.redisPort, ...(p.leafPort ? [p.leafPort] : [])]
  })
  assert.equal(new Set(ports).size, ports.length)
  for (const shared of [4222, 8222, 6222, 7422, 5432, 6379]) assert.ok(!ports.includes(shared))
})

test("each site's NATS gets every variable its config reads, and no other site's secrets", () => {
  const cloudNats = siteProcesses(SITES.cloud, ctx)[0]!
  const factoryNats = siteProcesses(SITES.factory, ctx)[0]!
  assert.equal(cloudNats.name, "cloud-nats")
  assert.equal(cloudNats.env.KEYWAY_LEAF_PORT, "17422")
  assert.equal(cloudNats.env[passwordVariable("factory-relay")], undefined)
  assert.equal(factoryNats.env[passwordVariable("cloud-relay")], undefined)
  // The leaf carries leaf-factory's password only inside its remote URL.
  assert.equal(
    factoryNats.env.KEYWAY_LEAF_REMOTE_URL,
    `nats-leaf://leaf-factory:${passwords["leaf-factory"]}@127.0.0.1:17422`,
  )
})

test("apps get only their own user's password, and the demo writer none", () => {
  for (const site of SITE_NAMES) {
    const byName = new Map(siteProcesses(SITES[site], ctx).map((p) => [p.name, p]))
    const relay = byName.get(`${site}-relay`)!
    const worker = byName.get(`${site}-worker`)!
    assert.equal(relay.env.NATS_PASS, passwords[SITES[site].relayUser])
    // Each process's spans under its own name, whatever the operator's shell exported.
    assert.equal(relay.env.OTEL_SERVICE_NAME, `keyway-relay-${site}`)
    assert.equal(worker.env.OTEL_SERVICE_NAME, `keyway-worker-${site}`)
    assert.equal(worker.env.NATS_PASS, passwords[SITES[site].worker.user])
    assert.equal(worker.env.NATS_INBOX_PREFIX, `_INBOX_${SITES[site].worker.user}`)
    assert.ok(worker.env.DATABASE_URL!.endsWith(`/${SITES[site].database}`))
    const demo = byName.get(`${site}-demo`)!
    assert.ok(!Object.keys(demo.env).some((k) => k.includes("PASS")))
    for (const p of byName.values()) {
      const secrets = Object.entries(p.env).filter(([k]) => k.includes("PASS"))
      if (!p.name.endsWith("-nats")) assert.ok(secrets.length <= 1, p.name)
    }
  }
})
