// `just migrate`: apply sql/ to the database named by DATABASE_URL.
import { describeError } from "@keyway/app-config"
import { createDb, ensureDatabase, migrateToLatest } from "@keyway/db"
import { ConfigError, parseConfig } from "./config.ts"

let url: string
try {
  url = parseConfig(process.env).databaseUrl
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  console.error(`migrate: ${err.message}`)
  process.exit(2)
}
// One line for whatever goes wrong (the server away, a role or option it refuses, a failing
// migration): an operator reads the reason, not a stack.
let db: ReturnType<typeof createDb> | undefined
try {
  if (await ensureDatabase(url)) console.log(`created database ${new URL(url).pathname.slice(1)}`)
  db = createDb({ connectionString: url, max: 1, applicationName: "keyway-migrate" })
  // A wait is no outcome: on stderr, with the errors; stdout says what was done.
  const applied = await migrateToLatest(db, {
    log: (message) => console.error(`migrate: ${message}`),
  })
  console.log(applied.length ? `applied: ${applied.join(", ")}` : "up to date")
} catch (err) {
  console.error(`migrate: ${describeError(err)}`)
  process.exitCode = 1
} finally {
  await db?.destroy().catch(() => {})
}
