// `just migrate`: apply sql/ to the database named by DATABASE_URL.
import { ConfigError, postgresUrlEnv } from "@keyway/app-config"
import { createDb, ensureDatabase, migrateToLatest } from "@keyway/db"

let url: string
try {
  url = postgresUrlEnv(process.env)
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  console.error(`migrate: ${err.message}`)
  process.exit(2)
}
// One line for whatever goes wrong (the server away, a role or option it refuses, a failing
// migration): an operator reads the reason, not a stack. Node reports a refused connection
// to every address of a host as an AggregateError with an empty message.
const reason = (err: unknown) => {
  const e = err as Error & { code?: string; errors?: Error[] }
  return e.message || e.errors?.map((x) => x.message).join("; ") || e.code || String(err)
}
let db: ReturnType<typeof createDb> | undefined
try {
  if (await ensureDatabase(url)) console.log(`created database ${new URL(url).pathname.slice(1)}`)
  db = createDb({ connectionString: url, max: 1, applicationName: "keyway-migrate" })
  const applied = await migrateToLatest(db)
  console.log(applied.length ? `applied: ${applied.join(", ")}` : "up to date")
} catch (err) {
  console.error(`migrate: ${reason(err)}`)
  process.exitCode = 1
} finally {
  await db?.destroy().catch(() => {})
}
