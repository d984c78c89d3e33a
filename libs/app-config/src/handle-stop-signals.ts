// How every long-running Keyway process meets SIGTERM and SIGINT (pm2, compose, Ctrl-C).

export interface StopSignalsOptions {
  /** The process's name in the log line of a stop during startup: "worker", "relay". */
  name: string
  log: (message: string, fields: Record<string, unknown>) => void
  /** The graceful stop: finish what is in hand, release what is held. Then the process exits 0. */
  stop: (signal: string) => Promise<void>
}

export interface StopSignals {
  /** From now on a signal runs the graceful stop. */
  started(): void
  /** True once a signal has arrived. */
  readonly stopping: boolean
}

/**
 * Registers the handlers before startup, which may wait minutes for a server (see
 * retryUntilReady). Until `started()` a signal ends the process at once with exit 0: nothing
 * is in hand yet. After it, the graceful stop runs once, whatever number of signals arrive,
 * and the process exits 0 when it is done.
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
    void options.stop(signal).then(() => process.exit(0))
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
  }
}
