// `just demo` refuses bad settings before it touches Postgres or NATS.
import assert from "node:assert/strict"
import { spawnSync } from "node:child_process"
import { test } from "node:test"
import { fileURLToPath } from "node:url"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))

test("bad settings exit 2 naming what is wrong, before anything starts", () => {
  const cases: [string[], Record<string, string>, RegExp][] = [
    [["moon"], {}, /the site must be one of cloud, factory, not moon/],
    [[], { DEMO_RATE: "0" }, /DEMO_RATE must be a number of events per second from 0.01 to/],
    [[], { DEMO_RATE: "abc" }, /DEMO_RATE must be/],
    [[], { DEMO_SECONDS: "abc" }, /DEMO_SECONDS must be a whole number of seconds/],
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
