/**
 * Lets a worker's tasks run side by side, except those run alone: a run alone waits for the
 * runs in progress to end, and holds back those that come after it until it ends. In arrival
 * order, so that a steady flow of ordinary runs cannot keep a lone one waiting for ever.
 *
 * Why a run goes alone (drainKey, sql/0019): a task an earlier run of which was lost with its
 * worker may be a payload that kills its worker, or only a task that was in flight beside one.
 * Run alone, a death is its own, and only then is it charged for it.
 *
 * A wait is bounded by the caller's signal and by `maxWaitMs`: one handler that hangs (a
 * vendor call without a timeout) would otherwise hold a lone run back, and every run behind
 * it, for as long as it hangs.
 */
export class RunGate {
  #shared = 0
  #alone = false
  readonly #queue: { alone: boolean; admit: () => void }[] = []

  /**
   * Resolves, once the run may start, to the function that ends it; to undefined if `signal`
   * aborted or `maxWaitMs` passed first.
   */
  enter(
    alone: boolean,
    signal?: AbortSignal,
    maxWaitMs = Number.POSITIVE_INFINITY,
  ): Promise<(() => void) | undefined> {
    if (signal?.aborted) return Promise.resolve(undefined)
    if (this.#queue.length === 0 && this.#free(alone)) {
      this.#take(alone)
      return Promise.resolve(this.#leaver(alone))
    }
    return new Promise((resolve) => {
      const waiter = {
        alone,
        admit: () => {
          settle()
          resolve(this.#leaver(alone))
        },
      }
      const giveUp = () => {
        settle()
        this.#queue.splice(this.#queue.indexOf(waiter), 1)
        resolve(undefined)
        // A lone run that gave up at the head of the queue held back those behind it.
        this.#admitWaiting()
      }
      const timer = Number.isFinite(maxWaitMs) ? setTimeout(giveUp, maxWaitMs) : undefined
      signal?.addEventListener("abort", giveUp, { once: true })
      const settle = () => {
        clearTimeout(timer)
        signal?.removeEventListener("abort", giveUp)
      }
      this.#queue.push(waiter)
    })
  }

  /** Runs in progress, and waiting, for tests. */
  get size() {
    return { running: this.#shared + (this.#alone ? 1 : 0), waiting: this.#queue.length }
  }

  #free(alone: boolean) {
    return !this.#alone && (!alone || this.#shared === 0)
  }

  #take(alone: boolean) {
    if (alone) this.#alone = true
    else this.#shared++
  }

  #leaver(alone: boolean) {
    let left = false
    return () => {
      if (left) return
      left = true
      if (alone) this.#alone = false
      else this.#shared--
      this.#admitWaiting()
    }
  }

  #admitWaiting() {
    while (this.#queue.length > 0 && this.#free(this.#queue[0]!.alone)) {
      const next = this.#queue.shift()!
      this.#take(next.alone)
      next.admit()
    }
  }
}
