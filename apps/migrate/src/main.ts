// `just migrate`: apply sql/ to the database named by DATABASE_URL.
import { createDb, ensureDatabase, migrateToLatest } from "@keyway/db"

const url = process.env.DATABASE_URL
if (!url) {
  console.error("DATABASE_URL is not set (e.g. postgres://postgres@127.0.0.1:5432/keyway)")
  process.exit(2)
}
if (await ensureDatabase(url)) console.log(`created database ${new URL(url).pathname.slice(1)}`)
const db = createDb({ connectionString: url, max: 1, applicationName: "keyway-migrate" })
try {
  const applied = await migrateToLatest(db)
  console.log(applied.length ? `applied: ${applied.join(", ")}` : "up to date")
} catch (err) {
  console.error((err as Error).message)
  process.exitCode = 1
} finally {
  await db.destroy()
}
