// One consumer process of the pipeline benchmark: Keyway's keyed consumer or graphile-worker,
// doing the same work per event (one row inserted, stamped with the time it was handled).
import { createDb } from "@keyway/db"
import { createKeyedConsumer } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { createMetricsRegistry } from "@keyway/telemetry"
import { Logger, run } from "graphile-worker"
import { Redis } from "ioredis"
import { sql } from "kysely"

const env = process.env
const now = () => performance.timeOrigin + performance.now()
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
        // One insert that stands alone: it may share round trips with other keys' effects.
        await ctx.complete(
          (trx) =>
            sql`insert into effect (key, ver, event_id, handled_at)
                values (${event.key}, ${event.ver}, ${event.id}, ${now()})`.execute(trx),
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
  // graphile-worker keeps its default pool of 10 connections. With 20, like Keyway's worker,
  // its jobs waited less for a client (p99 at 1,000 events/s 0.7-0.8 s against 3.0-4.6 s) but
  // it made fewer events/s (358 and 317 against 322-457, median 391 of 7 full runs, with 10),
  // and throughput is what the target compares.
  const runner = await run({
    connectionString: env.DATABASE_URL!,
    concurrency: Number(env.BENCH_GRAPHILE_CONCURRENCY ?? env.CONCURRENCY ?? 16),
    maxPoolSize: Number(env.BENCH_GRAPHILE_POOL ?? 10),
    noHandleSignals: true,
    pollInterval: Number(env.BENCH_GRAPHILE_POLL_MS ?? 1000),
    preset: { worker: { completeJobBatchDelay: Number(env.BENCH_GRAPHILE_BATCH_MS ?? -1) } },
    // The default logger prints a line per job; the benchmark measures the work, not the logs.
    logger: new Logger(() => () => {}),
    taskList: {
      item: async (payload, helpers) => {
        const p = payload as { key: string; id: string }
        await helpers.withPgClient((client) =>
          client.query(
            "insert into effect (key, ver, event_id, handled_at) values ($1, 0, $2, $3)",
            [p.key, p.id, now()],
          ),
        )
      },
    },
  })
  stop = () => runner.stop()
}
console.log(JSON.stringify({ ready: true }))
process.on("SIGTERM", async () => {
  await stop()
  process.exit(0)
})
