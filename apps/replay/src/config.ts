import { ConfigError, type Env, type NatsClientEnv, natsClientEnv } from "@keyway/app-config"

export { ConfigError }

// The server `just replay` reads from when no --site names one. Read only then: a site of
// `just up` brings its own server and admin user, and a NATS_URL left in the shell for
// another purpose must not stop that read.

export type ReplayAppConfig = NatsClientEnv

export const parseConfig = (env: Env): ReplayAppConfig => natsClientEnv(env)
