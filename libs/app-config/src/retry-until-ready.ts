import { setTimeout as sleep } from "node:timers/promises"

// A site starts its processes in any order and restarts its servers while they run: a worker
// may come up before Postgres accepts connections, or before the stream it reads exists (the
// relay or `just streams` creates it). Exiting then leaves recovery to the supervisor, which
// gives up after a number of restarts (pm2's max_restarts) and prints a stack trace per try;
// the process would stay down after the server came back. So each startup step that needs a
// server is retried until it succeeds, one log line per failed try.

export interface RetryUntilReadyOptions {
  /** What the step waits for, in the log line: "Postgres", "stream CLOUD on NATS". */
  what: string
  /** One call per failed try. */
  log: (message: string, fields: Record<string, unknown>) => void
  /** Delay after the first failure; it doubles up to maxDelayMs. Default 250 ms. */
  firstDelayMs?: number
  /**
   * Default 5,000 ms: a server that is back is noticed within 5 s of an attempt that failed
   * at once (a refused connection). An attempt against a host that drops packets takes the
   * operating system's connect timeout to fail.
   */
  maxDelayMs?: number
  /**
   * Gives a try up after this long, as a failure: for a client that waits for its server
   * itself, without a bound (ioredis re-sends a command at every reconnect, and one through
   * a link that accepts and drops each connection was never answered nor refused). None by
   * default.
   */
  attemptTimeoutMs?: number
}

/**
 * Runs `step` until it resolves and returns its value. A failure is retried unless waiting
 * cannot mend it (see {@link isPermanent}), which is thrown at once: a process whose
 * credentials or stream definition are wrong should fail where the operator looks, not log
 * "waiting" forever while it looks healthy.
 */
export async function retryUntilReady<T>(
  step: () => Promise<T>,
  options: RetryUntilReadyOptions,
): Promise<T> {
  const maxDelayMs = options.maxDelayMs ?? 5000
  let delayMs = options.firstDelayMs ?? 250
  for (let attempt = 1; ; attempt++) {
    try {
      return await (options.attemptTimeoutMs === undefined
        ? step()
        : within(step(), options.attemptTimeoutMs))
    } catch (err) {
      if (isPermanent(err)) throw err
      options.log(`waiting for ${options.what}`, {
        attempt,
        retryInMs: delayMs,
        error: describeError(err),
      })
    }
    await sleep(delayMs)
    delayMs = Math.min(delayMs * 2, maxDelayMs)
  }
}

/**
 * Errors that say the request is wrong, not that its server is away. Told apart by shape, so
 * that this package needs neither driver:
 * - Postgres SQLSTATE class 28 (a wrong password or role) and 42501 (no privilege). Other
 *   errors, such as a database not created yet (3D000), may mend.
 * - NATS refusing the credentials (nats.js AuthorizationError), the client refusing its options
 *   (InvalidArgumentError), or a subject the user may not
 *   use (PermissionViolationError, as itself or as the cause of a RequestError): a stream
 *   outside the user's permissions, or a reply prefix other than its own.
 * - A JetStream API answer with status 400: a stream configuration the server refuses, a
 *   consumer filter outside its stream. Its absence (404) or JetStream still starting (503)
 *   may mend.
 * - Redis refusing the credentials (an ioredis ReplyError of WRONGPASS, NOAUTH or NOPERM).
 * - An error that says so itself (`permanent: true`): a refusal that waiting cannot mend.
 */
function isPermanent(err: unknown): boolean {
  const e = err as { name?: unknown; code?: unknown; status?: unknown; permanent?: unknown } | null
  if (e === null || typeof e !== "object") return false
  if (e.permanent === true) return true
  if (typeof e.code === "string" && (e.code.startsWith("28") || e.code === "42501")) return true
  if (e.name === "AuthorizationError" || e.name === "PermissionViolationError") return true
  // nats.js refusing its own options (an inbox prefix with a wildcard): the same every try.
  if (e.name === "InvalidArgumentError") return true
  if (e.status === 400 && typeof e.code === "number") return true
  if (e.name === "ReplyError" && /^(WRONGPASS|NOAUTH|NOPERM)\b/.test(String((e as Error).message)))
    return true
  const cause = (err as { cause?: { name?: unknown } | null }).cause
  return e.name === "RequestError" && cause?.name === "PermissionViolationError"
}

/**
 * An error as one line for an operator. Node reports a refused `localhost` (both ::1 and
 * 127.0.0.1) as an AggregateError with no message, and some errors carry only a code.
 */
export function describeError(err: unknown): string {
  if (err instanceof AggregateError && !err.message) {
    return err.errors.map((e) => (e instanceof Error ? e.message : String(e))).join("; ")
  }
  if (err instanceof Error) return err.message || String((err as { code?: unknown }).code ?? err)
  return String(err)
}

/** The step's answer, or a failure once `ms` have passed; the step itself goes on unheard. */
function within<T>(step: Promise<T>, ms: number): Promise<T> {
  step.catch(() => {})
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms)
  })
  return Promise.race([step, late]).finally(() => clearTimeout(timer))
}
