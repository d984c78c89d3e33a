import {
  createKeyedConsumer,
  type HandlerContext,
  type KeyedConsumer,
  type KeyedConsumerLogger,
  type KeyedConsumerStatus,
  type KeyedEvent,
  PoisonError,
  type TopicPolicy,
} from "@keyway/keyed-consumer"
import {
  EslLabelPages,
  type EslLabelPagesPayload,
  EslLabelRender,
  type EslLabelRenderPayload,
} from "@keyway/schemas"
import type { MetricsRegistry } from "@keyway/telemetry"
import type { NatsConnection } from "@nats-io/transport-node"
import { trace } from "@opentelemetry/api"
import type { Redis } from "ioredis"
import type { Kysely } from "kysely"
import {
  type AimsClient,
  type AimsClientConfig,
  AimsError,
  createAimsClient,
} from "./aims-client.ts"
import {
  type DrawnLabel,
  imageDigest,
  migrateDrawnPages,
  pushKey,
  readDrawn,
  recordDrawn,
} from "./drawn-pages.ts"
import { RenderError, renderLabel, requireFont } from "./render-label.ts"

export interface EslWorkerConfig {
  db: Kysely<any>
  nats: NatsConnection
  redis: Redis
  stream: string
  /** Consumer group. Default `esl-worker`. */
  group?: string
  /**
   * Only this subject reaches the group, e.g. `cloud.esl.label` (`<origin site>.<topic>`).
   * Without it the group gets the whole stream, and events of other topics have no handler
   * here: dead at once.
   */
  filterSubject?: string
  aims: AimsClientConfig | AimsClient
  /** Retry and dead-letter policy of topic `esl.label`; see {@link ESL_LABEL_POLICY}. */
  policy?: TopicPolicy
  concurrency?: number
  leaseMs?: number
  pollIntervalMs?: number
  recoveryIntervalMs?: number
  workerId?: string
  metrics?: MetricsRegistry
  logger?: KeyedConsumerLogger
}

export interface EslWorker {
  start(): Promise<void>
  stop(): Promise<void>
  status(): KeyedConsumerStatus
  [Symbol.asyncDispose](): Promise<void>
}

/**
 * Topic `esl.label`'s policy. `park`, not `block`: every task carries the label's whole
 * content as of its commit, and draws every page that differs from what was last drawn, so
 * the next version supersedes a dead one completely; blocking
 * would leave a label showing an old price until an operator acts, for no gain in
 * correctness. The dead task stays listed (admin listDead) and counted.
 *
 * An operator's retry of a dead task (admin retry) pushes it only if no later version of the
 * label is done (KeyedEvent.supersededBy): otherwise its older image would replace the newer
 * one. Done, not pushed: a later version skipped by an operator, or dead after AIMS took a
 * push whose answer timed out, may be on the shelf and does not count.
 *
 * Dead is for good, though: a label is not written again until its product changes again, so
 * a version given up during an AIMS outage leaves the old price on the shelf. The attempts
 * therefore outlast an outage of hours, as graphile-worker's 25 attempts (about 3 days) and
 * Sidekiq's (about 3 weeks) outlast theirs: 25 attempts, doubling from 200 ms to 10 minutes,
 * wait between 67 and 134 minutes in all (each wait is drawn between half its cap and the
 * cap), longer where AIMS sends Retry-After. Ten attempts capped at 30 s, as before, gave up
 * after 40-80 s: a review's AIMS outage of 75 s left 187 of 200 labels on the old price.
 */
export const ESL_LABEL_POLICY: Required<TopicPolicy> = {
  maxAttempts: 25,
  backoffMs: 200,
  maxBackoffMs: 600_000,
  onDead: "park",
}

const tracer = trace.getTracer("@keyway/esl-worker")

/**
 * The ESL worker: a keyed consumer on `esl.label` that renders each task's pages and pushes
 * those that changed to AIMS.
 *
 * Upgrade the workers before the writers: a worker of a release before pages has no handler
 * for `esl.label.pages.v2`, and each such task would be dead at once.
 *
 * A page is pushed when its image differs from the one this group last pushed for it. A
 * label whose images AIMS lost (replaced, reset, another store's) is drawn again by a label
 * job binding its pages again: the new job id in their footers makes new images.
 */
