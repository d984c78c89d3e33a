import { setTimeout as sleep } from "node:timers/promises"

// A site starts its processes in any order and restarts its servers while they run: a worker
// may come up before Postgres accepts connections, or before the stream it reads exists (the
// relay or `just streams` creates it). Exiting then leaves recovery to the supervisor, which
// gives up after a number of restarts (pm2's max_restarts) and prints a stack trace per try;
// the process would stay down after the server came back. So each startup step that needs a
// server is retried until it succeeds, one log line per failed try, and a stop signal ends
// the wait at once.

export interface RetryUntilReadyOptions {
  /** What the step waits for, in the log line: "Postgres (demo_effect table)". */
  what: string
  /** One call per failed try. */
  log: (message: string, fields: Record<string, unknown>) => void
  /** Aborting it (SIGTERM) ends the wait: the call rejects with the signal's reason. */
  signal?: AbortSignal
  /** Delay after the first failure; it doubles up to maxDelayMs. Default 250 ms. */
  firstDelayMs?: number
  /** Default 5,000 ms: a server back is noticed within 5 s, and the log stays readable. */
  maxDelayMs?: number
}

/**
 * Runs `step` until it resolves and returns its value. Every failure is retried: at startup a
 * refused connection, a server still recovering and a stream not created yet look alike from
 * here, and a wrong setting shows as the same error logged again and again, while the process
 * stays up to be corrected rather than crash-looping. Errors of the step's own making (a bad
 * argument) belong in config.ts, which fails fast before any of this runs.
 */
export async function retryUntilReady<T>(
  step: () => Promise<T>,
  options: RetryUntilReadyOptions,
): Promise<T> {
  const { what, log, signal } = options
  const maxDelayMs = options.maxDelayMs ?? 5000
  let delayMs = options.firstDelayMs ?? 250
  for (let attempt = 1; ; attempt++) {
    signal?.throwIfAborted()
    try {
      return await step()
    } catch (err) {
      signal?.throwIfAborted()
      log(`waiting for ${what}`, {
        attempt,
        retryInMs: delayMs,
        error: err instanceof Error ? err.message : String(err),
      })
    }
    // Rejects only when aborted; the signal's own reason is what the caller gets.
    await sleep(delayMs, undefined, { signal }).catch(() => signal?.throwIfAborted())
    delayMs = Math.min(delayMs * 2, maxDelayMs)
  }
}
