// The runner's environment: a value it refuses is named, never repeated when it may hold a
// password.
import assert from "node:assert/strict"
import { test } from "node:test"
import { ConfigError, parseOpsConfig } from "../src/config.ts"

test("a KEYWAY_POSTGRES_URL that is not a URL is refused without repeating it", () => {
  // A password with a slash, as base64 ones have, breaks the URL.
  const secret = "s3cr/t"
  assert.throws(
    () => parseOpsConfig({ KEYWAY_POSTGRES_URL: `postgres://keyway:${secret}@db:5432/postgres` }),
    (err: unknown) =>
      err instanceof ConfigError &&
      /KEYWAY_POSTGRES_URL is not a URL/.test(err.message) &&
      !err.message.includes(secret),
  )
  assert.equal(
    parseOpsConfig({ KEYWAY_POSTGRES_URL: "postgres://keyway:s3cr%2Ft@db:5432/postgres" })
      .postgresUrl,
    "postgres://keyway:s3cr%2Ft@db:5432/postgres",
  )
})
