import { setTimeout as sleep } from "node:timers/promises"
import { connect, errors, type NatsConnection } from "@nats-io/transport-node"
import { inboxPrefixFor } from "./inbox-prefix-for.ts"

export interface NatsConfig {
  servers: string | string[]
  name?: string
  user?: string
  pass?: string
  /**
   * Give each bridge its own, so one user's replies are not readable by another. Default,
   * with a `user`: that user's prefix in nats/ (inboxPrefixFor), which is the only one its
   * permissions let it read; without one, nats.js's `_INBOX`.
   */
  inboxPrefix?: string
  /**
   * Default true: the returned promise waits, silently, for a server that is not up yet; it
   * rejects when a server refuses the credentials (AuthorizationError), which waiting does
   * not mend. False: it rejects when no server answers, for a caller that retries and says so.
   */
  waitForServer?: boolean
}

/**
 * Connects with the options every Keyway process wants (reference/nats-2.9.md rule 10):
 * never give up reconnecting (the library default stops after 10 attempts, which turns a
 * long NATS outage into a dead process), not even after the server refuses the password
 * twice (the library's other default: a password rotated on the server before the apps
 * closed their connections for good, and a relay on a closed connection kept its leadership
 * while publishing nothing), and wait for a server that is not up yet (see `waitForServer`).
 * `noAsyncTraces`: by default every request (each JetStream publish is one) builds two Error
 * objects up front for a nicer stack should it fail; that was 8% of the relay's CPU in
 * `just bench pipeline`. Failures still carry their message and cause.
 */
export async function connectNats(config: NatsConfig): Promise<NatsConnection> {
  const options = {
    servers: config.servers,
    name: config.name,
    user: config.user,
    pass: config.pass,
    // A user on nats.js's default `_INBOX` gets no reply at all under Keyway's permissions:
    // every request times out, and a process waiting for its stream waits for ever.
    inboxPrefix: config.inboxPrefix ?? (config.user ? inboxPrefixFor(config.user) : undefined),
    maxReconnectAttempts: -1,
    ignoreAuthErrorAbort: true,
    reconnectTimeWait: 250,
    // Not nats.js's own wait for the first connect: it also waits through refused
    // credentials, so a wrong password was a process that hung without a word.
    waitOnFirstConnect: false,
    pingInterval: 10_000,
    noAsyncTraces: true,
  }
  for (let delayMs = 250; ; delayMs = Math.min(delayMs * 2, 2000)) {
    try {
      return await connect(options)
    } catch (err) {
      if (config.waitForServer === false || refusedForGood(err)) throw err
    }
    await sleep(delayMs)
  }
}

/** A refusal that another try would meet again: the credentials, or the options themselves. */
function refusedForGood(err: unknown): boolean {
  return (
    err instanceof errors.AuthorizationError ||
    err instanceof errors.UserAuthenticationExpiredError ||
    err instanceof errors.InvalidArgumentError
  )
}
