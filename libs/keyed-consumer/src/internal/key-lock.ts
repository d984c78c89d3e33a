import type { Redis } from "ioredis"
import Redlock from "redlock"

/**
 * What the consumer needs from a distributed lock. It is kept this small so the redlock
 * package stays replaceable: its npm releases have had bugs around expired locks and
 * extension (5.0.0-beta.2, pinned, is covered by test/key-lock.test.ts).
 */
export interface KeyLock {
  /**
   * Takes the lock if free; never waits for its holder. Null when someone else holds it, or
   * when Redis does not answer within a third of `ttlMs`.
   */
  tryAcquire(resource: string, ttlMs: number): Promise<HeldLock | null>
}

export interface HeldLock {
  /**
   * Pushes the expiry to `ttlMs` from now; false if the lock was already lost, or if Redis
   * does not answer before the lock expires.
   */
  extend(ttlMs: number): Promise<boolean>
  /** Best effort: an expired or lost lock releases nothing and does not throw. */
  release(): Promise<void>
  /**
   * Milliseconds until the lock expires by this process's monotonic clock, counted from when
   * its last successful acquire or extension was sent, less redlock's allowance for clock
   * drift; 0 or less once it may have expired, and after release(). Known without asking
   * Redis: a process whose event loop stalled, or that was stopped, reads it correctly the
   * moment it resumes, before any timer or answer. Not a virtual machine paused whole: its
   * monotonic clock may not count the pause, and only the fencing epoch covers that.
   */
  timeLeft(): number
}

// Every call gives up once its answer could no longer help, whatever the ioredis client's
// settings: with its defaults a command waits through twenty reconnect attempts, and on a link
// that loses packets without a reset (no RST, no FIN) until TCP gives up, many minutes. A drain
// waiting on Redis holds a drain slot, and this worker drains its key no more until the call
// returns. An extension or a release is worth waiting for only while the lock lives; a lock
// granted after a third of its ttl would start its holder on a lock a third gone, from a
// Redis that slow.
const within = <T>(ms: number, promise: Promise<T>, onTimeout: T): Promise<T> => {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<T>((resolve) => {
    timer = setTimeout(() => resolve(onTimeout), Math.max(0, ms))
  })
  return Promise.race([promise, late]).finally(() => clearTimeout(timer))
}

// redlock's own allowance (driftFactor 0.01, plus 2 ms), deducted from our reckoning too.
const DRIFT_FACTOR = 0.01
const validUntil = (sentAt: number, ttlMs: number) =>
  sentAt + ttlMs - Math.round(DRIFT_FACTOR * ttlMs) - 2

export function createRedlockKeyLock(redis: Redis): KeyLock {
  // retryCount 0: a held key means another worker is draining it, and waiting would only
  // tie up one of our drain slots. That worker re-checks the key after releasing it, when its
  // drain finished; one that ended early (its lock or lease lost, fenced, stopped) leaves the
  // key to the polling loop.
  const redlock = new Redlock([redis], { retryCount: 0, driftFactor: DRIFT_FACTOR })
  // redlock emits 'error' for failed votes; without a listener node would throw them.
  redlock.on("error", () => {})
  return {
    async tryAcquire(resource, ttlMs) {
      // Taken before the request: Redis starts the ttl when the request arrives, later.
      const sentAt = performance.now()
      const acquiring = redlock.acquire([resource], ttlMs).catch(() => null)
      const lock = await within(ttlMs / 3, acquiring, null)
      if (!lock) {
        // Given up on: a lock granted after all is nobody's, so hand it back rather than
        // leave the key locked for a ttl.
        void acquiring.then((late) => late?.release().catch(() => {}))
        return null
      }
      let held = lock
      // Not redlock's `expiration`, which is reckoned on the wall clock (Date.now()), which
      // can step.
      let until = validUntil(sentAt, ttlMs)
      let released = false
      const timeLeft = () => until - performance.now()
      return {
        async extend(ttl) {
          const sent = performance.now()
          // extend() returns a new Lock and leaves the old one's expiration stale, so keep the
          // new one; it throws on a lock that has expired even if nobody else took it.
          const extended = await within(
            timeLeft(),
            held.extend(ttl).catch(() => null),
            null,
          )
          // Released meanwhile (an extension's answer after release() was sent): not ours.
          if (!extended || released) return false
          held = extended
          until = validUntil(sent, ttl)
          return true
        },
        async release() {
          // Expired or taken over, or Redis gone: nothing of ours to release, and the key's
          // lock expires with its ttl.
          const left = timeLeft()
          released = true
          until = Number.NEGATIVE_INFINITY
          await within(
            left,
            held.release().catch(() => {}),
            undefined,
          )
        },
        timeLeft,
      }
    },
  }
}
