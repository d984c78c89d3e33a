// `just status`: what an operator asks first about a site. Reads only what needs no secret:
// pm2's list, the site's database, and the NATS monitoring port (/jsz, /leafz), so it works
// the same while the apps are down and never handles a password.
import { describeError } from "@keyway/app-config"
import { createDb } from "@keyway/db"
import { ConsumerAdminError, createConsumerAdmin, type GroupSummary } from "@keyway/keyed-consumer"
import { sql } from "kysely"
import type { Pm2Process } from "./pm2-client.ts"
import { SITE_ROLES, type SitePlan, siteDatabaseUrl } from "./site-plan.ts"

export interface StreamFigures {
  name: string
  messages: number
  lastSeq: number
  consumers: { name: string; pending: number; ackPending: number; redelivered: number }[]
}

export interface DemoFigures {
  handled: number
  byType: Record<string, number>
  /** Versions of a key handled other than right after the previous one: must stay 0. */
  outOfOrder: number
  lastMinute: number
  /** Median enqueue-to-handled time over the last minute, in ms. */
  medianLagMs: number | null
}

export interface SiteStatus {
  plan: SitePlan
  processes: Pm2Process[]
  outbox: { backlog: number; oldestAgeS: number | null } | string
  streams: StreamFigures[] | string
  leaf: string
  /**
   * The site's consumer group: what waits for an operator or for a missing version, and the
   * messages it kept as rejects in the last day and has not dismissed.
   */
  group: (GroupSummary & { rejects: number }) | string
  /** The site's database, without a password, for the commands status suggests. */
  databaseUrl: string
  demo: DemoFigures | string
}

// Postgres refusing on `localhost` (both ::1 and 127.0.0.1 tried) is an AggregateError of no
// message: its errors say what happened.
const messageOf = describeError

