// `just demo [site]`: one site on this machine's Postgres and NATS, with traffic. It migrates
// the database, applies the site's streams, runs a relay and a writer, and prints what moves
// every two seconds until Ctrl-C (or DEMO_SECONDS). A server that goes away meanwhile pauses
// the writing and the report; the relay catches up when it is back.
import { readdirSync } from "node:fs"
import { constants } from "node:os"
import { setTimeout as sleep } from "node:timers/promises"
import { fileURLToPath } from "node:url"
import { createDb, ensureDatabase, migrateToLatest } from "@keyway/db"
import { applyStreams, closeNats, connectNats, loadStreamDefinitions } from "@keyway/nats"
import { createRelay, enqueue } from "@keyway/outbox"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import { sql } from "kysely"
import { ConfigError, type DemoAppConfig, parseConfig } from "./config.ts"
import { demoEvent, nextDue } from "./demo-event.ts"

function fail(message: string): never {
  console.error(`keyway demo: ${message}`)
  process.exit(2)
}

const streamsDir = new URL("../../../nats/streams/", import.meta.url)
const sites = readdirSync(streamsDir)
  .filter((f) => f.endsWith(".json"))
  .map((f) => f.slice(0, -".json".length))
  .sort()
const site = process.argv[2] ?? "cloud"
if (!sites.includes(site)) fail(`the site must be one of ${sites.join(", ")}, not ${site}`)
let config: DemoAppConfig
try {
  config = parseConfig(process.env)
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  fail(err.message)
}
const { databaseUrl, rate, seconds } = config

await ensureDatabase(databaseUrl)
const db = createDb({ connectionString: databaseUrl, max: 4, applicationName: "keyway-demo" })
await migrateToLatest(db, { log: (message) => console.error(`keyway demo: ${message}`) })
const nc = await connectNats({ servers: config.natsServers, name: `keyway-demo:${site}` })
const jsm = await jetstreamManager(nc)
// Only the site's origin stream: its cross-site copies source from another JetStream domain,
// which the machine's single shared server does not have (`just up` runs both sites).
const streams = (
  await loadStreamDefinitions(fileURLToPath(new URL(`${site}.json`, streamsDir)))
).filter((s) => s.subjects?.length)
await applyStreams(jsm, streams)
const relay = createRelay({
  connectionString: databaseUrl,
  jetstream: jetstream(nc),
  connection: nc,
  site,
})
await relay.start()

let written = 0
let running = true
// Ends the writer's pauses at once: at the slowest rate a pause is 100 s.
const stopped = new AbortController()
const pause = (ms: number) => sleep(ms, undefined, { signal: stopped.signal }).catch(() => {})
// The writer: each transaction writes the site's demo event for a random key out of 20, at
// `rate` per second.
const writer = (async () => {
  let due = Date.now()
  while (running) {
    try {
      await db.transaction().execute((trx) => enqueue(trx, demoEvent(site, written, 20)))
    } catch (err) {
      console.log(`write failed, retrying in 1 s: ${(err as Error).message}`)
      await pause(1000)
      continue
    }
    written++
    due = nextDue(due, rate)
    await pause(Math.max(0, due - Date.now()))
  }
})()

console.log(
  `keyway demo: site ${site}, ${rate} events/s into stream ${streams[0]!.name}; Ctrl-C stops`,
)
const report = setInterval(async () => {
  const s = relay.status()
  try {
    const backlog = await sql<{ n: number }>`
      select count(*)::int as n from keyway.outbox where published_at is null
    `.execute(db)
    const info = await jsm.streams.info(streams[0]!.name)
    console.log(
      `written ${written}  published ${s.published}  backlog ${backlog.rows[0]!.n}  stream ${info.state.messages}  relay ${s.role}`,
    )
  } catch (err) {
    console.log(
      `written ${written}  published ${s.published}  relay ${s.role}  (${(err as Error).message})`,
    )
  }
}, 2000)

let stopping = false
async function shutdown() {
  // A signal as DEMO_SECONDS runs out: the second call would destroy the pool again, and
  // reject.
  if (stopping) return
  stopping = true
  running = false
  stopped.abort()
  clearInterval(report)
  await writer
  await relay.stop()
  await closeNats(nc)
  await db.destroy()
  process.exit(0)
}
// A second signal while the stop waits (on a Postgres that does not answer, say) means now.
// Nothing is lost by it: what was written is in the outbox, and the next relay publishes it.
const onSignal = (signal: NodeJS.Signals) => {
  if (stopping) {
    console.error("keyway demo: stopped at once, its stop unfinished")
    // As a shell reports a process that a signal ended: 130 for SIGINT, 143 for SIGTERM.
    process.exit(128 + constants.signals[signal])
  }
  void shutdown()
}
process.on("SIGINT", onSignal)
process.on("SIGTERM", onSignal)
if (seconds > 0) setTimeout(shutdown, seconds * 1000)
