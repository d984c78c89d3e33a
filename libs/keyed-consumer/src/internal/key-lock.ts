import type { Redis } from "ioredis"
import Redlock, { type Lock } from "redlock"

/**
 * What the consumer needs from a distributed lock. It is kept this small so the redlock
 * package stays replaceable: its npm releases have had bugs around expired locks and
 * extension (5.0.0-beta.2, pinned, is covered by test/key-lock.test.ts).
 */
export interface KeyLock {
  /** Takes the lock if free; never waits. Null when someone else holds it. */
  tryAcquire(resource: string, ttlMs: number): Promise<HeldLock | null>
}

export interface HeldLock {
  /** Pushes the expiry to `ttlMs` from now; false if the lock was already lost. */
  extend(ttlMs: number): Promise<boolean>
  /** Best effort: an expired or lost lock releases nothing and does not throw. */
  release(): Promise<void>
}

export function createRedlockKeyLock(redis: Redis): KeyLock {
  // retryCount 0: a held key means another worker is draining it, and waiting would only
  // tie up one of our drain slots. That worker re-checks the key after releasing it.
  const redlock = new Redlock([redis], { retryCount: 0, driftFactor: 0.01 })
  // redlock emits 'error' for failed votes; without a listener node would throw them.
  redlock.on("error", () => {})
  return {
    async tryAcquire(resource, ttlMs) {
      let lock: Lock
      try {
        lock = await redlock.acquire([resource], ttlMs)
      } catch {
        return null
      }
      return {
        async extend(ttl) {
          // extend() returns a new Lock and leaves the old one's expiration stale, so keep the
          // new one; it throws on a lock that has expired even if nobody else took it.
          try {
            lock = await lock.extend(ttl)
            return true
          } catch {
            return false
          }
        },
        async release() {
          try {
            await lock.release()
          } catch {
            // Expired or taken over: nothing of ours to release.
          }
        },
      }
    },
  }
}
