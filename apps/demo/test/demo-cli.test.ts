// `just demo` refuses bad settings before it touches Postgres or NATS, and a second Ctrl-C
// ends it whatever its stop waits for.
import assert from "node:assert/strict"
import { spawnSync } from "node:child_process"
import { test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { fileURLToPath } from "node:url"
import {
  createTcpProxy,
  createTestDatabase,
  spawnTs,
  startNatsServer,
  waitFor,
} from "@keyway/testkit"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))

test("bad settings exit 2 naming what is wrong, before anything starts", () => {
  const cases: [string[], Record<string, string>, RegExp][] = [
    [["moon"], {}, /the site must be one of cloud, factory, not moon/],
    [[], { DEMO_RATE: "0" }, /DEMO_RATE must be a number of events per second from 0.01 to/],
    [[], { DEMO_RATE: "abc" }, /DEMO_RATE must be/],
    [[], { DEMO_SECONDS: "abc" }, /DEMO_SECONDS must be an integer from 0 to 2000000/],
    [[], { DEMO_SECONDS: "1.5" }, /DEMO_SECONDS must be/],
    // A pause between writes longer than a Node timer can wait ran as 1 ms: flat out.
    [[], { DEMO_RATE: "0.0000001" }, /DEMO_RATE must be a number of events per second from 0.01/],
    [[], { DEMO_RATE: "1e3" }, /DEMO_RATE must be/],
    [[], { NATS_URL: "nats://u:secret@127.0.0.1:1" }, /NATS_URL server 1 of 1 carries a user/],
  ]
  for (const [args, env, message] of cases) {
    const r = spawnSync(process.execPath, ["--import", "tsx", main, ...args], {
      // Unreachable servers: were the checks to let it through, it would fail differently.
      env: {
        ...process.env,
        DATABASE_URL: "postgres://nobody@127.0.0.1:1/none",
        NATS_URL: "nats://127.0.0.1:1",
        ...env,
      },
      encoding: "utf8",
      timeout: 30_000,
    })
    const what = `${args.join(" ")} ${JSON.stringify(env)}`
    assert.equal(r.status, 2, `${what}: ${r.stderr}`)
    assert.match(r.stderr, message, what)
  }
})

test("a second Ctrl-C while the stop waits on a Postgres that does not answer ends the demo at once", {
  timeout: 120_000,
}, async () => {
  const t = await createTestDatabase()
  const proxy = await createTcpProxy({ host: "127.0.0.1", port: 5432 })
  await using nats = await startNatsServer()
  const url = new URL(t.url)
  url.host = `${proxy.host}:${proxy.port}`
  const child = spawnTs(main, {
    DATABASE_URL: url.toString(),
    NATS_URL: nats.url,
    DEMO_RATE: "20",
  })
  try {
    await waitFor(() => child.lines.some((l) => /^written [1-9]/.test(l)), {
      timeoutMs: 60_000,
      message: () => `the demo writes (it printed ${child.lines.join("\n")})`,
    })
    proxy.stall()
    child.kill("SIGINT")
    // The stop waits on the writer's transaction, which gets no answer.
    await sleep(1500)
    assert.equal(child.exitCode, null, "the first Ctrl-C's stop still waits")
    child.kill("SIGINT")
    const { code } = await child.exited()
    assert.equal(code, 130)
  } finally {
    child.kill("SIGKILL")
    proxy.resume()
    await proxy.close()
    await t.drop()
  }
})