export function createEslWorker(config: EslWorkerConfig): EslWorker {
  requireFont()
  const aims = "pushImage" in config.aims ? config.aims : createAimsClient(config.aims)
  const m = config.metrics
  // Tasks by outcome and commit-to-done latency are the consumer's own metrics, on the same
  // registry; what only this worker sees is the vendor call.
  const pushSeconds = m?.histogram({
    name: "esl_aims_push_seconds",
    help: "AIMS image request duration, token refresh included",
    labels: { result: ["ok", "error"] },
  })

  const group = config.group ?? "esl-worker"

  const handle = async (
    event: KeyedEvent<EslLabelPagesPayload>,
    ctx: Pick<HandlerContext, "eventId" | "fencing" | "signal" | "throwIfLost" | "complete">,
  ) => {
    // Its labelCode is its key: the consumer holds an event keyed otherwise dead before any
    // handler sees it (EventType.wrongKey), as the writer refuses one.
    const task = event.payload
    if (event.supersededBy !== undefined) {
      // An operator's retry or redrive of an older version, after the label had been drawn
      // from a later one: pushing this image would put the older price back on the shelf.
      // Done without a push; the label keeps the later image.
      trace.getActiveSpan()?.setAttribute("esl.superseded_by", event.supersededBy)
      return
    }
    // Every page is drawn, and compared with what was pushed by its image: what the label
    // would show is what decides, whatever changed it (the product, the job in the footer,
    // the renderer or its font).
    //
    // A page that cannot be drawn, or that AIMS refuses for good, fails the task (dead at
    // once, with the pages and reasons), but only once the label's other pages are pushed:
    // failing at the first, a background page whose price does not fit kept every later
    // price of the page in view off the shelf, each task carrying that page again. Pushed by
    // a dead task, they are not recorded, and the next task pushes them again.
    const refused: string[] = []
    const images = await tracer.startActiveSpan("render label", async (span) => {
      try {
        const drawnPages = await Promise.all(
          task.pages.map(async (page) => {
            try {
              const png = await renderLabel(page)
              return { page: page.page, png, digest: imageDigest(png) }
            } catch (err) {
              if (!(err instanceof RenderError)) throw err
              refused.push(`page ${page.page} cannot be drawn: ${err.message}`)
              return undefined
            }
          }),
        )
        return drawnPages.filter((i) => i !== undefined)
      } finally {
        span.end()
      }
    })
    const drawn = await readDrawn(config.db, group, task.labelCode)
    const changed = images.filter((i) => drawn?.pages[i.page] !== i.digest)
    // AIMS turns a label to another page only with an image request: the shown page's, sent
    // again if nothing else is. (A shown page no job bound has no image to send; the label
    // turns with the next push.)
    const shown = images.find((i) => i.page === task.shownPage)
    if (shown && drawn?.shownPage !== task.shownPage && !changed.includes(shown)) {
      changed.push(shown)
    }
    // The page in view first: it is the one a shopper reads.
    changed.sort((a, b) => Number(b.page === task.shownPage) - Number(a.page === task.shownPage))
    trace.getActiveSpan()?.setAttribute("esl.pages_pushed", changed.length)
    const pushed: typeof changed = []
    for (const image of changed) {
      const started = performance.now()
      try {
        await aims.pushImage({
          labelCode: task.labelCode,
          page: image.page,
          frontPage: task.shownPage,
          png: image.png,
          idempotencyKey: pushKey(ctx.eventId, image.page, image.digest),
          fencingToken: `${ctx.fencing.epoch}.${ctx.fencing.version}`,
          signal: ctx.signal,
          beforeSend: ctx.throwIfLost,
        })
        pushSeconds?.observe((performance.now() - started) / 1000, { result: "ok" })
        pushed.push(image)
      } catch (err) {
        pushSeconds?.observe((performance.now() - started) / 1000, { result: "error" })
        if (!(err instanceof AimsError) || err.retryable) throw err
        refused.push(`page ${image.page}: ${err.message}`)
      }
    }
    if (refused.length > 0) throw new PoisonError(refused.join("; "))
    if (pushed.length === 0) return
    const record: DrawnLabel = {
      shownPage: task.shownPage,
      pages: Object.fromEntries(pushed.map((i) => [i.page, i.digest])),
    }
    // Only this label's row, and computed in SQL: safe beside other keys' effects.
    await ctx.complete((trx) => recordDrawn(trx, group, task.labelCode, record), {
      interleave: true,
    })
  }

  /** A task of a writer before pages: the one page it names. */
  const asPages = (v1: EslLabelRenderPayload): EslLabelPagesPayload => ({
    labelCode: v1.labelCode,
    jobId: v1.jobId,
    // A task of a writer before shownPage knows only whether its own page comes to the
    // front; otherwise the label's first page is the best guess there is.
    shownPage: v1.shownPage ?? (v1.frontPage ? v1.page : 1),
    pages: [
      {
        page: v1.page,
        jobId: v1.jobId,
        productId: v1.productId,
        productName: v1.productName,
        priceMinor: v1.priceMinor,
        currency: v1.currency,
      },
    ],
  })

  const consumer: KeyedConsumer = createKeyedConsumer({
    group,
    stream: config.stream,
    filterSubject: config.filterSubject,
    nats: config.nats,
    db: config.db,
    redis: config.redis,
    metrics: config.metrics,
    handlers: {
      [EslLabelPages.type]: (event, ctx) => handle(event as KeyedEvent<EslLabelPagesPayload>, ctx),
      [EslLabelRender.type]: (event, ctx) =>
        handle({ ...event, payload: asPages(event.payload as EslLabelRenderPayload) }, ctx),
    },
    policies: { [EslLabelRender.topic]: { ...ESL_LABEL_POLICY, ...config.policy } },
    concurrency: config.concurrency,
    leaseMs: config.leaseMs,
    pollIntervalMs: config.pollIntervalMs,
    recoveryIntervalMs: config.recoveryIntervalMs,
    workerId: config.workerId,
    logger: config.logger,
  })
  return {
    start: async () => {
      await migrateDrawnPages(config.db)
      await consumer.start()
    },
    stop: () => consumer.stop(),
    status: () => consumer.status(),
    [Symbol.asyncDispose]: () => consumer.stop(),
  }
}
