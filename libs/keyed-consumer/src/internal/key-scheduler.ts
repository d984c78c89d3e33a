import { keyId as id, type KeyRef } from "./inbox-sql.ts"

/**
 * Runs `drain` for woken keys, at most `concurrency` at once and never twice at once for one
 * key. A key woken while it drains is drained again right after: its new event may have
 * arrived after the drain looked for it. `drain` is told how long the key waited for a free
 * slot, from its wake-up or, for a key woken while it drained, from that drain's end.
 */
export class KeyScheduler {
  /** Woken keys waiting for a slot, with the time (`now()`) they started waiting. */
  private readonly queued = new Map<string, { ref: KeyRef; since: number }>()
  private readonly running = new Map<string, Promise<void>>()
  private readonly again = new Set<string>()
  private readonly held = new Set<string>()
  private stopped = false

  constructor(
    private readonly concurrency: number,
    private readonly drain: (ref: KeyRef, waitedMs: number) => Promise<void>,
    private readonly onError: (err: unknown, ref: KeyRef) => void,
    /** The clock waits are measured on, in ms. Tests pass one they move by hand. */
    private readonly now: () => number = () => performance.now(),
  ) {}

  wake(ref: KeyRef): void {
    const k = id(ref)
    if (this.stopped || this.held.has(k)) return
    if (this.running.has(k)) this.again.add(k)
    else if (!this.queued.has(k)) this.queued.set(k, { ref, since: this.now() })
    this.pump()
  }

  /**
   * Drops the key's wake-ups until release(), those already taken in too: a key put off for a
   * while must not be drained by the next poll or ingest that wakes it, nor again right after
   * the drain running now because a poll woke it meanwhile.
   */
  hold(ref: KeyRef): void {
    const k = id(ref)
    this.held.add(k)
    this.again.delete(k)
    this.queued.delete(k)
  }

  release(ref: KeyRef): void {
    this.held.delete(id(ref))
  }

  /** Whether a drain of the key will start after the one running now: it was woken meanwhile. */
  isDue(ref: KeyRef): boolean {
    const k = id(ref)
    return this.again.has(k) || this.queued.has(k)
  }

  /** Wakes the key unless a drain of it is running or waiting to start. */
  wakeIfIdle(ref: KeyRef): void {
    const k = id(ref)
    if (!this.running.has(k) && !this.queued.has(k)) this.wake(ref)
  }

  get active(): number {
    return this.running.size
  }

  /** Stops starting drains and waits for the running ones. */
  async stop(): Promise<void> {
    this.stopped = true
    this.queued.clear()
    while (this.running.size > 0) await Promise.allSettled([...this.running.values()])
  }

  private pump(): void {
    while (!this.stopped && this.running.size < this.concurrency && this.queued.size > 0) {
      const [k, { ref, since }] = this.queued.entries().next().value as [
        string,
        { ref: KeyRef; since: number },
      ]
      this.queued.delete(k)
      const run = this.drain(ref, this.now() - since)
        .catch((err) => this.onError(err, ref))
        // onError logs, through a logger the caller supplied: one that throws must not become
        // an unhandled rejection, which ends the process.
        .catch(() => {})
        .finally(() => {
          this.running.delete(k)
          if (this.again.delete(k)) this.queued.set(k, { ref, since: this.now() })
          this.pump()
        })
      this.running.set(k, run)
    }
  }
}
