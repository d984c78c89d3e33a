export { createDb, type DbConfig } from "./create-db.ts"
export { type MigrateOptions, migrateToLatest, migrationsDir } from "./migrate.ts"
