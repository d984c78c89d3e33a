import { ConfigError, type Env, type NatsClientEnv, natsClientEnv } from "@keyway/app-config"

export { ConfigError }

// `just streams`' environment, parsed before the site file is read or NATS is tried: a value
// the operator got wrong ends it with exit 2 and the variable's name, where the connection's
// retries would have taken it for a server not up yet and waited.

export type StreamsAppConfig = NatsClientEnv

export const parseConfig = (env: Env): StreamsAppConfig => natsClientEnv(env)
