import assert from "node:assert/strict"
import { test } from "node:test"
import { ConfigError, parseConfig } from "../src/config.ts"

const refused = (message: RegExp) => (err: unknown) =>
  err instanceof ConfigError && message.test(err.message)

test("with no variable set: the machine's shared NATS, as nobody", () => {
  assert.deepEqual(parseConfig({}), {
    natsServers: ["nats://127.0.0.1:4222"],
    natsUser: undefined,
    natsPass: undefined,
    natsInboxPrefix: undefined,
  })
})

test("takes each of its variables", () => {
  assert.deepEqual(
    parseConfig({
      NATS_URL: "nats://127.0.0.1:14222, 127.0.0.1:14223",
      NATS_USER: "cloud-admin",
      NATS_PASS: "secret",
      NATS_INBOX_PREFIX: "_INBOX_cloud-admin",
    }),
    {
      natsServers: ["nats://127.0.0.1:14222", "127.0.0.1:14223"],
      natsUser: "cloud-admin",
      natsPass: "secret",
      natsInboxPrefix: "_INBOX_cloud-admin",
    },
  )
})

test("refuses a bad value by its variable's name, without repeating a password", () => {
  for (const url of ["nats://127.0.0.1:4222,", "tls://127.0.0.1:4222"]) {
    assert.throws(() => parseConfig({ NATS_URL: url }), refused(/^NATS_URL must be/), url)
  }
  assert.throws(
    () => parseConfig({ NATS_URL: "nats://u:secret@127.0.0.1:4222" }),
    (err: Error) =>
      refused(/^NATS_URL server 1 of 1 carries a user or password/)(err) &&
      !err.message.includes("secret"),
  )
  // nats.js sends a password only beside a user.
  assert.throws(
    () => parseConfig({ NATS_PASS: "secret" }),
    refused(/^NATS_PASS is set without NATS_USER/),
  )
  assert.throws(
    () => parseConfig({ NATS_USER: "cloud-admin\r", NATS_PASS: "secret" }),
    refused(/^NATS_USER holds a space or a control character/),
  )
  assert.throws(
    () => parseConfig({ NATS_USER: "cloud-admin", NATS_INBOX_PREFIX: "_INBOX_cloud-admin.>" }),
    refused(/^NATS_INBOX_PREFIX "_INBOX_cloud-admin\.>" must be subject tokens/),
  )
})
