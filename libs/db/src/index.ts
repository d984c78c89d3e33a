export { applyAppSchema } from "./apply-app-schema.ts"
export {
  connectTimeoutMillis,
  createDb,
  type DbConfig,
  DEFAULT_CONNECT_TIMEOUT_MS,
  keepaliveSettings,
  keepaliveSql,
  pgTypes,
} from "./create-db.ts"
export { ensureDatabase } from "./ensure-database.ts"
export {
  assertMigrated,
  type MigrateOptions,
  MigrationError,
  migrateToLatest,
  migrationsDir,
  pendingMigrations,
} from "./migrate.ts"
export { PreparingClient } from "./preparing-client.ts"
export { runPipelinedTransaction } from "./run-pipelined-transaction.ts"
