import { connect, type NatsConnection } from "@nats-io/transport-node"

export interface NatsConfig {
  servers: string | string[]
  name?: string
  user?: string
  pass?: string
  /** Give each bridge its own, so one user's replies are not readable by another. */
  inboxPrefix?: string
  /**
   * Default true: the returned promise waits, silently, for a server that is not up yet.
   * False: it rejects when no server answers, for a caller that retries and says so.
   */
  waitForServer?: boolean
}

/**
 * Connects with the options every Keyway process wants (reference/nats-2.9.md rule 10):
 * never give up reconnecting (the library default stops after 10 attempts, which turns a
 * long NATS outage into a dead process), and wait for a server that is not up yet.
 * `noAsyncTraces`: by default every request (each JetStream publish is one) builds two Error
 * objects up front for a nicer stack should it fail; that was 8% of the relay's CPU in
 * `just bench pipeline`. Failures still carry their message and cause.
 */
export function connectNats(config: NatsConfig): Promise<NatsConnection> {
  return connect({
    servers: config.servers,
    name: config.name,
    user: config.user,
    pass: config.pass,
    inboxPrefix: config.inboxPrefix,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 250,
    waitOnFirstConnect: config.waitForServer ?? true,
    pingInterval: 10_000,
    noAsyncTraces: true,
  })
}
