// Every server config in nats/ passes `nats-server -t -c` with its variables set (issue 4,
// must-show 1), and fails without them: the variables are the configs' only parameters, so a
// launcher that forgets one must hear about it before the server starts. The stream
// definitions keep the topology's rules (reference/nats-2.9.md rules 3 and 4).
import assert from "node:assert/strict"
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, test } from "node:test"
import { checkNatsConfigWith } from "@keyway/testkit"
import { leafRemoteUrl, loadStreamDefinitions, parseDuration } from "../src/index.ts"
import { configFile, makePasswords, natsDir, passwordEnv } from "./support.ts"

const passwords = passwordEnv(makePasswords())
const pick = (...names: string[]) => Object.fromEntries(names.map((n) => [n, passwords[n]!]))
const common = {
  KEYWAY_NATS_HOST: "127.0.0.1",
  KEYWAY_NATS_PORT: "14222",
  KEYWAY_NATS_HTTP_PORT: "18222",
  KEYWAY_NATS_STORE_DIR: "/tmp/keyway-config-check",
}
// Each config's variables, exactly: the passwords of its own site's users and nothing else.
const hubVars = {
  ...common,
  ...pick(
    "KEYWAY_PASS_CLOUD_RELAY",
    "KEYWAY_PASS_CLOUD_WORKER",
    "KEYWAY_PASS_CLOUD_ADMIN",
    "KEYWAY_PASS_LEAF_FACTORY",
  ),
  KEYWAY_LEAF_PORT: "17422",
  KEYWAY_LEAF_ADVERTISE: "hub.example:7422",
}
const variables: Record<string, Record<string, string>> = {
  "hub.conf": hubVars,
  "leaf.conf": {
    ...common,
    ...pick("KEYWAY_PASS_FACTORY_RELAY", "KEYWAY_PASS_FACTORY_WORKER", "KEYWAY_PASS_FACTORY_ADMIN"),
    KEYWAY_LEAF_REMOTE_URL: leafRemoteUrl("nats-leaf://127.0.0.1:17422", "leaf-factory", "p1"),
  },
  ...Object.fromEntries(
    [1, 2, 3].map((i) => [
      `cluster/hub-${i}.conf`,
      {
        ...hubVars,
        KEYWAY_CLUSTER_PORT: "16222",
        KEYWAY_CLUSTER_ROUTES: '["nats-route://10.0.0.1:6222", "nats-route://10.0.0.2:6222"]',
      },
    ]),
  ),
}

describe("server configs", () => {
  test("the list above covers every config in nats/", async () => {
    const found = (await readdir(natsDir, { recursive: true }))
      .filter((f) => f.endsWith(".conf") && !f.startsWith("accounts/"))
      .sort()
    assert.deepEqual(found, Object.keys(variables).sort())
  })

  for (const [file, env] of Object.entries(variables)) {
    test(`${file} passes nats-server -t with its variables, and fails without any one of them`, async () => {
      const ok = await checkNatsConfigWith(configFile(file), env)
      assert.ok(ok.ok, ok.output)
      for (const name of Object.keys(env)) {
        const { [name]: _, ...without } = env
        const check = await checkNatsConfigWith(configFile(file), without)
        assert.equal(check.ok, false, `${file} started without ${name}`)
      }
    })
  }
})

