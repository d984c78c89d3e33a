// How every long-running Keyway process meets SIGTERM and SIGINT (pm2, compose, Ctrl-C).
import { describeError } from "./retry-until-ready.ts"

export interface StopSignalsOptions {
  /** The process's name in the log line of a stop during startup: "worker", "relay". */
  name: string
  log: (message: string, fields: Record<string, unknown>) => void
  /** For the line of a stop that did not finish in time. */
  logError: (message: string, fields: Record<string, unknown>) => void
  /**
   * The graceful stop: finish what is in hand, release what is held. Then the process exits
   * 0; if it throws, 1 with a line on `logError`.
   */
  stop: (signal: string) => Promise<void>
  /**
   * How long the graceful stop may take before the process exits 1 without it. Default 14 s:
   * under pm2's kill_timeout (15 s, apps/ops-local) and compose's stop_grace_period (20 s),
   * so the log says why before a SIGKILL would end the process without a word.
   */
  timeoutMs?: number
}

export interface StopSignals {
  /** From now on a signal runs the graceful stop. */
  started(): void
  /** True once a signal has arrived. */
  readonly stopping: boolean
  /**
   * Ends a start that waiting cannot mend (a refused password, a metrics port in use): one
   * line on `logError`, "<name> failed to start", then exit 1. Thrown out of a top-level
   * await it was Node's stack trace, in no log format of the process's.
   * Use: `await start().catch(signals.failedToStart)`.
   */
  failedToStart(err: unknown): never
}

/**
 * Registers the handlers before startup, which may wait minutes for a server (see
 * retryUntilReady). Until `started()` a signal ends the process at once with exit 0: nothing
 * is in hand yet. After it, the graceful stop runs once, whatever number of signals arrive,
 * and the process exits 0 when it is done, 1 if it throws (with a line on `logError`), or 1
 * after `timeoutMs` if it is not done by then: a statement that Postgres never answers (a stalled link, a lock held elsewhere) holds a stop for as
 * long, and the pool's end waits for it too. What was in hand is redone by the next process
 * (tasks by lease expiry, outbox rows by their re-publish, which the stream deduplicates).
 */
export function handleStopSignals(options: StopSignalsOptions): StopSignals {
  let isStarted = false
  let stopping = false
  const onSignal = (signal: string) => {
    if (!isStarted) {
      options.log(`${options.name} stopped while starting`, { signal })
      process.exit(0)
    }
    if (stopping) return
    stopping = true
    const timeoutMs = options.timeoutMs ?? 14_000
    setTimeout(() => {
      options.logError(
        `${options.name} did not stop within ${timeoutMs} ms; exiting without finishing`,
        {
          signal,
          hint: "a server that does not answer (Postgres, NATS, Redis, the OTLP receiver) holds what was in hand; the next process redoes it",
        },
      )
      process.exit(1)
    }, timeoutMs)
    void options.stop(signal).then(
      () => process.exit(0),
      // A stop that throws is a failed stop, said as one: unhandled, it was Node's stack trace
      // and exit 1, with no line in the process's own log format.
      (err: unknown) => {
        options.logError(`${options.name} stop failed`, {
          signal,
          error: err instanceof Error ? err.message : String(err),
        })
        process.exit(1)
      },
    )
  }
  process.on("SIGTERM", () => onSignal("SIGTERM"))
  process.on("SIGINT", () => onSignal("SIGINT"))
  return {
    started() {
      isStarted = true
    },
    get stopping() {
      return stopping
    },
    failedToStart(err) {
      options.logError(`${options.name} failed to start`, { error: describeError(err) })
      process.exit(1)
    },
  }
}
