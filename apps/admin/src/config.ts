// The admin CLI's environment, parsed once: the group's database.
import { ConfigError, type Env, postgresUrlEnv } from "@keyway/app-config"

export interface AdminConfig {
  databaseUrl: string
}

export { ConfigError }

/**
 * DATABASE_URL, checked as every app checks it: a bare database name (`keyway_cloud`) was
 * read by pg as a host, and the operator saw `getaddrinfo ENOTFOUND base`.
 */
export function parseAdminConfig(env: Env): AdminConfig {
  return { databaseUrl: postgresUrlEnv(env) }
}