describe("stream definitions", () => {
  test("streams keep limits retention and a week's age; origins a dedupe window, copies almost none; copies source the other domain", async () => {
    const cloud = await loadStreamDefinitions(configFile("streams/cloud.json"))
    const factory = await loadStreamDefinitions(configFile("streams/factory.json"))
    const byName = new Map([...cloud, ...factory].map((s) => [s.name, s]))
    assert.deepEqual([...byName.keys()].sort(), ["CLOUD", "CLOUD_IN", "FACTORY", "FACTORY_IN"])
    for (const s of byName.values()) {
      assert.equal(s.retention, "limits", `${s.name}: limits retention (rule 3)`)
      // Twice the longest outage planned for (3.5 days).
      assert.ok((s.max_age ?? 0) >= parseDuration("168h"), `${s.name}: max_age`)
      assert.ok((s.duplicate_window ?? 0) <= (s.max_age ?? 0))
    }
    // An origin dedupes a relay's re-sends by event id. A copy's window must stay short: an
    // id its origin holds twice stalled it for its whole window (copies.test.ts). What a copy
    // then holds twice, the consumer groups' inboxes drop by event id.
    for (const name of ["CLOUD", "FACTORY"]) {
      const window = byName.get(name)!.duplicate_window ?? 0
      assert.ok(window >= parseDuration("10m"), `${name}: duplicate_window`)
    }
    for (const name of ["CLOUD_IN", "FACTORY_IN"]) {
      const window = byName.get(name)!.duplicate_window ?? 0
      assert.ok(window > 0 && window <= parseDuration("1s"), `${name}: duplicate_window`)
    }
    assert.deepEqual(byName.get("CLOUD")!.subjects, ["cloud.>"])
    assert.deepEqual(byName.get("FACTORY")!.subjects, ["factory.>"])
    // Copies have no subjects of their own: a copy listening on the origin's subjects would
    // store each event a second time (rule 4).
    assert.equal(byName.get("FACTORY_IN")!.subjects, undefined)
    assert.equal(byName.get("CLOUD_IN")!.subjects, undefined)
    assert.deepEqual(byName.get("FACTORY_IN")!.sources, [
      { name: "FACTORY", external: { api: "$JS.factory.API", deliver: "" } },
    ])
    assert.deepEqual(byName.get("CLOUD_IN")!.sources, [
      { name: "CLOUD", external: { api: "$JS.cloud.API", deliver: "" } },
    ])
  })
  test("the cluster's cloud streams are the single node's with three replicas, and a copy window that spares the inboxes", async () => {
    const single = await loadStreamDefinitions(configFile("streams/cloud.json"))
    const cluster = await loadStreamDefinitions(configFile("streams/cluster/cloud.json"))
    assert.deepEqual(
      cluster.map((s) => s.name),
      single.map((s) => s.name),
    )
    for (const s of cluster) {
      const { description: _a, num_replicas, duplicate_window, ...rest } = s
      const {
        description: _b,
        duplicate_window: singleWindow,
        ...singleRest
      } = single.find((x) => x.name === s.name)!
      delete (singleRest as { num_replicas?: number }).num_replicas
      assert.equal(num_replicas, 3, `${s.name}: survives a node`)
      assert.deepEqual(rest, singleRest, `${s.name}: otherwise the same`)
      assert.equal(
        duplicate_window,
        s.name === "FACTORY_IN" ? parseDuration("10m") : singleWindow,
        `${s.name}: duplicate_window`,
      )
    }
  })
  test("a duration written as a bare number under a second is refused, naming the stream and field", async () => {
    const dir = await mkdtemp(join(tmpdir(), "keyway-streams-"))
    try {
      const file = join(dir, "streams.json")
      const write = (stream: object) => writeFile(file, JSON.stringify({ streams: [stream] }))
      // Seconds meant, nanoseconds read: 0.6 ms.
      await write({ name: "ORIGIN", subjects: ["o.>"], max_age: 604800 })
      await assert.rejects(
        loadStreamDefinitions(file),
        /ORIGIN\.max_age 604800 is a number of nanoseconds \(0\.6048 ms\): write a duration/,
      )
      // A week in nanoseconds, as `nats stream info --json` prints it, and 0 (no limit) are kept.
      await write({ name: "ORIGIN", subjects: ["o.>"], max_age: 604800e9, duplicate_window: 0 })
      const [stream] = await loadStreamDefinitions(file)
      assert.equal(stream!.max_age, 604800e9)
      assert.equal(stream!.duplicate_window, 0)
      // Under a second with its unit is meant: loaded, and applied as it is (applyStreams
      // reads the loaded numbers again).
      await write({ name: "ORIGIN", subjects: ["o.>"], duplicate_window: "500ms" })
      const [short] = await loadStreamDefinitions(file)
      assert.equal(short!.duplicate_window, 500e6)
      // A name nats.js would refuse before asking the server.
      await write({ name: "factory.in", subjects: ["o.>"] })
      await assert.rejects(loadStreamDefinitions(file), /stream name "factory\.in" may not hold/)
    } finally {
      await rm(dir, { recursive: true })
    }
  })
})

describe("leafRemoteUrl", () => {
  test("puts the user and the escaped password into the hub's leaf URL", () => {
    const url = leafRemoteUrl("nats-leaf://hub.example:7422", "leaf-factory", "a@b/c:d")
    assert.equal(url, "nats-leaf://leaf-factory:a%40b%2Fc%3Ad@hub.example:7422")
    const parsed = new URL(url)
    assert.equal(decodeURIComponent(parsed.password), "a@b/c:d")
  })

  test("refuses a URL that already carries credentials", () => {
    assert.throws(
      () => leafRemoteUrl("nats-leaf://u:p@hub:7422", "leaf-factory", "x"),
      /credentials/,
    )
  })
})
