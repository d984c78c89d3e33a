export { createDb, type DbConfig, pgTypes } from "./create-db.ts"
export { ensureDatabase } from "./ensure-database.ts"
export { type MigrateOptions, migrateToLatest, migrationsDir } from "./migrate.ts"
export { PreparingClient } from "./preparing-client.ts"
