// `just demo` refuses bad settings before it touches Postgres or NATS.
import assert from "node:assert/strict"
import { spawnSync } from "node:child_process"
import { test } from "node:test"
import { fileURLToPath } from "node:url"

const main = fileURLToPath(new URL("../src/main.ts", import.meta.url))

test("bad settings exit 2 naming what is wrong, before anything starts", () => {
  const cases: [string[], Record<string, string>, RegExp][] = [
    [["moon"], {}, /the site must be one of cloud, factory, not moon/],
    [[], { DEMO_RATE: "0" }, /DEMO_RATE must be a number of events per second above 0/],
    [[], { DEMO_RATE: "abc" }, /DEMO_RATE must be/],
    [[], { DEMO_SECONDS: "abc" }, /DEMO_SECONDS must be a whole number of seconds/],
    [[], { DEMO_SECONDS: "1.5" }, /DEMO_SECONDS must be/],
  ]
  for (const [args, env, message] of cases) {
    const r = spawnSync(process.execPath, ["--import", "tsx", main, ...args], {
      // Unreachable servers: were the checks to let it through, it would fail differently.
      env: {
        ...process.env,
        ...env,
        DATABASE_URL: "postgres://nobody@127.0.0.1:1/none",
        NATS_URL: "nats://127.0.0.1:1",
      },
      encoding: "utf8",
      timeout: 30_000,
    })
    const what = `${args.join(" ")} ${JSON.stringify(env)}`
    assert.equal(r.status, 2, `${what}: ${r.stderr}`)
    assert.match(r.stderr, message, what)
  }
})
