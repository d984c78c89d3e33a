import assert from "node:assert/strict"
import { test } from "node:test"
import { ConfigError, parseConfig } from "../src/config.ts"

test("DATABASE_URL is parsed once, in config.ts, as every app's environment is", () => {
  const databaseUrl = "postgres://postgres@127.0.0.1:5432/keyway"
  assert.deepEqual(parseConfig({ DATABASE_URL: databaseUrl }), { databaseUrl })
  assert.throws(
    () => parseConfig({}),
    (err: Error) => err instanceof ConfigError,
  )
  assert.throws(
    () => parseConfig({ DATABASE_URL: "mysql://u:secret@127.0.0.1/db" }),
    (err: Error) => /^DATABASE_URL must be a URL like postgres:/.test(err.message),
  )
})
