import { randomBytes } from "node:crypto"
import { runPipelinedTransaction } from "@keyway/db"
import {
  decodeEnvelope,
  EnvelopeError,
  type EventEnvelope,
  findEventType,
  InvalidEventError,
} from "@keyway/schemas"
import {
  type CollectedOptions,
  LATENCY_BUCKETS,
  type MetricsRegistry,
  oldestAnswerSeconds,
  perScrape,
} from "@keyway/telemetry"
import {
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
  type JsMsg,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream"
import { Match, type NatsConnection } from "@nats-io/transport-node"
import {
  context,
  propagation,
  ROOT_CONTEXT,
  type Span,
  SpanKind,
  SpanStatusCode,
  trace,
} from "@opentelemetry/api"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Schedule from "effect/Schedule"
import type { Redis } from "ioredis"
import type { Kysely } from "kysely"
import { Batcher } from "./internal/batcher.ts"
import { checkSettings } from "./internal/check-settings.ts"
import { type DurableOptions, ensureDurable } from "./internal/ensure-consumer.ts"
import {
  backlogSummary,
  boundStatements,
  type Claim,
  type Collision,
  type Completion,
  cancelVacuum,
  claimRuns,
  completeTasks,
  confirmBaselines,
  dateGaps,
  expireLeases,
  forgetPassedRewinds,
  hasProvisionalBaselines,
  type IncomingEvent,
  ingestBatch,
  type KeyRef,
  keyId,
  markFailed,
  markGap,
  nextTasks,
  type ParkedTopics,
  pruneInbox,
  pruneRejects,
  recordReject,
  renewLease,
  runnableKeys,
  runnableKeysOf,
  setRunState,
  storableText,
  type TaskRow,
  vacuumInbox,
  waitingSummary,
} from "./internal/inbox-sql.ts"
import { createRedlockKeyLock, type KeyLock } from "./internal/key-lock.ts"
import { KeyScheduler } from "./internal/key-scheduler.ts"
import { RunGate } from "./internal/run-gate.ts"
import { summariseSources } from "./internal/summarise-sources.ts"
import {
  type CompleteOptions,
  FencedError,
  type Handler,
  type HandlerContext,
  type KeyedEvent,
  PoisonError,
  type TopicPolicy,
  UncommittedError,
} from "./types.ts"

export interface KeyedConsumerLogger {
  info(message: string, fields?: Record<string, unknown>): void
  warn(message: string, fields?: Record<string, unknown>): void
  error(message: string, fields?: Record<string, unknown>): void
}

export interface KeyedConsumerConfig {
  /** The consumer group: the durable consumer's name, and the inbox's scope. */
  group: string
  stream: string
  /** Only subjects matching this reach the group. */
  filterSubject?: string
  /** Where a new group starts in the stream: every stored event, or only new ones. Default all. */
  startPosition?: "all" | "new"
  nats: NatsConnection
  /**
   * The group's database (migrated with sql/), made with @keyway/db's createDb. Its clients
   * survive Postgres ending their session while none of their statements runs (a completion
   * idle past the lease, see HandlerContext.complete); a plain pg pool's checked-out client
   * then emits an 'error' nobody listens for, which ends the process.
   */
  db: Kysely<any>
  redis: Redis
  /** By event type name. An event with no handler is dead at once. */
  handlers: Record<string, Handler>
  /** By topic; topics not listed get `defaultPolicy`. */
  policies?: Record<string, TopicPolicy>
  defaultPolicy?: TopicPolicy
  /** Polling loop period: the most a lost wake-up delays a task. Default 2 s. */
  pollIntervalMs?: number
  /** Recovery loop period. Default 5 s. */
  recoveryIntervalMs?: number
  /** Finished inbox rows older than this are deleted by the recovery loop. Default 24 h; 0 keeps them. */
  retentionMs?: number
  /**
   * Rejects (messages kept instead of run) older than this are deleted by the recovery loop.
   * Default 30 days, for an operator to find them; 0 keeps them.
   */
  rejectRetentionMs?: number
  /** How often retention runs (within the recovery loop). Default 60 s. */
  pruneIntervalMs?: number
  /**
   * Vacuum the inbox after this worker's retention has deleted this many rows. Default
   * 20,000; 0 never, for a server whose autovacuum is known to keep up.
   */
  vacuumEvery?: number
  /**
   * Key lease and lock length; heartbeated at a third of it while a key drains. Also the
   * longest a statement of a handler's local effects may take (see `ctx.complete`). Default
   * 15 s.
   */
  leaseMs?: number
  /**
   * Keys drained at once by this worker. Default 64: a drain mostly waits (on a handler's
   * external call, on Postgres), and the keys draining together share their claim,
   * completion and re-check round trips, so more of them make each event cheaper
   * (`just bench pipeline`, back to back: at 1,000 events/s p99 442 ms with 16, 162 ms with 64).
   * The benchmark, whose handler is one insert, runs 256 (bench/src/pipeline.ts says why).
   * The default stays lower because a slot is also a handler call in flight, and handlers
   * that call a vendor's API should not open hundreds of requests to it unasked.
   */
  concurrency?: number
  /** Most messages in one inbox commit. Default 256. */
  ingestBatchSize?: number
  /** How long ingest waits for more messages before committing a batch. Default 5 ms. */
  ingestLingerMs?: number
  /** Unacked messages the server lets this group have: bounds ingest memory. Default 2048. */
  maxAckPending?: number
  /**
   * How long the server waits for a delivered message's ack before it delivers it again,
   * to any worker of the group. Messages a crashed worker held wait this long, and while
   * they wait they count against maxAckPending: with 30 s, a few crashes in a row stopped
   * delivery to the whole group for half a minute. A worker that is alive but slow to ingest
   * asks for more time; a redelivery that happens anyway is dropped by the inbox's dedupe.
   * Set when the durable is created; an existing durable keeps its own. Default 10 s.
   */
  ackWaitMs?: number
  /**
   * How long stop() lets running handlers finish before aborting them. Default 8 s: with the
   * rest of a process's stop (NATS 2 s, telemetry 2 s), within the 14 s a Keyway process
   * gives its stop (handleStopSignals in @keyway/app-config). A handler that has not ended a
   * second after its abort is left running, and stop() returns: its key's lock and lease are
   * no longer renewed, and its completion, if it comes, writes nothing. Once they run out,
   * another worker may run that key's task again while the abandoned handler still runs.
   */
  shutdownGraceMs?: number
  /** Names this worker in leases and logs. Default random. */
  workerId?: string
  /**
   * Whether ingest wakes the keys it stored. Only tests turn this off, to show that the
   * polling loop alone completes every task.
   */
  wakeOnIngest?: boolean
  logger?: KeyedConsumerLogger
  /**
   * Where the consumer registers its metrics (DESIGN.md §7): its status() totals as
   * counters (keyway_consumer_done_total, …_retried_total, …_dead_total, …), the keys
   * draining now, and commit-to-done latency. No key or group labels: keys are unbounded,
   * and one process runs one group.
   */
  metrics?: MetricsRegistry
}

export interface KeyedConsumerStatus {
  ingested: number
  rejected: number
  done: number
  retried: number
  dead: number
  /** Writes refused by the fencing check: this worker had lost the key. */
  fenced: number
  /** Keys whose lock or lease was lost while draining. */
  lostKeys: number
  /**
   * Runs of a suspect, a task an earlier run of which was lost with its worker (dead, or
   * frozen past its lease), each started alone in this worker.
   */
  suspectRuns: number
  drainingKeys: number
  /** Messages received from the stream and not yet in the inbox (nor rejected). */
  ingestBuffered: number
  /** Keys this worker will wake when their task's retry is due (one timer each). */
  retriesDue: number
}

export interface KeyedConsumer {
  /**
   * Makes or checks the group's durable, then starts ingesting, polling and recovering. Calls
   * made while one is in flight share it; one that failed may be made again. A consumer once
   * stopped cannot start again: make a new one.
   */
  start(): Promise<void>
  /**
   * Stops taking work, lets each key finish its current task, releases every key. Called
   * while start() is in flight, it stops at once, and that start() starts nothing.
   */
  stop(): Promise<void>
  status(): KeyedConsumerStatus
  [Symbol.asyncDispose](): Promise<void>
}

/** A task dead because its runs alone were lost with their workers (sql/0019). */
class LostRunsError extends Error {
  override name = "LostRunsError"
}

const tracer = trace.getTracer("@keyway/keyed-consumer")
// The W3C headers the relay copies from the writer's context (@keyway/telemetry registers
// the trace-context and baggage propagators): a handler sees the writer's baggage (a tenant,
// an ERP order number) as well as its trace, and passes both on in its own calls.
const PROPAGATED_HEADERS = ["traceparent", "tracestate", "baggage"] as const

const quiet: KeyedConsumerLogger = {
  info() {},
  warn: (message, fields) => console.warn(JSON.stringify({ level: "warn", message, ...fields })),
  error: (message, fields) => console.error(JSON.stringify({ level: "error", message, ...fields })),
}
const messageOf = (err: unknown) => (err instanceof Error ? err.message : String(err))
/**
 * The inbox row of a version that arrived but could not be stored (see storeEvents): it holds
 * the key's order in place, and dies at once with its reason, under the topic's policy.
 */
const REFUSED_TYPE = "keyway.refused-at-ingest"
// Node fires a longer timer after 1 ms.
const MAX_TIMER_MS = 2 ** 31 - 1

/** Whether `err` is the abort `reason`, or an AbortError, or caused by either. */
function isAbort(err: unknown, reason: unknown): boolean {
  for (let e = err, depth = 0; e && depth < 8; e = (e as Error).cause, depth++) {
    if (e === reason || (e as Error).name === "AbortError") return true
  }
  return false
}

// What the relay writes (Date.toISOString()), and any ISO 8601 time with its zone. Postgres
// also reads "infinity", "now" and times without a zone (in the session's): the handler got
// Infinity for a date, or an hour's error.
const ISO_INSTANT = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$/

/** Why an envelope that parses must still not reach a handler, if it must not. */
function wrongInEnvelope(e: EventEnvelope): string | undefined {
  if (!ISO_INSTANT.test(e.createdAt)) {
    return `createdAt ${JSON.stringify(e.createdAt.slice(0, 40))} is not an ISO 8601 time with its zone`
  }
  // Order is per topic and key: an event under another topic than its type's would be
  // ordered with the wrong events, and handled as its type.
  const def = findEventType(e.type)
  if (def && def.topic !== e.topic) {
    return `type ${e.type} belongs to topic ${def.topic}, not ${JSON.stringify(e.topic)}`
  }
  return undefined
}
/**
 * Asks the server for more time on each message. nats.js throws at once on a connection that
 * is closed or draining (nats-core's _check): the caller's closeNats while an ingest still
 * waits on Postgres past stop()'s grace would have it thrown from the keep-alive timer, which
 * ends the process. Not seen in a test (stop() ended the flush in every try), but nothing
 * bounds that ingest. Unasked, the messages are only redelivered after ack_wait, as anyway.
 */
function askForTime(msgs: Iterable<JsMsg>): void {
  for (const m of msgs) {
    try {
      m.working()
    } catch {
      return
    }
  }
}
/** Postgres' class 22, data exception: the statement's values, not the server, are at fault. */
const refusesData = (err: unknown) =>
  typeof (err as { code?: unknown })?.code === "string" &&
  (err as { code: string }).code.startsWith("22")
const TASKS_PER_READ = 32
/** How long stop() waits, past its grace, for handlers it aborted to end. */
const AFTER_ABORT_MS = 1000
/** Most keys in one claim, completion or re-check round trip. */
const KEYS_PER_BATCH = 64
// Keys the polling loop wakes per poll, at most; the next poll goes on from the last one.
const POLL_PAGE = 1000

/**
 * The logger given, with its throws kept to itself: a log line is written from inside the
 * safety nets' loops, where a throw was a defect their repeat does not survive. A logger
 * that failed on a failed poll round (a full disk, a closed pipe) stopped the polling loop
 * for good, and lost wake-ups were never caught again.
 */
function neverThrows(logger: KeyedConsumerLogger): KeyedConsumerLogger {
  const guarded =
    (line: KeyedConsumerLogger["info"]) => (message: string, fields?: Record<string, unknown>) => {
      try {
        line.call(logger, message, fields)
      } catch {}
    }
  return { info: guarded(logger.info), warn: guarded(logger.warn), error: guarded(logger.error) }
}

/**
 * A keyed consumer group worker (DESIGN.md §5). Start as many as you like on one group: they
 * share the durable consumer, the inbox and the keys.
 */
export function createKeyedConsumer(config: KeyedConsumerConfig): KeyedConsumer {
  checkSettings(config)
  const group = config.group
  const db = config.db
  const log = neverThrows(config.logger ?? quiet)
  const leaseMs = config.leaseMs ?? 15_000
  const pollIntervalMs = config.pollIntervalMs ?? 2000
  const recoveryIntervalMs = config.recoveryIntervalMs ?? 5000
  const retentionMs = config.retentionMs ?? 24 * 3600_000
  const rejectRetentionMs = config.rejectRetentionMs ?? 30 * 24 * 3600_000
  const pruneIntervalMs = config.pruneIntervalMs ?? 60_000
  const vacuumEvery = config.vacuumEvery ?? 20_000
  const batchSize = config.ingestBatchSize ?? 256
  const lingerMs = config.ingestLingerMs ?? 5
  const graceMs = config.shutdownGraceMs ?? 8000
  const workerId = config.workerId ?? `w-${randomBytes(4).toString("hex")}`
  const wakeOnIngest = config.wakeOnIngest ?? true
  const keyLock: KeyLock = createRedlockKeyLock(config.redis)
  const stats: Omit<KeyedConsumerStatus, "drainingKeys" | "ingestBuffered" | "retriesDue"> = {
    ingested: 0,
    rejected: 0,
    done: 0,
    retried: 0,
    dead: 0,
    fenced: 0,
    lostKeys: 0,
    suspectRuns: 0,
  }
  // Created once, when first needed: jetstreamManager() makes an API round trip to check
  // JetStream is there.
  let jsm: JetStreamManager | undefined
  const manager = async () => {
    jsm ??= await jetstreamManager(config.nats)
    return jsm
  }
  const commitToDone = config.metrics?.histogram({
    name: "consumer_commit_to_done_seconds",
    help: "From the writer's enqueue to the task's done commit",
  })
  // Where a drain's time goes, for the question commit-to-done raises: waiting for a free
  // slot (concurrency too low for the load), the Redis lock, the batched claim in Postgres, or
  // the handler with its completion. Sub-millisecond buckets: on a quiet machine the lock and
  // the claim take a fraction of one.
  const drainStep = config.metrics?.histogram({
    name: "consumer_drain_step_seconds",
    help: "One step of a key's drain: wait (for a drain slot), lock, claim, run (one task: handler and completion), release",
    labels: { step: ["wait", "lock", "claim", "run", "release"] },
    buckets: [0.00025, 0.0005, ...LATENCY_BUCKETS],
  })
  // Takes the work as a function so that its synchronous part (span, schema decode, the
  // handler up to its first await) is timed too: on a busy machine that is CPU that counts.
  const timeStep = drainStep
    ? async <T>(step: "lock" | "claim" | "run" | "release", work: () => Promise<T>) => {
        const start = performance.now()
        try {
          return await work()
        } finally {
          drainStep.observe((performance.now() - start) / 1000, { step })
        }
      }
    : <T>(_step: string, work: () => Promise<T>) => work()
  // Taken off the registry by stop(): a stopped consumer cannot start again, and the one made
  // to replace it registers the same names.
  const unregisterMetrics: (() => void)[] = []
  if (config.metrics) {
    const m = config.metrics
    const collectedCounter = (o: CollectedOptions) => unregisterMetrics.push(m.collectedCounter(o))
    const collectedGauge = (o: CollectedOptions) => unregisterMetrics.push(m.collectedGauge(o))
    const totals: Record<keyof typeof stats, [name: string, help: string]> = {
      ingested: ["ingested_total", "Events stored in the inbox by this worker"],
      rejected: ["rejected_total", "Messages that were not events, recorded and acked"],
      done: ["done_total", "Tasks completed"],
      retried: ["retried_total", "Handler failures scheduled for another attempt"],
      dead: ["dead_total", "Tasks dead: attempts used up, or a poison payload"],
      fenced: ["fenced_total", "Tasks refused because another worker took the key"],
      lostKeys: ["lost_keys_total", "Drains stopped because the lock or lease was lost"],
      suspectRuns: [
        "suspect_runs_total",
        "Runs of tasks an earlier run of which was lost with its worker, each started alone",
      ],
    }
    for (const [stat, [name, help]] of Object.entries(totals)) {
      collectedCounter({
        name: `consumer_${name}`,
        help,
        collect: () => stats[stat as keyof typeof stats],
      })
    }
    collectedGauge({
      name: "consumer_draining_keys",
      help: "Keys this worker is draining now",
      collect: () => scheduler.active,
    })
    collectedGauge({
      name: "consumer_ingest_buffered",
      help: "Messages this worker received and has not yet stored in the inbox (grows while Postgres is away, up to max_ack_pending)",
      collect: () => buffer.size + ingesting,
    })
    // The group's state, not this worker's: every worker of a group reports the same values,
    // so a dashboard takes their max. Gaps and dead letters are the alerts of DESIGN.md
    // invariant 5: a key that waits on a missing version for long lost an event upstream (or
    // retention removed it); a counter of deaths per worker tells that something died, the
    // dead gauges what still waits for an operator, whichever worker saw it die.
    const waiting = perScrape(() => waitingSummary(db, group))
    const backlog = perScrape(() => backlogSummary(db, group))
    collectedGauge({
      name: "consumer_gap_keys",
      help: "Keys of the group waiting on a missing version (the group's, same from every worker)",
      collect: async () => (await waiting())?.gapKeys,
    })
    collectedGauge({
      name: "consumer_oldest_gap_seconds",
      help: "How long the group's longest-waiting gap has waited, 0 when there is none",
      collect: async () => (await waiting())?.oldestGapSeconds,
    })
    collectedGauge({
      name: "consumer_dead_tasks",
      help: "Dead tasks of the group waiting for an operator's retry or skip (the group's, same from every worker)",
      collect: async () => (await waiting())?.deadTasks,
    })
    collectedGauge({
      name: "consumer_blocked_keys",
      help: "Keys of the group stopped at a dead task: nothing later on them runs until an operator acts",
      collect: async () => (await waiting())?.blockedKeys,
    })
    collectedGauge({
      name: "consumer_pending_keys",
      help: "Keys of the group whose next task is in the inbox and waits to run, now or at its retry time",
      collect: async () => (await backlog())?.pendingKeys,
    })
    collectedGauge({
      name: "consumer_oldest_pending_seconds",
      help: "How long the group's oldest waiting next task has been in the inbox (since it arrived), 0 when none waits: grows while handlers fail or fall behind",
      collect: async () => (await backlog())?.oldestPendingSeconds,
    })
    // Undefined while there is no durable yet or NATS is unreachable: the gauge keeps its value.
    const lag = perScrape(async () => {
      const info = await (await manager()).consumers.info(config.stream, group)
      return info.num_pending + info.num_ack_pending
    })
    collectedGauge({
      name: "consumer_lag_messages",
      help: "Stream messages the group has not stored in its inbox yet: undelivered plus unacked",
      collect: lag,
    })
    // The leaf link's state as the group sees it (DESIGN.md §7): a stream sourced from another
    // site hears from each source at least every second or two while the link is up (nats-server
    // 2.9.10 sends idle heartbeats), so "since last heard" stays under a second and grows with
    // wall time from the moment the link is cut. The hub cannot count what a cut-off leaf holds,
    // so the lag reads 0 during an outage; the idle time is the signal.
    const sources = perScrape(async () =>
      summariseSources((await (await manager()).streams.info(config.stream)).sources ?? []),
    )
    collectedGauge({
      name: "stream_source_idle_seconds",
      help: "Longest time since the group's stream last heard from one of its sources (another site, over the leaf link); +Inf for a source never heard from; 0 for a stream without sources",
      collect: async () => (await sources())?.idleSeconds,
    })
    collectedGauge({
      name: "stream_source_lag_messages",
      help: "Messages the group's stream has yet to copy from its sources, as far as it can see them",
      collect: async () => (await sources())?.lag,
    })
    collectedGauge({
      name: "consumer_metrics_read_age_seconds",
      help: "Since this worker's reads for the group's gauges (gaps, dead, backlog, lag, sources) last all answered: while one fails (Postgres or NATS away, the durable missing) they keep their last values, and alerts on them see nothing",
      collect: () => oldestAnswerSeconds([waiting, backlog, lag, sources]),
    })
  }
  const js = jetstream(config.nats)
  let stopping = false
  let stopped: Promise<void> | undefined
  // Set when stop() returns with drains still running (a handler that ignored its abort):
  // they renew their keys no more, and commit nothing, once stop() has returned. (Their
  // ends still close their run and release their lock, both fenced by their epoch and token.)
  let abandoned = false
  // The `process` span of each task running now. One whose handler stop() abandons would
  // otherwise end only when that handler does, after the process has exported its last spans
  // and exited: the trace an SRE looks at for the hung call had no consumer span at all.
  const runningSpans = new Set<Span>()
  const notCompletedAtStop = () =>
    new UncommittedError("not completed: the worker stopped without it")
  // Each drain's own controller, aborted when its key is lost or when stop()'s grace runs out.
  // Not AbortSignal.any([lost, shutdown]): on Node 20 a signal made from a long-lived one stays
  // referenced by it for good (nodejs/node#55351). Measured in a loop: 4 million calls kept
  // 200 MB after a full GC, about 50 bytes each, at 16 µs a call; a worker runs a drain per key
  // per wake-up.
  const drainAborts = new Set<AbortController>()
  let shutdownReason: Error | undefined
  const retryTimers = new Map<string, { timer: NodeJS.Timeout; at: number }>()
  const gate = new RunGate()
  // Keys whose run this worker put off, by key: how many times in a row (runInTurn).
  const putOff = new Map<string, number>()
  const scheduler = new KeyScheduler(
    config.concurrency ?? 64,
    (ref, waitedMs) => {
      drainStep?.observe(waitedMs / 1000, { step: "wait" })
      return drainKey(ref)
    },
    (err, ref) =>
      log.warn("drain failed; the polling loop will retry", { ...ref, error: messageOf(err) }),
  )

  const policyOf = (topic: string) => {
    const p = { ...config.defaultPolicy, ...config.policies?.[topic] }
    return {
      maxAttempts: p.maxAttempts ?? 5,
      backoffMs: p.backoffMs ?? 200,
      maxBackoffMs: p.maxBackoffMs ?? 30_000,
      onDead: p.onDead ?? "block",
    }
  }
  const parksByDefault = config.defaultPolicy?.onDead === "park"
  const parks: ParkedTopics = {
    byDefault: parksByDefault,
    except: Object.keys(config.policies ?? {}).filter(
      (topic) => (policyOf(topic).onDead === "park") !== parksByDefault,
    ),
  }

  // One timer per key, the soonest asked for: each wake-up of a key whose task waits out its
  // retry (a later version arriving, say) drains it and asks again, and a timer per ask piled
  // up by the thousand behind an hour's Retry-After.
  const wakeLater = (ref: KeyRef, ms: number) => {
    // Once stopping, a timer would outlive stop(); the task's run_after is in the inbox, and
    // the polling loop of whichever worker runs next finds it.
    if (stopping) return
    const id = keyId(ref)
    const at = Date.now() + ms
    const pending = retryTimers.get(id)
    // Not set again for a second or less: each drain asks anew, a moment sooner each time as
    // the wait runs down (and the clocks of Postgres and this process differ).
    if (pending && pending.at <= at + 1000) return
    if (pending) clearTimeout(pending.timer)
    // Capped as Node caps it: a longer wait fired after 1 ms, and the drain it woke asked
    // again, without a pause. Woken early, the key is only held again.
    const timer = setTimeout(
      () => {
        retryTimers.delete(id)
        scheduler.release(ref)
        scheduler.wake(ref)
      },
      Math.min(ms, MAX_TIMER_MS),
    )
    retryTimers.set(id, { timer, at })
  }

  // ---- batched round trips ----------------------------------------------------------------
  // Every key this worker drains claims, completes and re-checks through these, so the keys
  // that reach the same step together share one round trip (internal/batcher.ts).

  const fulfilled = <T>(values: T[]) =>
    values.map((value): PromiseSettledResult<T> => ({ status: "fulfilled", value }))
  const claims = new Batcher<KeyRef, Claim | undefined>(
    async (refs) =>
      fulfilled(
        // Claims queued behind a Postgres slower than stop()'s bound take no key after it.
        abandoned
          ? refs.map(() => undefined)
          : await claimRuns(db, group, refs, workerId, leaseMs, TASKS_PER_READ),
      ),
    KEYS_PER_BATCH,
  )

  type Pending = Completion & {
    effects?: (trx: Kysely<any>) => Promise<unknown>
    interleave?: boolean
  }

  /**
   * One transaction for many keys' completions and their handlers' local effects. If it
   * fails as a whole (one handler's effects threw, a deadlock, a lost connection), each
   * completion is tried again in a transaction of its own, so only the one at fault fails.
   */
  const completeBatch = async (items: Pending[]): Promise<PromiseSettledResult<unknown>[]> => {
    if (abandoned) {
      const reason = notCompletedAtStop()
      return items.map(() => ({ status: "rejected", reason }))
    }
    const complete = async (q: Kysely<any>, inTransaction: boolean) => {
      // Every effect's statement within a lease. Unbounded, one effect waiting on a row held
      // elsewhere held every key of its batch: their completions uncommitted, their lease
      // renewals blocked on the same rows (so no drain noticed), their Redis locks extended,
      // stop() waiting. Past the bound the batch fails, each completion is tried alone, and
      // the one at fault fails its attempt and is retried. Sent right after the completion,
      // not awaited before the effects: no round trip of its own. After it, not before: the
      // completion's own wait for its keys is Keyway's, not the handler's, and a timeout
      // there would count against a task whose handler succeeded.
      const completing = completeTasks(q, group, items, leaseMs)
      const bounded = inTransaction ? boundStatements(q, leaseMs) : undefined
      bounded?.catch(() => {}) // the failure is the transaction's; the completion reports it
      const ok = await completing
      await bounded
      const run = async (n: number) => {
        const item = items[n]!
        if (!ok[n]) {
          throw new FencedError(
            `${item.topic}/${item.key} v${item.ver}: another worker took the key; nothing written`,
          )
        }
        return item.effects?.(q)
      }
      const results: PromiseSettledResult<unknown>[] = new Array(items.length)
      // The first effect that threw. Fenced keys wrote nothing and fail alone; an effect that
      // threw takes the shared transaction down (a failed statement aborts it for every key),
      // so it rolls back and each completion is tried again on its own, below.
      let failure: { reason: unknown } | undefined
      const settle = async (n: number) => {
        results[n] = await run(n).then(
          (value) => ({ status: "fulfilled", value }),
          (reason) => ({ status: "rejected", reason }),
        )
        if (results[n].status === "rejected" && ok[n]) failure ??= { reason: results[n].reason }
      }
      // Effects that may interleave start together and share their round trips
      // (runPipelinedTransaction). Run one after another, each cost a round trip that every
      // key of the batch waited for: at 600 events/s the drain's "run" step averaged 27 / 50 /
      // 30 ms that way, 10 / 12 / 35 ms interleaved (three rounds of `just bench pipeline`,
      // one-insert handlers). The rest run alone, after them, as their handlers expect, and
      // not at all once one has failed: the batch is done for.
      await Promise.all(items.flatMap((item, n) => (item.interleave ? [settle(n)] : [])))
      for (const [n, item] of items.entries()) {
        if (failure) break
        if (!item.interleave) await settle(n)
      }
      if (failure) throw failure.reason
      // Effects that outlasted stop() (a row lock, a wait of their own): rolled back, not
      // committed behind the caller's back. (Without effects, complete_tasks committed alone.)
      if (abandoned) throw notCompletedAtStop()
      return results
    }
    try {
      // Without local effects (a handler whose work is an external call) there is nothing to
      // commit with the completions: keyway.complete_tasks() is one statement, atomic on its
      // own, and BEGIN and COMMIT would be two more round trips per batch.
      return items.some((item) => item.effects)
        ? await runPipelinedTransaction(db, (trx) => complete(trx, true))
        : await complete(db, false)
    } catch (err) {
      if (items.length === 1) return [{ status: "rejected", reason: err }]
      // Not once stopping: the one at fault would take another lease to fail again, past
      // the grace stop() has. Which one it was is not known, so none is charged an attempt:
      // all are tried again by whoever drains their keys next.
      if (stopping) {
        const reason = new UncommittedError(
          `not completed: the batch it shared failed while the worker stopped (${messageOf(err)})`,
          { cause: err },
        )
        return items.map(() => ({ status: "rejected", reason }))
      }
      return Promise.all(items.map(async (item) => (await completeBatch([item]))[0]!))
    }
  }
  // Two batches in flight: effects that run one after another (the default) make a batch
  // take a round trip per key, and a second batch keeps completions moving meanwhile, as it
  // does past an effect stuck on a lock. With every effect interleaved, one in flight did a
  // little better (`just bench pipeline`, three rounds at 600 events/s: p99 69 / 84 / 82 ms
  // against 87 / 108 / 207; events/s 939 / 948 / 1,033 against 1,013 / 879 / 713), not
  // enough for a setting that depends on what the handlers do.
  const completions = new Batcher<Pending, unknown>(completeBatch, KEYS_PER_BATCH, 2)

  const rechecks = new Batcher<KeyRef, boolean>(
    async (refs) => fulfilled(await runnableKeysOf(db, group, parks, refs)),
    KEYS_PER_BATCH,
  )

  // ---- ingest ------------------------------------------------------------------------------

  const durable: DurableOptions = {
    stream: config.stream,
    group,
    filterSubject: config.filterSubject,
    startPosition: config.startPosition ?? "all",
    ackWaitMs: config.ackWaitMs ?? 10_000,
    maxAckPending: config.maxAckPending ?? 2048,
    pullBatch: batchSize * 2,
  }
  // The live durable's, read each time it is ensured: one made earlier keeps its own.
  let ackWaitMs = durable.ackWaitMs

  // By stream sequence: a message the server redelivers while its first copy still waits here
  // (Postgres away for longer than ack_wait) replaces that copy instead of queueing beside it,
  // so an outage of any length holds at most the consumer's max_ack_pending messages. The
  // latest copy is kept: its ack is the one the server expects.
  const buffer = new Map<number, JsMsg>()
  // The batch being stored: out of the buffer, not yet acked.
  let ingesting = 0
  let inFlight: JsMsg[] = []
  // Messages of a durable that was deleted while they were being stored: their acks would go
  // to the new durable of the same name, and nats-server 2.9.10 takes an ack whose delivery
  // sequence is next after its ack floor as its own, moving the floor to the old message's
  // stream sequence, which the settling of where keys start trusts (confirmBaselines).
  const unackable = new WeakSet<JsMsg>()
  let flushing: Promise<void> | undefined

  type Reject = { streamSeq: number; subject: string; reason: string; data: Uint8Array }

  /** Splits a batch into events and messages that are not events at all (no key to wait on). */
  const toIncoming = (msgs: JsMsg[]): { events: IncomingEvent[]; rejects: Reject[] } => {
    const events: IncomingEvent[] = []
    const rejects: Reject[] = []
    for (const m of msgs) {
      try {
        const e = decodeEnvelope(m.data)
        const carrier: Record<string, string> = {}
        for (const h of PROPAGATED_HEADERS) {
          // Matched as HTTP's header names are: a publisher may write `Traceparent`.
          const v = m.headers?.get(h, Match.IgnoreCase)
          if (v) carrier[h] = v
        }
        const incoming: IncomingEvent = {
          topic: e.topic,
          key: e.key,
          ver: e.ver,
          eventId: e.id,
          type: e.type,
          payload: JSON.stringify(e.payload ?? null),
          trace: carrier.traceparent ? JSON.stringify(carrier) : null,
          createdAt: e.createdAt,
          streamSeq: m.seq,
        }
        const wrong = wrongInEnvelope(e)
        if (!wrong) {
          events.push(incoming)
          continue
        }
        // An event of its key and version, with a value no handler should be given: its
        // version's place is held, dead with the reason, as for a value Postgres refuses.
        events.push(placeholderFor(incoming, wrong, true))
        rejects.push({ streamSeq: m.seq, subject: m.subject, reason: wrong, data: m.data })
        log.warn("rejected an event", { subject: m.subject, seq: m.seq, reason: wrong })
      } catch (err) {
        // Kept for an operator; the rest of the batch goes through.
        rejects.push({ streamSeq: m.seq, subject: m.subject, reason: messageOf(err), data: m.data })
        // An event whose place is known (only its payload's bytes are bad) holds it, dead with
        // the reason: its key's next version then waits behind a dead task its policy
        // governs, listed with why, not behind a gap no listing explains.
        const place = err instanceof EnvelopeError ? err.place : undefined
        if (place) {
          const incoming: IncomingEvent = {
            topic: place.topic,
            key: place.key,
            ver: place.ver,
            eventId: place.id,
            type: place.type,
            payload: "null",
            trace: null,
            createdAt: "",
            streamSeq: m.seq,
          }
          events.push(placeholderFor(incoming, messageOf(err)))
        }
        log.warn(place ? "rejected an event" : "rejected a message that is not an event", {
          subject: m.subject,
          seq: m.seq,
          error: messageOf(err),
        })
      }
    }
    return { events, rejects }
  }

  /**
   * Stores events in the inbox. A value that passed the envelope's schema but that Postgres
   * refuses (a createdAt it cannot read as a time, a NUL in a string, a number past bigint)
   * would fail the whole batch on every retry and hold up the group behind it. So on such a
   * refusal each event is stored alone, and those refused become rejects, each replaced in
   * `events` by a placeholder that holds its version's place: a retry after a lost
   * connection stores the placeholder and does not reject the event twice.
   */
  // By identity, not by type: an event that arrives with the placeholder's type name is
  // still an event, and its refusal is recorded like any other's.
  const placeholders = new WeakSet<IncomingEvent>()

  /**
   * What holds a refused event's version in its key: dead at its first run, with `reason`.
   * With `keepTrace`, in the event's trace, where an SRE following the writer finds why it
   * died: for a refusal of the envelope, not of Postgres, which may have been of the trace.
   */
  const placeholderFor = (e: IncomingEvent, reason: string, keepTrace = false): IncomingEvent => {
    const placeholder: IncomingEvent = {
      ...e,
      eventId: storableText(e.eventId),
      type: REFUSED_TYPE,
      payload: JSON.stringify({ type: storableText(e.type), reason }),
      // A NUL in a header would have Postgres refuse the placeholder too.
      trace: keepTrace && !e.trace?.includes("\\u0000") ? e.trace : null,
      createdAt: new Date().toISOString(),
    }
    placeholders.add(placeholder)
    return placeholder
  }
  const storeEvents = async (
    events: IncomingEvent[],
    rejects: Reject[],
    msgs: JsMsg[],
    rejected: Set<number>,
  ): Promise<KeyRef[]> => {
    const bySeq = new Map(msgs.map((m) => [m.seq, m]))
    // The inbox keeps the event it has; the other is kept as a reject, where an operator sees
    // it, rather than acked and gone. Found again on a retry, it is recorded once.
    const keepCollisions = (collisions: Collision[]) => {
      for (const { streamSeq, reason } of collisions) {
        const m = bySeq.get(streamSeq)!
        if (rejected.has(streamSeq)) continue
        rejected.add(streamSeq)
        rejects.push({ streamSeq, subject: m.subject, reason, data: m.data })
        log.warn("rejected an event that collides with another", {
          subject: m.subject,
          seq: m.seq,
          reason,
        })
      }
    }
    try {
      const { woken, collisions } = await ingestBatch(db, group, events)
      keepCollisions(collisions)
      return woken
    } catch (err) {
      if (!refusesData(err) || events.length === 0) throw err
    }
    const woken: KeyRef[] = []
    for (let n = 0; n < events.length; n++) {
      const e = events[n]!
      try {
        const stored = await ingestBatch(db, group, [e])
        keepCollisions(stored.collisions)
        woken.push(...stored.woken)
      } catch (err) {
        if (!refusesData(err)) throw err
        if (placeholders.has(e)) {
          // The placeholder refused as well: the refused value is the key's own (a NUL in
          // it). No version of that key can be stored, and the rejects are all there is.
          events.splice(n--, 1)
          continue
        }
        const m = bySeq.get(e.streamSeq)!
        const reason = `Postgres refuses a value in it: ${messageOf(err)}`
        rejects.push({ streamSeq: m.seq, subject: m.subject, reason, data: m.data })
        // Its placeholder keeps its id: met at a version another event holds, it is this
        // message again, and this reason is the one to keep.
        rejected.add(m.seq)
        log.warn("rejected an event Postgres refuses", { subject: m.subject, seq: m.seq, reason })
        // Its version still takes its place in the key, or the next one would run as if it
        // had come first. The placeholder replaces the event in `events`, and is tried next:
        // a retry after a lost connection stores it then, and records the reject once. It
        // carries none of the event's own text that may hold the refused value.
        events[n--] = placeholderFor(e, reason)
      }
    }
    return woken
  }

  const ingest = async (msgs: JsMsg[]) => {
    const { events, rejects } = toIncoming(msgs)
    // Stream sequences of this batch kept as rejects: each is recorded and counted once.
    const rejected = new Set<number>()
    for (let attempt = 0; ; attempt++) {
      try {
        const woken = events.length > 0 ? await storeEvents(events, rejects, msgs, rejected) : []
        // Each reject is recorded once, even if a statement here fails and all is retried.
        while (rejects.length > 0) {
          await recordReject(db, group, rejects[0]!)
          rejects.shift()
          stats.rejected++
        }
        // Acked only after the inbox commit: a crash before this point means redelivery,
        // and the inbox drops what it already has.
        for (const m of msgs) if (!unackable.has(m)) m.ack()
        stats.ingested += events.filter(
          (e) => !placeholders.has(e) && !rejected.has(e.streamSeq),
        ).length
        if (wakeOnIngest) for (const ref of woken) scheduler.wake(ref)
        return
      } catch (err) {
        if (stopping) return // unacked: redelivered to another worker after ack_wait
        log.warn("inbox insert failed; retrying", { error: messageOf(err), attempt })
        // This worker still has them, and those waiting behind them: the server should not
        // hand them to another yet.
        askForTime(msgs)
        askForTime(buffer.values())
        await new Promise((r) => setTimeout(r, Math.min(5000, 100 * 2 ** attempt)))
      }
    }
  }

  /** Stores what the buffer holds, a batch at a time, until it is empty. */
  const flush = async () => {
    // Linger a moment before the first commit of a burst. Without it a consumer that keeps
    // up commits nearly every message on its own, and an inbox commit costs far more than a
    // row: at 1,000 events/s a few ms of linger turns hundreds of commits into dozens.
    if (lingerMs > 0 && buffer.size < batchSize) await new Promise((r) => setTimeout(r, lingerMs))
    // Alive but slow (waiting on a key's lock, or a batch stored one event at a time), this
    // worker asks for more time before ack_wait: otherwise the server hands the batch and
    // everything behind it to other workers, whose inserts then wait on this one's
    // uncommitted rows. One timer for the whole flush, not one per batch: batches each quicker
    // than half an ack_wait never let theirs fire, while the messages behind several of them
    // waited longer than an ack_wait (a catch-up on a loaded Postgres) and were handed out
    // again.
    const keepAlive = setInterval(
      () => {
        askForTime(inFlight)
        askForTime(buffer.values())
      },
      Math.min(ackWaitMs / 2, MAX_TIMER_MS),
    )
    try {
      while (buffer.size > 0) {
        const batch: JsMsg[] = []
        for (const [seq, msg] of buffer) {
          if (batch.length === batchSize) break
          batch.push(msg)
          buffer.delete(seq)
        }
        ingesting = batch.length
        inFlight = batch
        try {
          await ingest(batch)
        } finally {
          ingesting = 0
          inFlight = []
        }
      }
    } finally {
      clearInterval(keepAlive)
    }
  }

  const onMessage = (m: JsMsg) => {
    buffer.set(m.seq, m)
    flushing ??= (async () => {
      try {
        await flush()
      } catch (err) {
        // Not the inbox's (ingest retries those): unacked, the batch comes back after
        // ack_wait, and the next message starts a new flush.
        log.error("ingest stopped on an unexpected error", { error: messageOf(err) })
      } finally {
        flushing = undefined
      }
    })()
  }

  // One consume() session; resolves when it ends (stopped, heartbeats missed, consumer gone).
  const consumeSession = Effect.acquireUseRelease(
    Effect.tryPromise(async () => {
      // Every session, not only start(): a durable deleted under a running group (by hand, or
      // lost with a server's state) would otherwise fail every session after for good. Made
      // again from the start of the stream, it redelivers what the stream holds; the inbox
      // drops what it has, and every version at or below a key's done_ver (0007). A group
      // that starts at new events cannot be made again without losing what the old durable
      // had not delivered, nor from the start without running history it chose to skip:
      // that is an operator's call, so it stays down and says so.
      if (durable.startPosition === "all") {
        const ensured = await ensureDurable(await manager(), durable)
        ackWaitMs = ensured.ackWaitMs
        if (ensured.created) {
          log.warn("the group's durable consumer was gone; created it again", { group })
        }
      }
      const consumer = await js.consumers.get(config.stream, group).catch((err) => {
        if (
          durable.startPosition === "new" &&
          err instanceof JetStreamApiError &&
          err.code === JetStreamApiCodes.ConsumerNotFound
        ) {
          throw new Error(
            `the group's durable consumer ${group} is gone, and the group starts at new events: an operator must create it again (from where it stopped) before this worker can ingest`,
          )
        }
        throw err
      })
      return consumer.consume({ max_messages: durable.pullBatch, callback: onMessage })
    }),
    (messages) =>
      Effect.promise(async () => {
        // nats.js keeps retrying a pull whose heartbeats stopped; a fresh consume() after a
        // server restart recovers faster (reference/nats-2.9.md rule 10).
        void (async () => {
          for await (const s of messages.status()) {
            if (s.type === "heartbeats_missed" && s.count >= 2) {
              log.warn("no heartbeat from the server for two intervals; consuming afresh", {
                group,
              })
              messages.stop()
            }
            // nats.js goes on pulling from a durable that is gone; the next session makes it
            // again. Not-found once may be a server still loading its state.
            if (s.type === "consumer_deleted") {
              // Their acks would go to the new durable of the same name (see unackable),
              // which delivers them again anyway: none are sent, for those in the buffer and
              // for the batch being stored alike.
              buffer.clear()
              for (const m of inFlight) unackable.add(m)
              messages.stop()
            }
            if (s.type === "consumer_not_found" && s.count >= 2) messages.stop()
          }
        })()
        // The reason nats.js gave up, if it did: said by the loop below, not dropped.
        const ended = await messages.closed()
        if (ended instanceof Error) throw ended
      }),
    (messages) => Effect.sync(() => messages.stop()),
  )
  // Sessions that fail one after another (a durable refused, NATS away) are started again
  // after 0.5, 1, 2, 4, then every 5 s: a line a second or two for as long as it lasts was
  // noise, and 5 s is as long as a server that is back waits for us.
  let sessionFailures = 0
  let sessionStartedAt = 0
  const ingestLoop = Effect.forever(
    Effect.sync(() => {
      sessionStartedAt = Date.now()
    }).pipe(
      Effect.andThen(consumeSession),
      Effect.andThen(
        Effect.sync(() => {
          sessionFailures = 0
        }),
      ),
      Effect.catchCause((cause) =>
        Effect.sync(() => {
          // One that ran a while failed on its own: its restart is not one of a series.
          if (Date.now() - sessionStartedAt > 10_000) sessionFailures = 0
          sessionFailures++
          log.warn("consume ended; restarting", { error: String(cause) })
        }),
      ),
      Effect.andThen(
        Effect.suspend(() =>
          Effect.sleep(Math.min(5000, 500 * 2 ** Math.max(0, sessionFailures - 1))),
        ),
      ),
    ),
  )

  // ---- drain -------------------------------------------------------------------------------

  // deferred: not started, and the key is to be tried again later (runInTurn).
  // held: dead, parked, and its key waits until the time its failure asked for.
  type Outcome = "done" | "retry" | "dead" | "held" | "fenced" | "stopped" | "deferred"
  /** A drain's hold on its key, as its handlers see it (HandlerContext). */
  type KeyHold = Pick<HandlerContext, "signal" | "throwIfLost"> & {
    /** Whether this worker stalled past the key's lease (asked now, as throwIfLost does). */
    stalled(): boolean
  }

  const runTask = async (
    ref: KeyRef,
    task: TaskRow,
    claim: Claim,
    hold: KeyHold,
    /**
     * A run lost alone used up its attempts: dead without running, through here so that its
     * span, markFailed and the counts are those of any other death.
     */
    exhausted: boolean,
  ): Promise<Outcome> => {
    const { signal } = hold
    const epoch = claim.epoch
    const policy = policyOf(ref.topic)
    // From the root, not from whatever context the drain runs in: a task carries its own
    // trace or starts one.
    const parent = task.trace ? propagation.extract(ROOT_CONTEXT, task.trace) : ROOT_CONTEXT
    const span = tracer.startSpan(
      `process ${ref.topic}`,
      {
        kind: SpanKind.CONSUMER,
        attributes: {
          "messaging.system": "nats",
          "messaging.operation.type": "process",
          "messaging.destination.name": config.stream,
          "messaging.consumer.group.name": group,
          "messaging.message.id": task.event_id,
        },
      },
      parent,
    )
    runningSpans.add(span)
    // Once stop() has ended it (a run abandoned), the span takes nothing more: the SDK would
    // report each call on an ended span as trouble, in every late shutdown.
    const markSpan = (mark: (live: Span) => void) => {
      if (runningSpans.has(span)) mark(span)
    }
    // The completion once complete() has sent it. Until it settles nobody knows whether the
    // task is done: a handler that throws (or returns) while it is in flight, one that did not
    // await it, must not have the task marked failed, or completed a second time, meanwhile.
    let completion: Promise<unknown> | undefined
    let returned = false
    /** How the completion that complete() sent ended, once it has; "none" if none was sent. */
    const completionOutcome = async () =>
      (await completion?.then(
        () => "committed" as const,
        (err) => (err instanceof UncommittedError ? ("abandoned" as const) : ("failed" as const)),
      )) ?? "none"
    const ctx: HandlerContext = {
      eventId: task.event_id,
      fencing: { epoch, version: task.ver },
      signal,
      // The hold is the drain's, which may have gone on to a later version: a call this
      // handler left running after it returned must not count the key as still its own.
      throwIfLost: () => {
        if (returned) {
          throw new Error(
            `the handler for ${ref.topic}/${ref.key} v${task.ver} has returned: the key is no longer held for it`,
          )
        }
        hold.throwIfLost()
      },
      span,
      complete: <T>(effects: (trx: Kysely<any>) => Promise<T>, options?: CompleteOptions) => {
        if (completion) {
          return Promise.reject(new Error("complete() was already called for this event"))
        }
        if (returned) {
          // The task was completed, or failed, without these effects; it cannot take them
          // now. Said in the log as well: a handler that did not await complete() may not
          // look at its rejection either.
          const err = new Error(
            `complete() was called after the handler for ${ref.topic}/${ref.key} v${task.ver} had returned: its effects were not written (await complete() in the handler)`,
          )
          log.error("effects not written: complete() after the handler returned", {
            ...ref,
            ver: task.ver,
          })
          return Promise.reject(err)
        }
        completion = completions.submit({
          ...ref,
          ver: task.ver,
          epoch,
          // Bound to this task's span: the batch runs every key's effects from whichever
          // caller pumped it, and a follow-up event enqueued here stores the active trace.
          effects: context.bind(trace.setSpan(parent, span), effects),
          interleave: options?.interleave ?? false,
        })
        const result = completion as Promise<T>
        // Its outcome is waited for below; a handler that left it unawaited must not crash the
        // process with an unhandled rejection.
        result.catch(() => {})
        return result
      },
    }
    try {
      if (exhausted) {
        throw new LostRunsError(
          `its attempts (${task.attempts} of ${policy.maxAttempts}) are used up, the last by a run alone lost with its worker, which died or froze past its lease (a payload that crashes its worker?); dead rather than run again`,
        )
      }
      if (task.type === REFUSED_TYPE) {
        throw new PoisonError(`refused at ingest: ${(task.payload as { reason: string }).reason}`)
      }
      const handler = config.handlers[task.type]
      const def = findEventType(task.type)
      if (!handler || !def) {
        throw new PoisonError(`no ${def ? "handler" : "schema"} for event type ${task.type}`)
      }
      let payload: unknown
      try {
        payload = def.decode(task.payload)
      } catch (err) {
        if (err instanceof InvalidEventError) throw new PoisonError(err.message, { cause: err })
        throw err
      }
      const wrongKey = def.wrongKey(ref.key, payload)
      if (wrongKey) throw new PoisonError(`invalid ${task.type} event: ${wrongKey}`)
      const event: KeyedEvent = {
        id: task.event_id,
        topic: ref.topic,
        key: ref.key,
        ver: task.ver,
        type: task.type,
        payload,
        createdAt: task.created_at,
        attempt: task.attempts + 1,
      }
      if (claim.supersededBy !== undefined && claim.supersededBy > task.ver) {
        event.supersededBy = claim.supersededBy
      }
      try {
        await context.with(trace.setSpan(parent, span), () => handler(event, ctx))
      } finally {
        returned = true
      }
      await (completion ?? completions.submit({ ...ref, ver: task.ver, epoch }))
      stats.done++
      return "done"
    } catch (err) {
      const outcome = await completionOutcome()
      const completed = outcome === "committed"
      if (err instanceof FencedError) {
        stats.fenced++
        markSpan((live) => live.setStatus({ code: SpanStatusCode.ERROR, message: err.message }))
        return "fenced"
      }
      // By stop(): whatever the handler threw once told to give up. By the loss of the key:
      // only the abort itself; a handler that failed on its own meanwhile is charged as ever.
      // By a stall of this worker past the lease, whatever failed then (a completion whose
      // session Postgres ended, idle past the lease; the stalling handler's own failure): the
      // run is left open, and its next claim charges it only if it ran alone (sql/0019),
      // never the tasks beside the cause.
      const cutShort =
        hold.stalled() ||
        (signal.aborted && (shutdownReason !== undefined || isAbort(err, signal.reason)))
      if (!completed && (cutShort || err instanceof UncommittedError || outcome === "abandoned")) {
        // Cut short, not failed: by stop(), by the loss of the key's lock or lease (a Redis or
        // Postgres blip, another worker now holding the key), or in a batch given up while
        // stopping. The task stays pending with its attempts as they were, for whichever
        // worker takes the key next. Counting it would let a handler slower than the grace
        // period, or one running through a flapping Redis, die for what was not its failure.
        markSpan((live) => live.setStatus({ code: SpanStatusCode.ERROR, message: messageOf(err) }))
        // Unless it says when to come back (retryAfterMs): a vendor call it had sent and gave
        // up on, which the vendor may still apply (the ESL worker's AIMS push). Taken at once
        // by the next worker, the next version's call could land first, and this one over it.
        // Held until then, still uncharged. Fenced, and nothing, when another worker holds
        // the key already; nor once stop() has returned without this drain (its caller may
        // have closed the pool).
        const holdMs = retryAfterOf(err)
        if (holdMs > 0 && !abandoned) {
          await markFailed(db, group, ref, task.ver, epoch, {
            error: `cut short, held for what it sent: ${messageOf(err)}`.slice(0, 2000),
            retryInMs: holdMs,
            holdMs,
            dead: false,
            moveOn: false,
            charge: false,
            keepRun: hold.stalled(),
          }).catch((e) =>
            log.warn("could not hold a task cut short; the next worker may run it at once", {
              ...ref,
              ver: task.ver,
              error: messageOf(e),
            }),
          )
        }
        return "stopped"
      }
      if (completed) {
        // Done is committed; what failed after it cannot be retried by us.
        log.warn("handler threw after completing", { ...ref, ver: task.ver, error: messageOf(err) })
        stats.done++
        return "done"
      }
      markSpan((live) => {
        live.recordException(err as Error)
        live.setStatus({ code: SpanStatusCode.ERROR, message: messageOf(err) })
      })
      const poison = err instanceof PoisonError
      const lost = err instanceof LostRunsError
      const dead = poison || lost || task.attempts + 1 >= policy.maxAttempts
      // Exponential backoff with full jitter: retries of many keys failing together (a vendor
      // outage) spread out instead of arriving in waves.
      const cap = Math.min(policy.maxBackoffMs, policy.backoffMs * 2 ** task.attempts)
      const retryInMs = Math.max(Math.round(cap / 2 + (Math.random() * cap) / 2), retryAfterOf(err))
      const reason = poison ? `poison: ${messageOf(err)}` : messageOf(err)
      // A failure that says when to come back says it of the key, not only of this version: a
      // vendor's Retry-After holds for the next version's call too, and a request given up
      // without an answer may still be applied until then (the ESL worker's AIMS push), over
      // a next version sent sooner. So a task that dies parked with it holds its key until
      // then, and the key moves past it after.
      const holdMs = dead && policy.onDead === "park" ? retryAfterOf(err) : 0
      const ok = await markFailed(db, group, ref, task.ver, epoch, {
        error: reason.slice(0, 2000),
        retryInMs: dead ? holdMs : retryInMs,
        holdMs: retryAfterOf(err),
        dead,
        moveOn: policy.onDead === "park" && holdMs === 0,
        // The claim charged its lost runs already.
        charge: !lost,
      })
      if (!ok) {
        stats.fenced++
        return "fenced"
      }
      if (dead) {
        stats.dead++
        log.warn("event dead", { ...ref, ver: task.ver, policy: policy.onDead, reason })
        if (holdMs === 0) return "dead"
        wakeLater(ref, holdMs)
        return "held"
      }
      stats.retried++
      wakeLater(ref, retryInMs)
      return "retry"
    } finally {
      // Ended already if stop() abandoned this run.
      if (runningSpans.delete(span)) span.end()
    }
  }

  /**
   * Runs a task in its turn at the gate (internal/run-gate.ts): a suspect, one of whose runs
   * was lost with its worker (sql/0019), alone and marked so, or dead at once if a run lost
   * alone used up its attempts. "stopped" when it did not start or was cut short, "deferred"
   * when the wait for its turn ran out.
   */
  const runInTurn = async (
    ref: KeyRef,
    task: TaskRow,
    claim: Claim,
    hold: KeyHold,
    suspect: boolean,
  ): Promise<Outcome> => {
    const { signal } = hold
    if (suspect && task.attempts >= policyOf(ref.topic).maxAttempts) {
      return runTask(ref, task, claim, hold, true)
    }
    // A suspect waits a lease at most for the runs in progress to end, and then runs alone for
    // a lease at most: a run queued behind it waits up to both.
    const turn = await gate.enter(suspect, signal, suspect ? leaseMs : 2 * leaseMs)
    if (!turn) {
      if (signal.aborted || stopping) return "stopped"
      // The runs ahead outlasted the wait (a handler that hangs): the key is given back, rather
      // than hold every run behind it meanwhile, and this worker leaves it alone for a lease,
      // then two, four, up to eight while its turn does not come (at most that long, on a
      // worker alone in its group, after the hang ends). Woken by the next poll, a
      // suspect stood at the head of the gate again at once, and a hung run kept the worker
      // from starting any other for as long as it hung. Other workers take the key meanwhile.
      const k = keyId(ref)
      const times = Math.min((putOff.get(k) ?? 0) + 1, 4)
      putOff.set(k, times)
      scheduler.hold(ref)
      const forMs = leaseMs * 2 ** (times - 1)
      // A run that hangs is worth an operator's look: said each time the key is put off.
      log.warn("a key's turn did not come behind a run in progress; put off", {
        ...ref,
        ver: task.ver,
        forMs,
      })
      wakeLater(ref, forMs)
      return "deferred"
    }
    if (putOff.size > 0) putOff.delete(keyId(ref))
    // Alone for a lease at most: a suspect whose handler hangs must not hold the worker's
    // every other run back. Its run stays marked alone: a death after that is still charged
    // to it, and the tasks that joined it are suspects, never charged.
    const sharing = suspect ? setTimeout(() => turn.share(), leaseMs) : undefined
    try {
      // The wait may have outlasted the worker, or the key.
      if (stopping || signal.aborted) return "stopped"
      if (suspect) {
        if (!(await setRunState(db, group, ref, task.ver, claim.epoch, "alone"))) {
          stats.fenced++
          return "fenced"
        }
        stats.suspectRuns++
      }
      return await timeStep("run", () => runTask(ref, task, claim, hold, false))
    } finally {
      clearTimeout(sharing)
      turn.end()
    }
  }

  /** Re-checks still in flight, for stop() to wait on before the caller closes the database. */
  const pendingRechecks = new Set<Promise<void>>()
  async function drainKey(ref: KeyRef): Promise<void> {
    if (stopping) return
    const lock = await timeStep("lock", () =>
      keyLock.tryAcquire(`keyway:${group}:${ref.topic}:${ref.key}`, leaseMs),
    )
    if (!lock) return
    if (stopping) {
      // stop() began while the lock was on its way: claiming now would bump the key's epoch
      // for a drain that runs nothing.
      await lock.release()
      return
    }
    let epoch: number | undefined
    // The version of which the claim opened a run (sql/0019), until an outcome (done, a
    // failure, fenced) ends that run. If it never starts, or is cut short, the drain closes
    // it at its end: left open, the next claim would take it for lost with its worker. Unless
    // this worker stalled past the lease meanwhile: then it is left open on purpose, run or
    // not (as a death would leave it).
    let owed: number | undefined
    let finished = false
    // Put off for a lease by the gate: no re-check wakes it before then.
    let deferred = false
    const aborter = new AbortController()
    const signal = aborter.signal
    drainAborts.add(aborter)
    let closed = false
    // Losing either one is not fatal to correctness (fencing is), but another worker may now
    // take the key, so the drain stops early rather than be fenced later. A beat that returns
    // after the drain ended (clearInterval does not stop one in flight) counts no loss.
    const lose = (what: string) => {
      if (closed || signal.aborted) return
      stats.lostKeys++
      aborter.abort(new Error(`${what} lost`))
    }
    // When the heartbeat last ran. Late by more than a third of the lease, with the lock run
    // out, it says that this process stalled: its event loop blocked (a long render, a GC
    // pause) or the process stopped.
    let lastBeat = performance.now()
    // The key was lost to such a stall. Its run is then left open and the lease no longer
    // renewed, so that the next claim counts the run lost with its worker (sql/0019), as a
    // worker's death: closed, a handler that stalled its worker past the lease every time ran
    // again at each poll, cut short and never charged, and its key never moved.
    let stalled = false
    const loseIfStalled = () => {
      if (closed || lock.timeLeft() > 0) return false
      if (performance.now() - lastBeat > (2 * leaseMs) / 3) stalled = true
      lose("lock")
      return true
    }
    // The heartbeat finds a lost lock only when it runs. A handler stalled in its own code past
    // the lock's expiry resumes where it was, before any timer: it would send its vendor call
    // after the key's next holder had sent a later version's. The lock's own reckoning knows
    // at once (HeldLock.timeLeft). The Postgres lease need not be asked: the Redis lock alone
    // keeps other workers off the key (a claim does not wait for the lease).
    const hold: KeyHold = {
      signal,
      stalled: () => {
        loseIfStalled()
        return stalled
      },
      throwIfLost: () => {
        loseIfStalled()
        signal.throwIfAborted()
        // The drain is over (a handler that did not await its call): the lock is released.
        if (closed) throw new Error(`the key ${ref.topic}/${ref.key} is no longer held`)
      },
    }
    // The Redis lock and the Postgres lease are renewed each on its own, one renewal of each
    // in flight at a time. Awaited together, a lease renewal stuck on a busy pool or a row
    // lock held the lock's next extension back until the lock expired, and another worker
    // took the key while this one still ran its handler. The lock is extended from the start,
    // not only once the claim has answered: a slow claim must not outlast it either.
    let extending = false
    let renewing: Promise<unknown> | undefined
    const heartbeat = setInterval(() => {
      if (closed || abandoned || stalled) return
      // A process that stalled resumes with this beat due: the lock has run out meanwhile.
      if (!signal.aborted && loseIfStalled()) return
      lastBeat = performance.now()
      if (!extending) {
        extending = true
        void lock.extend(leaseMs).then((locked) => {
          extending = false
          if (!locked) lose("lock")
        })
      }
      if (epoch !== undefined && !renewing) {
        // A renewal that failed (Postgres busy or away) has not lost the lease: the next beat
        // tries again, and a completion after another worker took the key is fenced anyway.
        // Counted as lost, a blip aborted every handler in flight, vendor calls halfway.
        renewing = renewLease(db, group, ref, epoch, leaseMs)
          .catch(() => true)
          .then((leased) => {
            renewing = undefined
            if (!leased) lose("lease")
          })
      }
    }, leaseMs / 3)
    try {
      const claimed = await timeStep("claim", () => claims.submit(ref))
      if (!claimed) return
      epoch = claimed.epoch
      // No longer a suspect (done elsewhere, or retried): a later put-off starts afresh.
      if (putOff.size > 0 && !claimed.suspect) putOff.delete(keyId(ref))
      let next = claimed.doneVer + 1
      let tasks = claimed.tasks
      if (claimed.runOpened) owed = next
      drain: while (!stopping && !signal.aborted && tasks.length > 0) {
        for (const task of tasks) {
          if (task.ver !== next) {
            // Version `next` is missing while a later one is here: a gap. Wait for it; the
            // next ingest and the polling loop wake the key again.
            await markGap(db, group, ref, epoch)
            break drain
          }
          // Dead under `block`: the key waits until an operator acts.
          if (task.state === "dead" && policyOf(ref.topic).onDead !== "park") break drain
          // Dead parked, or skipped since, and held until the time its failure asked for
          // (runTask): its call may still land until then.
          if ((task.state === "dead" || task.state === "skipped") && task.wait_ms > 0) {
            wakeLater(ref, Number(task.wait_ms))
            break drain
          }
          if (task.state !== "pending") {
            // Finished already and met again because an operator rewound the key (a retry or
            // a redrive below it), or skipped ahead of time: consume it without running. A
            // dead task of a `park` topic stays dead, as when it died.
            if (!(await advanceOver(ref, task, epoch))) break drain
            next++
            continue
          }
          if (task.wait_ms > 0) {
            wakeLater(ref, Number(task.wait_ms))
            break drain
          }
          const suspect = task.ver === owed && claimed.suspect
          const outcome = await runInTurn(ref, task, claimed, hold, suspect)
          if (outcome === "stopped" || outcome === "deferred") {
            deferred = outcome === "deferred"
            break drain
          }
          if (task.ver === owed) owed = undefined
          if (outcome === "done") {
            // The origin's clock and this host's: see the relay's publish time.
            commitToDone?.observe(Math.max(0, Date.now() - task.created_at.getTime()) / 1000)
          }
          if (outcome === "done" || (outcome === "dead" && policyOf(ref.topic).onDead === "park")) {
            next++
            if (stopping || signal.aborted) break drain
            continue
          }
          // Fenced: another worker holds the key now; it is not ours to wake again.
          if (outcome === "fenced") aborter.abort(new Error("fenced"))
          break drain
        }
        if (tasks.length < TASKS_PER_READ) break
        tasks = await nextTasks(db, group, ref, next, TASKS_PER_READ)
      }
      finished = !signal.aborted
    } finally {
      closed = true
      drainAborts.delete(aborter)
      clearInterval(heartbeat)
      if (stalled && epoch !== undefined) {
        // A renewal sent before the stall and answered after it would make the lease look
        // alive to the next claim, which would then take the key for only changed hands.
        await renewing
        // Ended now, epoch-fenced: the next claim finds it lapsed.
        await renewLease(db, group, ref, epoch, 0).catch(() => {})
        if (owed !== undefined) {
          log.warn(
            "this worker stalled past the key's lease; the key's next claim counts the run lost with its worker",
            { ...ref, ver: owed },
          )
        }
      } else if (owed !== undefined && epoch !== undefined) {
        await setRunState(db, group, ref, owed, epoch, null).catch((err) =>
          log.warn("closing a run cut short failed; the next claim counts it lost", {
            ...ref,
            ver: owed,
            error: messageOf(err),
          }),
        )
      }
      await timeStep("release", () => lock.release())
    }
    // A wake-up that found the key locked while we held it is ours to honour. The re-check
    // does not hold the drain slot: with every slot taken, woken keys queued behind drains
    // that had finished their work and only waited on this round trip. A drain of the key
    // that is due, or that starts before the answer comes, claims after our release and
    // re-checks after its own, so it sees whatever this re-check would: waking the key for
    // it again would only add an empty drain.
    if (finished && !deferred && !stopping && !scheduler.isDue(ref)) {
      const check = rechecks.submit(ref).then(
        (runnable) => {
          if (runnable) scheduler.wakeIfIdle(ref)
        },
        (err) =>
          log.warn("re-check failed; the polling loop will retry", {
            ...ref,
            error: messageOf(err),
          }),
      )
      pendingRechecks.add(check)
      void check.finally(() => pendingRechecks.delete(check))
    }
  }

  /** Moves the key past a task an operator skipped, without running it. False if fenced. */
  const advanceOver = (ref: KeyRef, task: TaskRow, epoch: number) =>
    completions.submit({ ...ref, ver: task.ver, epoch }).then(
      () => true,
      (err) => {
        if (err instanceof FencedError) return false
        throw err
      },
    )

  // ---- safety nets -------------------------------------------------------------------------

  // Where the polling loop's next page of runnable keys starts: each poll takes the keys after
  // the last one woken, so every runnable key comes round however many there are.
  let pollAfter: KeyRef | undefined
  // A round of a safety net still in hand when stop() interrupts its loop: Effect lets go of
  // the promise at once, but its statements go on, and stop() waits for them (within its
  // grace) so that nothing of this consumer runs on the database once it has returned.
  const roundsInHand = new Set<Promise<void>>()
  const round = (work: () => Promise<void>) =>
    Effect.tryPromise(() => {
      const running = work()
      const forget = () => roundsInHand.delete(running)
      roundsInHand.add(running)
      void running.then(forget, forget)
      return running
    })
  const pollOnce = round(async () => {
    // Settling starts needs NATS (the group's ack floor); waking keys needs only Postgres.
    // With NATS away, tasks already in the inbox must still be found.
    try {
      if (await hasProvisionalBaselines(db, group)) {
        const info = await (await manager()).consumers.info(config.stream, group)
        await confirmBaselines(db, group, info.ack_floor.stream_seq)
      }
    } catch (err) {
      log.warn("settling where keys start failed; the next poll tries again", {
        error: messageOf(err),
      })
    }
    const page = await runnableKeys(db, group, parks, POLL_PAGE, pollAfter)
    pollAfter = page.length === POLL_PAGE ? page.at(-1) : undefined
    for (const ref of page) scheduler.wake(ref)
  })
  let nextPruneAt = 0
  let prunedSinceVacuum = 0
  let vacuuming: Promise<void> | undefined
  let vacuumPid: number | undefined
  const recoverOnce = round(async () => {
    const expired = await expireLeases(db, group, parks)
    if (expired.length > 0) log.info("released expired leases", { keys: expired.length })
    for (const ref of expired) scheduler.wake(ref)
    // Their failures must not cost the round its retention, as below.
    const tryInRound = (what: string, work: () => Promise<unknown>) =>
      work().catch((err) =>
        log.warn(`${what} failed; the next round tries again`, { error: messageOf(err) }),
      )
    await tryInRound("dating gaps", () => dateGaps(db, group))
    await tryInRound("forgetting passed rewinds", () => forgetPassedRewinds(db, group))
    // Retention rides on the recovery loop: the inbox must not grow with history
    // (DESIGN.md invariant 6).
    if (Date.now() < nextPruneAt) return
    nextPruneAt = Date.now() + pruneIntervalMs
    if (rejectRetentionMs > 0) {
      // Its failure must not cost the inbox its retention round.
      await pruneRejects(db, group, rejectRetentionMs, 1000).then(
        (gone) => gone > 0 && log.info("deleted rejects past their retention", { rejects: gone }),
        (err) => log.warn("deleting old rejects failed", { error: messageOf(err) }),
      )
    }
    if (retentionMs > 0) {
      const pruned = await pruneInbox(db, group, retentionMs, 1000)
      if (pruned > 0) log.info("pruned finished inbox rows", { pruned })
      prunedSinceVacuum += pruned
      // In the background: the recovery loop must not wait on it to release expired leases.
      // Not once stopping: a prune that outlived stop()'s interruption must not start one
      // that nothing waits for.
      if (vacuumEvery > 0 && prunedSinceVacuum >= vacuumEvery && !vacuuming && !stopping) {
        prunedSinceVacuum = 0
        vacuuming = vacuumInbox(db, (pid) => {
          vacuumPid = pid
          return !stopping
        })
          .catch((err) => {
            if (!stopping) log.warn("inbox vacuum failed", { error: messageOf(err) })
          })
          .finally(() => {
            vacuuming = undefined
            vacuumPid = undefined
          })
      }
    }
  })
  const every = (ms: number, what: string, once: Effect.Effect<void, unknown>) =>
    once.pipe(
      Effect.catchCause((cause) =>
        Effect.sync(() => log.warn(`${what} failed`, { error: String(cause) })),
      ),
      Effect.repeat(Schedule.spaced(ms)),
    )

  let fibers: Fiber.Fiber<unknown, unknown>[] = []
  let starting: Promise<void> | undefined

  return {
    start() {
      // Its drains, timers and gate are done with for good once stop() has run.
      if (stopping) {
        return Promise.reject(
          new Error(`keyed consumer ${group}: start() after stop(); make a new consumer`),
        )
      }
      starting ??= (async () => {
        try {
          const durableInfo = await ensureDurable(await manager(), durable)
          // stop() came while the durable was on its way (NATS slow, the process told to go):
          // it found nothing running, and returned. Forked now, the loops would run on after
          // it, on a database and connections the caller is closing.
          if (stopping) return
          ackWaitMs = durableInfo.ackWaitMs
        } catch (err) {
          if (stopping) return // the caller's stop() closed what the start was waiting on
          starting = undefined
          throw err
        }
        fibers = [
          Effect.runFork(ingestLoop),
          Effect.runFork(every(pollIntervalMs, "polling loop", pollOnce)),
          Effect.runFork(every(recoveryIntervalMs, "recovery loop", recoverOnce)),
        ]
        log.info("keyed consumer started", { group, workerId })
      })()
      return starting
    },
    stop() {
      // One stop, shared: a second call (a signal handler's, then `await using`'s dispose)
      // returned at once, and its caller closed the pool and Redis under drains still
      // finishing: their completions failed, and their locks were left to expire.
      stopped ??= stopOnce()
      return stopped
    },
    status: () => ({
      ...stats,
      drainingKeys: scheduler.active,
      ingestBuffered: buffer.size + ingesting,
      retriesDue: retryTimers.size,
    }),
    [Symbol.asyncDispose]() {
      return this.stop()
    },
  }

  async function stopOnce(): Promise<void> {
    stopping = true
    // Runs waiting for their turn were not started: they end now, not after the grace.
    gate.close()
    await Effect.runPromise(Fiber.interruptAll(fibers))
    // Each key finishes the task in hand, each safety-net round and the ingest its
    // statements in hand; handlers still running after the grace period are told to give
    // up through their AbortSignal. One deadline for all: the process gives its whole stop
    // 14 s (handleStopSignals), and pm2 kills one that takes longer than 15 s.
    const grace = setTimeout(() => {
      shutdownReason = new Error("shutting down")
      for (const drain of drainAborts) drain.abort(shutdownReason)
    }, graceMs)
    let deadlineTimer: NodeJS.Timeout | undefined
    const deadline = new Promise((r) => {
      deadlineTimer = setTimeout(r, graceMs)
    })
    // A handler that does not end once aborted (a vendor call without a timeout, its signal
    // unheard) held stop() for as long as it ran, and its caller's shutdown with it: given a
    // moment after the abort, then abandoned (see `abandoned`): its lock and lease are no
    // longer renewed, and its completion, if it comes, writes nothing.
    let lateTimer: NodeJS.Timeout | undefined
    const late = new Promise<"late">((r) => {
      lateTimer = setTimeout(() => {
        abandoned = true
        r("late")
      }, graceMs + AFTER_ABORT_MS)
    })
    await Promise.race([flushing, deadline])
    for (const { timer } of retryTimers.values()) clearTimeout(timer)
    const [, drained] = await Promise.all([
      Promise.race([Promise.allSettled(roundsInHand), deadline]),
      Promise.race([scheduler.stop(), late]),
    ])
    clearTimeout(lateTimer)
    if (drained === "late") {
      log.error("stopped with handlers still running: they did not end when aborted", {
        drainingKeys: scheduler.active,
        afterMs: graceMs + AFTER_ABORT_MS,
      })
      for (const span of runningSpans) {
        span.setAttribute("keyway.abandoned", true)
        span.setStatus({
          code: SpanStatusCode.ERROR,
          message: "abandoned at stop: the handler did not end when aborted",
        })
        span.end()
      }
      runningSpans.clear()
    }
    clearTimeout(deadlineTimer)
    await Promise.all(pendingRechecks)
    clearTimeout(grace)
    // A vacuum of a large inbox can outlast any shutdown budget (pm2 kills after 15 s); the
    // next one picks up where this one stopped.
    if (vacuumPid !== undefined) await cancelVacuum(db, vacuumPid).catch(() => {})
    await vacuuming
    for (const unregister of unregisterMetrics.splice(0)) unregister()
  }
}

// A server that says when to come back (HTTP 429 or 503 with Retry-After) is asking every
// client to wait that long: retrying sooner only spends attempts. Bounded, so that a wrong
// header cannot park a key for days.
const MAX_RETRY_AFTER_MS = 3_600_000
function retryAfterOf(err: unknown): number {
  const v = (err as { retryAfterMs?: unknown } | null)?.retryAfterMs
  return typeof v === "number" && Number.isFinite(v) && v > 0 ? Math.min(v, MAX_RETRY_AFTER_MS) : 0
}
