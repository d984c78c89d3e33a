// `just up`'s plan without starting anything: ports clear of the machine's shared servers,
// and each process given exactly the secrets its role needs.
import assert from "node:assert/strict"
import { mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { test } from "node:test"
import { checkNatsConfigWith } from "@keyway/testkit"
import {
  type LaunchContext,
  NATS_USERS,
  passwordVariable,
  repositoryRoot,
  SITE_NAMES,
  SITES,
  siteProcesses,
  specDigest,
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

test("a process's digest changes with its settings: a password, the demo rate, a config file it includes", async () => {
  const digests = (c: LaunchContext) =>
    new Map(siteProcesses(SITES.cloud, c).map((p) => [p.name, specDigest(p)]))
  const before = digests(ctx)
  assert.deepEqual(digests({ ...ctx }), before, "the same plan, the same digests")
  // The relay's password rotated: the relay and the server that checks it, not the worker.
  const rotated = digests({
    ...ctx,
    passwords: { ...passwords, [SITES.cloud.relayUser]: "k0rotated0secret" },
  })
  const changed = (after: Map<string, string>) =>
    [...after].filter(([name, d]) => before.get(name) !== d).map(([name]) => name)
  assert.deepEqual(changed(rotated), ["cloud-nats", "cloud-relay"])
  assert.deepEqual(changed(digests({ ...ctx, demoRate: 11 })), ["cloud-demo"])

  const dir = await mkdtemp(join(tmpdir(), "keyway-digest-"))
  try {
    const main = join(dir, "server.conf")
    await writeFile(main, "port: 4222\ninclude accounts.conf\n")
    await writeFile(join(dir, "accounts.conf"), "accounts { A { users: [] } }\n")
    const spec = { name: "s", script: "nats-server", args: [], env: {}, tier: "server" as const }
    const withFile = { ...spec, configFiles: [main] }
    const first = specDigest(withFile)
    assert.notEqual(first, specDigest(spec))
    // A comment is not a setting; the included file's text is.
    await writeFile(join(dir, "accounts.conf"), "# who may connect\naccounts { A { users: [] } }\n")
    assert.equal(specDigest(withFile), first)
    await writeFile(join(dir, "accounts.conf"), "accounts { B { users: [] } }\n")
    assert.notEqual(specDigest(withFile), first)
    // The order an environment is written in is not a setting either.
    assert.equal(
      specDigest({ ...spec, env: { A: "1", B: "2" } }),
      specDigest({ ...spec, env: { B: "2", A: "1" } }),
    )
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
})

test("the repository root of a checkout whose path has a space is that path, unescaped", () => {
  // The module URL escapes the space; the root it names must not (`up` wrote its secrets
  // under /tmp/a%20b and then failed there).
  assert.equal(
    repositoryRoot("file:///tmp/a%20b/keyway/apps/ops-local/src/site-plan.ts"),
    "/tmp/a b/keyway",
  )
})

test("each site's NATS config parses with its store under a path with a space", async () => {
  // nats-server parses a variable's value as a config value: unquoted, `/tmp/a b/…` failed,
  // and pm2 restarted the server over and over.
  const spaced: LaunchContext = { ...ctx, runDir: "/tmp/a b/keyway/.run" }
  for (const site of SITE_NAMES) {
    const nats = siteProcesses(SITES[site], spaced)[0]!
    const checked = await checkNatsConfigWith(join(ctx.root, SITES[site].natsConfig), nats.env)
    assert.ok(checked.ok, `${site}: ${checked.output}`)
  }
})
