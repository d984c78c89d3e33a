/**
 * Lets a worker's tasks run side by side, except those run alone: a run of one waits for the
 * runs in progress to end, and holds back those that come after it until it ends. In arrival
 * order, so that a steady flow of ordinary runs cannot keep a lone one waiting for ever.
 *
 * Why a run goes alone (drainKey): a task an earlier run of which was lost with its worker may
 * be a payload that kills its worker. Every task in flight when a worker dies loses its run,
 * and charging each of them would let one such payload kill the tasks of the keys around it.
 * Run alone, the next death is the suspect's own.
 */
export class RunGate {
  #shared = 0
  #alone = false
  readonly #queue: { alone: boolean; enter: () => void }[] = []

  async run<T>(alone: boolean, work: () => Promise<T>): Promise<T> {
    if (this.#queue.length > 0 || !this.#free(alone)) {
      await new Promise<void>((enter) => this.#queue.push({ alone, enter }))
    } else {
      this.#take(alone)
    }
    try {
      return await work()
    } finally {
      if (alone) this.#alone = false
      else this.#shared--
      this.#admit()
    }
  }

  /** Runs in progress, and waiting, for tests and status. */
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

  #admit() {
    while (this.#queue.length > 0 && this.#free(this.#queue[0]!.alone)) {
      const next = this.#queue.shift()!
      this.#take(next.alone)
      next.enter()
    }
  }
}
