import { ConfigError, type Env, natsAuthEnv, natsServersEnv } from "@keyway/app-config"

export { ConfigError }

// The server `just replay` reads from when no --site names one. Read only then: a site of
// `just up` brings its own server and admin user, and a NATS_URL left in the shell for
// another purpose must not stop that read.

export interface ReplayAppConfig {
  natsServers: string[]
  natsUser?: string
  natsPass?: string
  /** The reply prefix; unset, the user's own (nats/README.md), or `_INBOX` without a user. */
  natsInboxPrefix?: string
}

export function parseConfig(env: Env): ReplayAppConfig {
  const servers = natsServersEnv(env)
  const nats = natsAuthEnv(env)
  return {
    natsServers: servers,
    natsUser: nats.user,
    natsPass: nats.pass,
    natsInboxPrefix: nats.inboxPrefix,
  }
}
