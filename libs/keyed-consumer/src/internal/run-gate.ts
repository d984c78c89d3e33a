/**
 * Lets a worker's tasks run side by side, except those run alone: a run alone waits for the
 * runs in progress to end, and holds back those that come after it until it ends. In arrival
 * order, so that a steady flow of ordinary runs cannot keep a lone one waiting for ever.
 *
 * Why a run goes alone (drainKey, sql/0019): a task an earlier run of which was lost with its
 * worker may be a payload that kills its worker, or only a task that was in flight beside one.
 * Run alone, a death is its own, and only then is it charged for it.
 *
 * A wait is bounded by the caller's signal and by `maxWaitMs`, and a lone run may share its
 * turn once it has run long enough (Turn.share): one handler that hangs (a vendor call without
 * a timeout) would otherwise hold every other run of the worker back for as long as it hangs.
 */
export interface Turn {
  /** The run ended. */
  end(): void
  /** A lone run lets others run beside it from now on. */
  share(): void
}

export class RunGate {
  #shared = 0
  #alone = false
  #closed = false
  readonly #queue: { alone: boolean; admit: () => void; giveUp: () => void }[] = []

  /**
   * Resolves, once the run may start, to its turn; to undefined if `signal` aborted, or
   * `maxWaitMs` passed, or the gate closed first.
   */
  enter(
    alone: boolean,
    signal?: AbortSignal,
    maxWaitMs = Number.POSITIVE_INFINITY,
  ): Promise<Turn | undefined> {
    if (signal?.aborted || this.#closed) return Promise.resolve(undefined)
    if (this.#queue.length === 0 && this.#free(alone)) {
      this.#take(alone)
      return Promise.resolve(this.#turn(alone))
    }
    return new Promise((resolve) => {
      const giveUp = () => {
        settle()
        const at = this.#queue.indexOf(waiter)
        if (at < 0) return
        this.#queue.splice(at, 1)
        resolve(undefined)
        // A lone run that gave up at the head of the queue held back those behind it.
        this.#admitWaiting()
      }
      const waiter = {
        alone,
        admit: () => {
          settle()
          resolve(this.#turn(alone))
        },
        giveUp,
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

  /** Sends every waiting run away, and any that comes later: the worker is stopping. */
  close() {
    this.#closed = true
    for (const waiter of [...this.#queue]) waiter.giveUp()
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

  #turn(alone: boolean): Turn {
    let ended = false
    return {
      end: () => {
        if (ended) return
        ended = true
        if (alone) this.#alone = false
        else this.#shared--
        this.#admitWaiting()
      },
      share: () => {
        if (ended || !alone) return
        alone = false
        this.#alone = false
        this.#shared++
        this.#admitWaiting()
      },
    }
  }

  #admitWaiting() {
    if (this.#closed) return
    while (this.#queue.length > 0 && this.#free(this.#queue[0]!.alone)) {
      const next = this.#queue.shift()!
      this.#take(next.alone)
      next.admit()
    }
  }
}
