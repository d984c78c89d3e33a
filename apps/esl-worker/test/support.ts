import { createHash, randomBytes } from "node:crypto"
import { fileURLToPath } from "node:url"
import { createDb } from "@keyway/db"
import { createRelay } from "@keyway/outbox"
import {
  createTestStream,
  type FakeAimsPush,
  startFakeAims,
  type TestDatabase,
} from "@keyway/testkit"
import { createCanvas, loadImage } from "@napi-rs/canvas"
import { jetstream } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { Redis } from "ioredis"
import { type Kysely, sql } from "kysely"
import type { AimsClientConfig } from "../src/aims-client.ts"
import { createEslWorker, type EslWorkerConfig } from "../src/create-esl-worker.ts"
import { eventIdOfPushKey } from "../src/drawn-pages.ts"
import { renderLabel } from "../src/render-label.ts"

export const SHARED_NATS = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
export const SHARED_REDIS = process.env.KEYWAY_TEST_REDIS_URL ?? "redis://127.0.0.1:6379"
export const workerMain = fileURLToPath(new URL("../src/main.ts", import.meta.url))

export const unique = (prefix: string) => `${prefix}${randomBytes(4).toString("hex")}`
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

/** `n` distinct label MACs, canonical. */
export const macs = (n: number) =>
  Array.from({ length: n }, (_, i) => `A1B2C3${i.toString(16).toUpperCase().padStart(6, "0")}`)

/** Keys of topic esl.label whose consumer group has not finished their newest version. */
export async function unfinishedLabels(db: Kysely<any>, group: string): Promise<number> {
  const r = await sql<{ n: number }>`
    select count(*)::int as n
      from keyway.outbox_key_head h
      left join keyway.consumer_key k on k.grp = ${group} and k.topic = h.topic and k.key = h.key
     where h.topic = 'esl.label' and (k.done_ver is null or k.done_ver < h.ver)
  `.execute(db)
  return r.rows[0]!.n
}

export interface OutboxTask {
  eventId: string
  key: string
  ver: number
  payload: any
}

/** Every esl.label event the writers committed, by label, in version order. */
export async function committedTasks(db: Kysely<any>, site: string) {
  const r = await sql<{ seq: number; key: string; ver: number; payload: any }>`
    select seq, key, ver, payload from keyway.outbox where topic = 'esl.label' order by key, ver
  `.execute(db)
  const byLabel = new Map<string, OutboxTask[]>()
  const byEventId = new Map<string, OutboxTask>()
  for (const row of r.rows) {
    const task = { eventId: `${site}:${row.seq}`, key: row.key, ver: row.ver, payload: row.payload }
    byEventId.set(task.eventId, task)
    const list = byLabel.get(row.key) ?? []
    list.push(task)
    byLabel.set(row.key, list)
  }
  return { byLabel, byEventId }
}

/** The event an idempotency key was made for (pushKey). */
export const eventIdOfKey = (key: string | undefined) =>
  key === undefined ? "" : eventIdOfPushKey(key)

/** The event a push was made for. */
export const eventIdOf = (push: FakeAimsPush | undefined) => eventIdOfKey(push?.idempotencyKey)

/** The image of the page a task shows (a task of a writer before pages: its one page). */
export async function imageHashOf(payload: any): Promise<string> {
  const page = payload.pages
    ? payload.pages.find((p: { page: number }) => p.page === payload.shownPage)
    : payload
  return createHash("sha256")
    .update(await renderLabel(page))
    .digest("hex")
}

/** Decodes with Skia, an independent PNG reader, and returns the RGBA pixels. */
export async function decodePng(
  png: Buffer,
): Promise<{ width: number; height: number; rgba: Uint8ClampedArray }> {
  const image = await loadImage(png)
  const canvas = createCanvas(image.width, image.height)
  const ctx = canvas.getContext("2d")
  ctx.drawImage(image, 0, 0)
  return {
    width: image.width,
    height: image.height,
    rgba: ctx.getImageData(0, 0, image.width, image.height).data,
  }
}

/**
 * The label path in this process, on `t`'s database: a stream of its own, a fake AIMS, a
 * relay and an ESL worker (`worker` overrides its settings), each stopped by `cleanups`,
 * which the caller runs in reverse.
 */
export async function startEslPipeline(
  nc: NatsConnection,
  t: TestDatabase,
  cleanups: (() => Promise<unknown>)[],
  worker: Partial<EslWorkerConfig> = {},
  client: Partial<AimsClientConfig> = {},
) {
  const stream = await createTestStream(nc)
  cleanups.push(() => stream.delete())
  const aims = await startFakeAims()
  cleanups.push(() => aims.stop())
  const relay = createRelay({
    connectionString: t.url,
    jetstream: jetstream(nc),
    connection: nc,
    site: stream.site,
  })
  cleanups.push(() => relay.stop())
  await relay.start()
  const redis = new Redis(SHARED_REDIS)
  cleanups.push(async () => redis.disconnect())
  const db = createDb({ connectionString: t.url, max: 4 })
  cleanups.push(() => db.destroy())
  const group = unique("esl")
  const esl = createEslWorker({
    db,
    nats: nc,
    redis,
    stream: stream.name,
    group,
    filterSubject: `${stream.site}.esl.label`,
    aims: { baseUrl: aims.url, ...aims, timeoutMs: 2000, ...client },
    pollIntervalMs: 300,
    ...worker,
  })
  cleanups.push(() => esl.stop())
  await esl.start()
  return { stream, aims, group }
}
