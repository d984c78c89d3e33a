import { ConfigError, type Env, postgresUrlEnv } from "@keyway/app-config"

export { ConfigError }

// `just migrate`'s whole environment, parsed once, as every app's is: a bad value stops it
// before any connection, naming the variable.

export interface MigrateAppConfig {
  /** The database to migrate (DATABASE_URL); created first if the server lacks it. */
  databaseUrl: string
}

export function parseConfig(env: Env): MigrateAppConfig {
  return { databaseUrl: postgresUrlEnv(env) }
}
