import { randomBytes } from "node:crypto"
import { applyStreams } from "@keyway/nats"
import type { EventEnvelope } from "@keyway/schemas"
import { jetstreamManager } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { type Kysely, sql } from "kysely"

/** A site name of its own per test, so tests share the machine's NATS without colliding. */
export function uniqueSite(): string {
  return `t${randomBytes(4).toString("hex")}`
}

/** Creates the site's origin stream `<SITE>` on `<site>.>`; returns its name. */
export async function createSiteStream(nc: NatsConnection, site: string): Promise<string> {
  const name = site.toUpperCase()
  await applyStreams(await jetstreamManager(nc), [
    { name, subjects: [`${site}.>`], duplicate_window: 10 * 60e9, max_age: 3600e9 },
  ])
  return name
}

export async function deleteStream(nc: NatsConnection, name: string): Promise<void> {
  await (await jetstreamManager(nc)).streams.delete(name).catch(() => {})
}

export async function unpublishedCount(db: Kysely<any>): Promise<number> {
  const r = await sql<{ n: number }>`
    select count(*)::int as n from keyway.outbox where published_at is null
  `.execute(db)
  return r.rows[0]!.n
}

/** Each key's versions in stream order. */
export function versionsByKey(events: readonly EventEnvelope[]): Map<string, number[]> {
  const byKey = new Map<string, number[]>()
  for (const e of events) {
    const k = `${e.topic}/${e.key}`
    const list = byKey.get(k) ?? []
    list.push(e.ver)
    byKey.set(k, list)
  }
  return byKey
}
