import type { Span } from "@opentelemetry/api"
import type { Kysely } from "kysely"

/** An event as a handler sees it: its payload already decoded against its schema. */
export interface KeyedEvent<P = unknown> {
  /** `<site>:<seq>`: use it as the idempotency key of external calls. */
  id: string
  topic: string
  key: string
  ver: number
  type: string
  payload: P
  /** When the writer enqueued it. */
  createdAt: Date
  /** 1 on the first try. A run lost with its worker while it ran alone counts as a try. */
  attempt: number
  /**
   * Set when a later version of this key had already run to done before this one ran: an
   * operator's retry of a dead task (on a `park` topic the key moved past it) or redrive of
   * a range rewound the key below that version, which is then stepped over, not run again. A
   * handler whose every task carries the key's whole state (a label's image, a device's
   * settings) can return without acting, so as not to put an older state back over a newer
   * one; a handler of changes (a stock movement) acts as usual.
   */
  supersededBy?: number
}

/** The fencing token: external systems that can compare it reject a stale worker. */
export interface FencingToken {
  epoch: number
  version: number
}

export interface HandlerContext {
  eventId: string
  fencing: FencingToken
  /**
   * Fires when this worker lost the key (lock or lease) or is shutting down. Throwing the
   * abort (its reason, or an AbortError) then costs the event no attempt; throwing an error
   * of the handler's own counts as a failure.
   */
  signal: AbortSignal
  /**
   * Throws, at once, if this worker may no longer hold the key: the signal fired, or the
   * lock's expiry has passed by this process's clock though no heartbeat has noticed yet (the
   * event loop stalled: a long render, a GC pause, the process stopped). Call it right before an
   * external call whose late arrival would do harm, one that overwrites what a later version
   * sets (a label's image): the key's next holder may have sent that version's call already.
   * It throws the signal's reason, which costs the event no attempt.
   *
   * It narrows the window to the call itself; it cannot close it. A request already on its way
   * when the process froze, or delayed in the network past the lease, can still arrive after
   * the next holder's, and a virtual machine paused whole may resume with its clock where it
   * was: only a vendor that checks the fencing token can refuse those.
   *
   * A worker that stalled past the lease treats the key as lost with it (sql/0019): the task
   * that was running then runs alone next time, and a stall while alone is charged.
   */
  throwIfLost(): void
  /** The `process <topic>` span, child of the writer's and the relay's. */
  span: Span
  /**
   * Runs `effects` in the transaction that marks the event done, so local effects happen
   * exactly once (DESIGN.md invariant 3). Call it after any slow external call, never around
   * one: the transaction holds the key's row lock. It throws {@link FencedError} if another
   * worker took the key meanwhile, and then nothing of `effects` is committed. If the handler
   * never calls it, the event is marked done when the handler returns.
   *
   * The transaction may be shared with other keys' completions (one commit for many events).
   * If it fails as a whole, each completion runs again in a transaction of its own, so
   * `effects` may run more than once: it must only write through `trx`, never act outside it.
   * Each of its statements may take at most the group's `leaseMs` (a statement_timeout): one
   * waiting longer, on a lock say, fails the attempt, which is retried with backoff. Nor may
   * the transaction sit idle between them that long (idle_in_transaction_session_timeout):
   * Postgres then ends its session, and the rows it locked go with it.
   *
   * It throws {@link UncommittedError} when a stopping worker gave up the shared transaction
   * (nothing written, no attempt counted), and an Error when called after the handler
   * returned: await it in the handler.
   */
  complete<T>(effects: (trx: Kysely<any>) => Promise<T>, options?: CompleteOptions): Promise<T>
}

export interface CompleteOptions {
  /**
   * Lets `effects` run at the same time as other keys' effects that allow it, in the shared
   * transaction, so that their statements share round trips: a batch of one-insert effects
   * then costs a few round trips instead of one each. Default false: effects run one after
   * another.
   *
   * Only for effects whose statements stand alone: inserts, and updates that compute in SQL
   * (`set n = n + 1`). Not for an effect that reads a row and then writes what it read, when
   * another key's effect may write that row: in one transaction no row lock keeps them apart,
   * and one update would be lost. Nor for effects that rely on session state (`set local`,
   * `lastval()`).
   */
  interleave?: boolean
}

export type Handler<P = any> = (event: KeyedEvent<P>, ctx: HandlerContext) => Promise<void>

/** What happens to a key when one of its events is dead (retries exhausted, or poison). */
export type DeadPolicy = "block" | "park"

export interface TopicPolicy {
  /**
   * Tries before an event is dead. Default 5. A failure of the handler is a try, and so is a
   * run lost with its worker while it ran alone: a payload that kills the process running it
   * (out of memory, a native crash, an event loop blocked past the lease) is dead after this
   * many such deaths, plus the first (plus two if a task of its key ran before it in the same
   * drain), instead of taking every worker down in turn. A task whose run was lost runs alone
   * in its worker until it is done or an operator retries it, so that a death is known to be
   * its own: the tasks in flight beside a killer are never charged for it (sql/0019). A run
   * cut short by stop() or by the loss of the key from a live worker is not a try.
   */
  maxAttempts?: number
  /** First retry delay; doubles each time, with jitter. Default 200 ms. */
  backoffMs?: number
  /** Longest retry delay. Default 30 s. */
  maxBackoffMs?: number
  /**
   * `block` (default): the key stops at the dead event until an operator retries or skips it.
   * `park`: the key moves on; the dead event stays listed. It is never in the way again: a
   * retry of an earlier version rewinds the key, and the drain passes it still dead. A last
   * failure that carries `retryAfterMs` holds the key until then, and it moves on after: the
   * next version's call must not come sooner either (see {@link PoisonError}).
   * A dead task does not record the policy it died under: changing a topic from `block` to
   * `park` (in any one worker of the group) lets the keys already stopped at its dead tasks
   * move on, with those tasks left dead and listed, as if they had died parked.
   */
  onDead?: DeadPolicy
}

/** Thrown by `ctx.complete` when this worker no longer holds the key. */
export class FencedError extends Error {
  override name = "FencedError"
}

/**
 * Thrown by `ctx.complete` when the worker, stopping, gave up the completion batch the task
 * shared with other keys: nothing of it was written, and the task is not charged an attempt.
 */
export class UncommittedError extends Error {
  override name = "UncommittedError"
}

/**
 * Throw from a handler for input that no retry can fix: the event is dead at once, with
 * this message as the reason.
 *
 * Any other error is retried with the topic's backoff. One that carries a numeric
 * `retryAfterMs` (a vendor's Retry-After, say) is retried no sooner than that, up to an hour.
 * If it was the last attempt, under policy `park`, the key's next version waits as long.
 */
export class PoisonError extends Error {
  override name = "PoisonError"
}
