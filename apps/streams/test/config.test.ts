import assert from "node:assert/strict"
import { test } from "node:test"
import { ConfigError, parseConfig } from "../src/config.ts"

// The settings are @keyway/app-config's natsClientEnv, tested there: here, that they are it.
test("the NATS client settings: the shared server by default, a bad value refused by name", () => {
  assert.deepEqual(parseConfig({}), {
    natsServers: ["nats://127.0.0.1:4222"],
    natsUser: undefined,
    natsPass: undefined,
    natsInboxPrefix: undefined,
  })
  assert.throws(
    () => parseConfig({ NATS_PASS: "secret" }),
    (err: unknown) =>
      err instanceof ConfigError && /^NATS_PASS is set without NATS_USER/.test(err.message),
  )
})