async function monitor(plan: SitePlan, path: string): Promise<any> {
  const res = await fetch(`http://127.0.0.1:${plan.natsHttpPort}${path}`, {
    signal: AbortSignal.timeout(2000),
  }).catch(() => {
    throw new Error(`${plan.site} NATS monitor :${plan.natsHttpPort} not answering`)
  })
  if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`)
  return res.json()
}

async function streamFigures(plan: SitePlan): Promise<StreamFigures[]> {
  const jsz = await monitor(plan, "/jsz?accounts=true&streams=true&consumers=true")
  const out: StreamFigures[] = []
  for (const account of jsz.account_details ?? []) {
    for (const s of account.stream_detail ?? []) {
      out.push({
        name: s.name,
        messages: s.state?.messages ?? 0,
        lastSeq: s.state?.last_seq ?? 0,
        consumers: (s.consumer_detail ?? []).map((c: any) => ({
          name: c.name,
          pending: c.num_pending ?? 0,
          ackPending: c.num_ack_pending ?? 0,
          redelivered: c.num_redelivered ?? 0,
        })),
      })
    }
  }
  return out.sort((a, b) => a.name.localeCompare(b.name))
}

async function leafState(plan: SitePlan): Promise<string> {
  const leafz = await monitor(plan, "/leafz")
  const leafs: any[] = leafz.leafs ?? []
  // The hub lists the leaves that reached it; a leaf lists its link to the hub.
  const role = plan.leafPort ? "leaves connected" : "link to hub"
  if (leafs.length === 0) return plan.leafPort ? `${role}: none` : `${role}: DOWN`
  const parts = leafs.map(
    (l) => `${l.name ?? l.ip}:${l.port} rtt ${l.rtt ?? "?"} in ${l.in_msgs} out ${l.out_msgs}`,
  )
  return `${role}: ${plan.leafPort ? leafs.length : "up"} (${parts.join("; ")})`
}

/**
 * Demo effects handled out of order: per key, a row whose version is not above the one
 * before it. Rows are inserted in the transaction that marks the event done, so their id
 * order is the handling order. A version missing between two rows is no disorder: an
 * operator skipped it, or it died under `park`.
 */
export const outOfOrderSql = sql<number>`(select count(*)::int from (
     select ver, lag(ver) over (partition by topic, key order by id) as prev
     from demo_effect) x
   where prev is not null and ver <= prev)`

export async function collectStatus(
  plan: SitePlan,
  postgresUrl: string,
  allProcesses: Pm2Process[],
): Promise<SiteStatus> {
  const processes = allProcesses.filter((p) => p.name.startsWith(`${plan.site}-`))
  const db = createDb({
    connectionString: siteDatabaseUrl(plan, postgresUrl),
    max: 1,
    applicationName: "keyway-status",
  })
  const attempt = async <T>(fn: () => Promise<T>): Promise<T | string> => {
    try {
      return await fn()
    } catch (err) {
      return `unavailable (${messageOf(err)})`
    }
  }
  try {
    const outbox = await attempt(async () => {
      const r = await sql<{ backlog: number; oldest: number | null }>`
        select count(*)::int as backlog,
               extract(epoch from now() - min(created_at))::float8 as oldest
        from keyway.outbox where published_at is null
      `.execute(db)
      return { backlog: r.rows[0]!.backlog, oldestAgeS: r.rows[0]!.oldest }
    })
    const demo = await attempt(async () => {
      const types = await sql<{ type: string; n: number }>`
        select type, count(*)::int as n from demo_effect group by type order by type
      `.execute(db)
      const order = await sql<{ bad: number; recent: number; lag: number | null }>`
        select
          ${outOfOrderSql} as bad,
          (select count(*)::int from demo_effect where handled_at > now() - interval '1 minute') as recent,
          (select percentile_cont(0.5) within group (
             order by extract(epoch from handled_at - created_at) * 1000)
           from demo_effect where handled_at > now() - interval '1 minute')::float8 as lag
      `.execute(db)
      const byType = Object.fromEntries(types.rows.map((r) => [r.type, r.n]))
      return {
        handled: types.rows.reduce((sum, r) => sum + r.n, 0),
        byType,
        outOfOrder: order.rows[0]!.bad,
        lastMinute: order.rows[0]!.recent,
        medianLagMs: order.rows[0]!.lag,
      }
    })
    return {
      plan,
      processes,
      outbox,
      streams: await attempt(() => streamFigures(plan)),
      leaf: await attempt(() => leafState(plan)),
      group: await attempt(async () => ({
        // A group that has stored nothing yet (right after up) counts zero here; an
        // operator's `admin summary` refuses the name, as a typo there would read as zero.
        ...(await createConsumerAdmin({ db, group: plan.worker.group })
          .summarise()
          .catch((err: unknown) => {
            if (!(err instanceof ConsumerAdminError)) throw err
            return {
              gapKeys: 0,
              oldestGapSeconds: 0,
              deadTasks: 0,
              blockedKeys: 0,
              pendingKeys: 0,
              oldestPendingSeconds: 0,
            }
          })),
        rejects: (
          await sql<{ n: number }>`
            select count(*)::int as n from keyway.inbox_reject
             where grp = ${plan.worker.group} and received_at > now() - interval '1 day'`.execute(
            db,
          )
        ).rows[0]!.n,
      })),
      databaseUrl: withoutPassword(siteDatabaseUrl(plan, postgresUrl)),
      demo,
    }
  } finally {
    await db.destroy()
  }
}

function withoutPassword(url: string): string {
  const u = new URL(url)
  u.password = ""
  return u.toString()
}

const n = (x: number) => x.toLocaleString("en-US")

function duration(ms: number): string {
  const s = Math.floor(ms / 1000)
  if (s < 120) return `${s}s`
  if (s < 7200) return `${Math.floor(s / 60)}m`
  return `${Math.floor(s / 3600)}h`
}

export function printStatus(s: SiteStatus, say: (line: string) => void): void {
  const p = s.plan
  say(
    `${p.site.toUpperCase()}  nats :${p.natsPort} (monitor :${p.natsHttpPort}${p.leafPort ? `, leafnodes :${p.leafPort}` : ""})  redis :${p.redisPort}  postgres ${p.database}`,
  )
  if (s.processes.length === 0) say("  processes   none (npx just up)")
  else {
    // Each process the site should have, by name: one deleted from pm2 (`just pm2 delete
    // cloud-relay`) was simply not listed, and the site looked whole.
    const expected = SITE_ROLES.map((role) => `${p.site}-${role}`)
    const byName = new Map(s.processes.map((proc) => [proc.name, proc]))
    for (const name of new Set([...expected, ...byName.keys()])) {
      const proc = byName.get(name)
      if (!proc) {
        say(`  ${name.padEnd(16)} missing  (npx just up ${p.site} starts it)`)
        continue
      }
      // pm_uptime is the last start: for a process not running it is no uptime at all.
      const up = proc.status === "online" ? `up ${duration(proc.uptimeMs).padEnd(5)}` : "        "
      say(
        `  ${proc.name.padEnd(16)} ${proc.status.padEnd(8)} pid ${String(proc.pid).padEnd(7)} ${up} restarts ${String(proc.restarts).padEnd(3)} ${(proc.memoryBytes / 2 ** 20).toFixed(0)} MB`,
      )
    }
  }
  if (typeof s.outbox === "string") say(`  outbox      ${s.outbox}`)
  else {
    const age = s.outbox.oldestAgeS === null ? "" : ` (oldest ${s.outbox.oldestAgeS.toFixed(1)} s)`
    say(`  outbox      ${n(s.outbox.backlog)} unpublished${age}`)
  }
  if (typeof s.streams === "string") say(`  streams     ${s.streams}`)
  else {
    for (const name of [p.streams.origin, p.streams.inbound]) {
      const st = s.streams.find((x) => x.name === name)
      say(`  stream      ${name.padEnd(11)} ${st ? `${n(st.messages)} messages` : "missing"}`)
    }
    for (const st of s.streams) {
      for (const c of st.consumers) {
        say(
          `  consumer    ${`${st.name}/${c.name}`.padEnd(22)} lag ${n(c.pending + c.ackPending)} (pending ${n(c.pending)}, ack pending ${n(c.ackPending)}, redelivered ${n(c.redelivered)})`,
        )
      }
    }
  }
  say(`  leaf        ${s.leaf}`)
  const group = p.worker.group
  if (typeof s.group === "string") say(`  group       ${group}: ${s.group}`)
  else {
    const g = s.group
    const gaps = g.gapKeys === 0 ? "" : ` (waiting ${duration(g.oldestGapSeconds * 1000)} at most)`
    const lists = [...(g.deadTasks > 0 ? ["dead"] : []), ...(g.rejects > 0 ? ["rejects"] : [])]
    const act = lists
      .map(
        (what, i) =>
          `${i === 0 ? "; list them: " : ", "}DATABASE_URL=${s.databaseUrl} npx just admin ${what} --group ${group}`,
      )
      .join("")
    const pending =
      g.pendingKeys === 0
        ? "nothing waiting to run"
        : `${n(g.pendingKeys)} keys with a task waiting to run (the oldest for ${duration(g.oldestPendingSeconds * 1000)})`
    say(
      `  group       ${group}: ${pending}, ${n(g.deadTasks)} dead tasks, ${n(g.blockedKeys)} keys blocked, ${n(g.gapKeys)} keys at a gap${gaps}, ${n(g.rejects)} messages rejected in the last day${act}`,
    )
  }
  if (typeof s.demo === "string") say(`  demo        ${s.demo}`)
  else {
    const types = Object.entries(s.demo.byType)
      .map(([t, c]) => `${n(c)} ${t}`)
      .join(", ")
    const lag =
      s.demo.medianLagMs === null ? "" : `, median lag ${s.demo.medianLagMs.toFixed(0)} ms`
    say(
      `  demo        handled ${types || "0"}; ${n(s.demo.outOfOrder)} out of order; last minute ${n(s.demo.lastMinute)}${lag}`,
    )
  }
}
