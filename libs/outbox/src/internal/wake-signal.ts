/**
 * A level-triggered wake-up: notify() before wait() is not lost, and many notify() calls
 * between two waits count once (like NOTIFY itself, which Postgres coalesces).
 */
export class WakeSignal {
  private pending = false
  private waiter: (() => void) | undefined

  notify(): void {
    this.pending = true
    this.waiter?.()
  }

  /** Resolves on the next notify (or at once if one is pending), after `ms`, or on abort. */
  wait(ms: number, signal?: AbortSignal): Promise<void> {
    if (this.pending) {
      this.pending = false
      return Promise.resolve()
    }
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer)
        signal?.removeEventListener("abort", done)
        this.waiter = undefined
        this.pending = false
        resolve()
      }
      const timer = setTimeout(done, ms)
      signal?.addEventListener("abort", done, { once: true })
      this.waiter = done
    })
  }
}
