import { ConfigError, type Env, natsAuthEnv, natsServersEnv } from "@keyway/app-config"

export { ConfigError }

// `just streams`' environment, parsed before the site file is read or NATS is tried: a value
// the operator got wrong ends it with exit 2 and the variable's name, where the connection's
// retries would have taken it for a server not up yet and waited.

export interface StreamsAppConfig {
  natsServers: string[]
  /** A site's admin user when its server has accounts (nats/README.md), as in ops/compose. */
  natsUser?: string
  natsPass?: string
  /** The reply prefix; unset, the user's own (nats/README.md), or `_INBOX` without a user. */
  natsInboxPrefix?: string
}

export function parseConfig(env: Env): StreamsAppConfig {
  const servers = natsServersEnv(env)
  const nats = natsAuthEnv(env)
  return {
    natsServers: servers,
    natsUser: nats.user,
    natsPass: nats.pass,
    natsInboxPrefix: nats.inboxPrefix,
  }
}
