// The runner's environment: a value it refuses is named, never repeated when it may hold a
// password.
import assert from "node:assert/strict"
import { test } from "node:test"
import { ConfigError, parseOpsConfig, parsePostgresUrl } from "../src/config.ts"

test("a KEYWAY_POSTGRES_URL that is not a URL is refused without repeating it", () => {
  // A password with a slash, as base64 ones have, breaks the URL.
  const secret = "s3cr/t"
  assert.throws(
    () => parseOpsConfig({ KEYWAY_POSTGRES_URL: `postgres://keyway:${secret}@db:5432/postgres` }),
    (err: unknown) =>
      err instanceof ConfigError &&
      /KEYWAY_POSTGRES_URL must be a URL like postgres:.*percent-encoded/.test(err.message) &&
      !err.message.includes(secret),
  )
  assert.equal(
    parseOpsConfig({ KEYWAY_POSTGRES_URL: "postgres://keyway:s3cr%2Ft@db:5432/postgres" })
      .postgresUrl,
    "postgres://keyway:s3cr%2Ft@db:5432/postgres",
  )
})

test("a KEYWAY_POSTGRES_URL pg would misread is refused by name, before anything starts", () => {
  for (const [raw, said] of [
    // A URL of scheme "localhost:": pg read it as a database named 432 on its default host.
    ["localhost:5432", /KEYWAY_POSTGRES_URL must be a URL like postgres:/],
    [
      "postgres://postgres@127.0.0.1:5432/postgres?connect_timeout=10s",
      /KEYWAY_POSTGRES_URL's connect_timeout/,
    ],
  ] as const) {
    assert.throws(
      () => parseOpsConfig({ KEYWAY_POSTGRES_URL: raw }),
      (err: unknown) => err instanceof ConfigError && said.test(err.message),
      raw,
    )
  }
  // A server's URL without a database is what it is for: each site's database replaces it.
  assert.equal(
    parseOpsConfig({ KEYWAY_POSTGRES_URL: "postgres://postgres@127.0.0.1:5432" }).postgresUrl,
    "postgres://postgres@127.0.0.1:5432/postgres",
  )
  assert.equal(
    parsePostgresUrl({ KEYWAY_POSTGRES_URL: "postgres://u:p%2Fw@db:5432/?sslmode=require" }),
    "postgres://u:p%2Fw@db:5432/postgres?sslmode=require",
  )
  // What status reads alone: a DEMO_RATE it does not use does not stop it.
  assert.equal(
    parsePostgresUrl({ KEYWAY_POSTGRES_URL: "", DEMO_RATE: "0" }),
    "postgres://postgres@127.0.0.1:5432/postgres",
  )
  assert.throws(() => parseOpsConfig({ DEMO_RATE: "0" }), /DEMO_RATE/)
})
