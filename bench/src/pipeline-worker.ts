// One consumer process of the pipeline benchmark: Keyway's keyed consumer or graphile-worker,
// doing the same work per event (one row inserted, stamped with the time it was handled).
import { createDb } from "@keyway/db"
import { createKeyedConsumer } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { createMetricsRegistry } from "@keyway/telemetry"
import { Logger, run } from "graphile-worker"
import { Redis } from "ioredis"
import { sql } from "kysely"
import { wallClock } from "./stats.ts"

const env = process.env
// Compared with the bench's commit times, stamped by the same clock in its process.
const now = wallClock()
let stop: () => Promise<void>

if (env.KIND === "keyway") {
  const nc = await connectNats({ servers: env.NATS_URL! })
  const db = createDb({ connectionString: env.DATABASE_URL!, max: 20 })
  const redis = new Redis(env.REDIS_URL!, { enableAutoPipelining: true })
  const metrics = createMetricsRegistry({ defaultMetrics: false })
  // The benchmark asks for the metrics so far, before and after the phase it measures.
  process.on("SIGUSR2", () => {
    metrics.render().then(
      ({ body }) => console.log(JSON.stringify({ metrics: body })),
      (err) => console.log(JSON.stringify({ metrics: "", error: String(err) })),
    )
  })
  const consumer = createKeyedConsumer({
    group: env.GROUP!,
    stream: env.STREAM!,
    nats: nc,
    db,
    redis,
    metrics,
    concurrency: Number(env.CONCURRENCY ?? 16),
    handlers: {
      "demo.item.changed.v1": async (event, ctx) => {
        // Handled when the handler is called, as graphile-worker's task below is stamped: not
        // when its completion batch gets round to the insert, later.
        const handledAt = now()
        // One insert that stands alone: it may share round trips with other keys' effects.
        await ctx.complete(
          (trx) =>
            sql`insert into effect (key, ver, event_id, handled_at)
                values (${event.key}, ${event.ver}, ${event.id}, ${handledAt})`.execute(trx),
          { interleave: true },
        )
      },
    },
  })
  await consumer.start()
  stop = async () => {
    await consumer.stop()
    await nc.close()
    await db.destroy()
    redis.disconnect()
  }
} else {
  let batchLost = false
  // Settings from the benchmark (pipeline.ts GRAPHILE, where the sweep behind them is).
  // localQueue stays off: in 0.17.3 it breaks the one-job-at-a-time rule of a named queue
  // (graphile/worker#621).
  const runner = await run({
    connectionString: env.DATABASE_URL!,
    concurrency: Number(env.GRAPHILE_CONCURRENCY),
    maxPoolSize: Number(env.GRAPHILE_POOL),
    noHandleSignals: true,
    pollInterval: Number(env.GRAPHILE_POLL_MS),
    preset: { worker: { completeJobBatchDelay: Number(env.GRAPHILE_BATCH_MS) } },
    // The default logger prints a line per job; the benchmark measures the work, not the logs.
    // Errors are printed: a failing job is retried with backoff and would lower the figures
    // unseen.
    logger: new Logger(() => (level, message) => {
      if (level !== "error") return
      console.error(`graphile-worker: ${message}`)
      if (/^Failed to (complete|fail) jobs/.test(message)) batchLost = true
    }),
    taskList: {
      item: async (payload, helpers) => {
        const p = payload as { key: string; id: string }
        // At the task's call, as Keyway's handler above: not after the pool's checkout.
        const handledAt = now()
        await helpers.withPgClient((client) =>
          client.query(
            "insert into effect (key, ver, event_id, handled_at) values ($1, 0, $2, $3)",
            [p.key, p.id, handledAt],
          ),
        )
      },
    },
  })
  // graphile/worker#636: a batched completion that meets a deadlock is never retried, and the
  // pool shuts itself down with the batch's jobs locked (for 4 hours). The benchmark is told,
  // and runs graphile-worker's phase again rather than wait out its deadline.
  let stopping = false
  const stoppedByItself = (reason: string) => {
    if (stopping) return
    console.log(JSON.stringify({ fatal: reason, issue636: batchLost }))
    process.exit(1)
  }
  runner.promise.then(
    () => stoppedByItself("graphile-worker's pool stopped by itself"),
    (err) => stoppedByItself(String(err)),
  )
  stop = () => {
    stopping = true
    return runner.stop()
  }
}
console.log(JSON.stringify({ ready: true }))
process.on("SIGTERM", async () => {
  await stop()
  process.exit(0)
})
