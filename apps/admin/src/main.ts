// `just admin <command>`: the operator's view of a consumer group, on top of the library's
// admin API (createConsumerAdmin). Output is one JSON document on stdout, so it can be read
// by people and piped to jq alike.
import { parseArgs } from "node:util"
import { describeError, parsePositiveInt } from "@keyway/app-config"
import { createDb } from "@keyway/db"
import { createConsumerAdmin, type TaskSelector } from "@keyway/keyed-consumer"
import { ConfigError, parseAdminConfig } from "./config.ts"

// A reader that stops early (`admin dead | head`) has what it wanted: without this the write
// to its closed pipe was an unhandled EPIPE, a stack trace and exit 1.
process.stdout.on("error", (err: NodeJS.ErrnoException) => {
  if (err.code === "EPIPE") process.exit(0)
  throw err
})

const usage = `usage: admin <command> --group G [options]
  summary                                    counts of dead tasks, blocked keys and gaps
  dead    [--topic T] [--limit N]            dead tasks (blocking or parked), the first N
                                             by topic, key and version (default 1000)
  gaps    [--topic T]                        keys waiting for a missing version
  blocked [--topic T]                        keys stopped at a dead task
  rejects [--limit N]                        messages kept instead of run (not events,
                                             refused values, collisions), newest first,
                                             the first N (default 100)
  dismiss --from ID --through ID             forget the rejects numbered ID..ID (read)
  retry   --topic T [--key K] [--from N] [--to M]   dead tasks back to pending
  skip    --topic T (--key K [--from N] [--to M] | --all-keys)
                                             dead skipped (pending or missing too, with
                                             a range): one key's, or every key's
  redrive --topic T (--key K [--from N] [--to M] | --all-keys)
                                             finished tasks run again: one key's, or
                                             every key's of the topic
environment: DATABASE_URL (the group's database)`

function fail(message: string): never {
  console.error(`admin: ${message}\n${usage}`)
  process.exit(2)
}

const options = {
  group: { type: "string" },
  topic: { type: "string" },
  key: { type: "string" },
  from: { type: "string" },
  to: { type: "string" },
  limit: { type: "string" },
  through: { type: "string" },
  "all-keys": { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const
let parsed: ReturnType<
  typeof parseArgs<{ allowPositionals: true; options: typeof options; tokens: true }>
>
try {
  parsed = parseArgs({ allowPositionals: true, options, tokens: true })
} catch (err) {
  // An unknown flag (a typo) or one without its value: said plainly, with the usage.
  fail((err as Error).message)
}
const { positionals, values } = parsed
// Asked for, the usage is the answer (stdout, exit 0), whatever else was given.
if (values.help) {
  console.log(usage)
  process.exit(0)
}
// parseArgs keeps the last of a repeated flag: `retry --key a --key b` retried b alone.
const given = new Set<string>()
for (const token of parsed.tokens ?? []) {
  if (token.kind !== "option") continue
  if (given.has(token.name)) fail(`--${token.name} given twice: one action takes one of each`)
  given.add(token.name)
}
const command = positionals[0]
// Each command with the flags it reads: any other was meant for something and would be
// ignored, and an action that ignores part of what the operator asked must not run.
const flags: Record<string, readonly (keyof typeof options)[]> = {
  summary: ["group"],
  dead: ["group", "topic", "limit"],
  gaps: ["group", "topic"],
  blocked: ["group", "topic"],
  rejects: ["group", "limit"],
  dismiss: ["group", "from", "through"],
  retry: ["group", "topic", "key", "from", "to"],
  skip: ["group", "topic", "key", "from", "to", "all-keys"],
  redrive: ["group", "topic", "key", "from", "to", "all-keys"],
}
if (!command) fail("no command")
if (!(command in flags)) fail(`unknown command ${JSON.stringify(command)}`)
if (positionals.length > 1) {
  fail(`unexpected ${JSON.stringify(positionals[1])}: versions go in --from/--to`)
}
for (const name of Object.keys(values)) {
  if (!flags[command]!.includes(name as keyof typeof options)) {
    fail(`${command} does not take --${name}`)
  }
}
const databaseUrl = (() => {
  try {
    return parseAdminConfig(process.env).databaseUrl
  } catch (err) {
    if (err instanceof ConfigError) fail(err.message)
    throw err
  }
})()
if (!values.group) fail("--group is required")
const version = (name: "from" | "to") => {
  const raw = values[name]
  if (raw === undefined) return undefined
  return parsePositiveInt(raw) ?? fail(`--${name} must be a version (a positive integer)`)
}
const selector = (): TaskSelector => {
  if (!values.topic) fail(`${command} needs --topic`)
  // Every key of a topic runs again whatever it ran in the retention period (a day of vendor
  // calls, say), or moves past every dead task of the topic, whose events are then never
  // handled: asked for in so many words, not by a --key left out.
  if (
    (command === "redrive" || command === "skip") &&
    (values.key === undefined) !== (values["all-keys"] === true)
  ) {
    fail(`${command} needs --key, or --all-keys for every key of the topic (not both)`)
  }
  const s: TaskSelector = { topic: values.topic }
  if (values.key !== undefined) s.key = values.key
  if (values["all-keys"] === true) s.allKeys = true
  const from = version("from")
  const to = version("to")
  if ((from !== undefined || to !== undefined) && values.key === undefined) {
    fail("--from/--to select versions of one key: give --key too")
  }
  if (from !== undefined && to !== undefined && from > to) {
    fail(`--from ${from} is above --to ${to}`)
  }
  if (from !== undefined) s.fromVer = from
  if (to !== undefined) s.toVer = to
  return s
}

// The actions' flags, checked before connecting: a usage error is said as one, not as the
// database's failure to answer.
const action = ["retry", "skip", "redrive"].includes(command) ? selector() : undefined

const limit = () => {
  const raw = values.limit
  return raw === undefined
    ? undefined
    : (parsePositiveInt(raw, 999_999) ?? fail("--limit must be a whole number from 1 to 999999"))
}

let db: ReturnType<typeof createDb>
try {
  db = createDb({ connectionString: databaseUrl, max: 1, applicationName: "keyway-admin" })
} catch (err) {
  // An option of DATABASE_URL that the pool would misread (connect_timeout=10s, say).
  fail(`DATABASE_URL: ${err instanceof Error ? err.message : String(err)}`)
}
// An action locks the keys it touches, and waits for a worker's claim or completion holding
// one to commit, normally milliseconds. One stuck (a session idle in a transaction) held the
// command without a word until the operator gave up.
const LOCK_TIMEOUT_MS = 5000
const admin = createConsumerAdmin({ db, group: values.group, lockTimeoutMs: LOCK_TIMEOUT_MS })
try {
  let result: unknown
  // What an action changed: retry, skip and redrive count it.
  let changed: number | undefined
  switch (command) {
    case "summary":
      result = await admin.summarise()
      break
    case "dead": {
      const n = limit() ?? 1000
      // One more than shown, to know there are more: a page exactly full said so wrongly.
      const dead = await admin.listDead(values.topic, n + 1)
      // The list is a JSON document: a note on stdout would break it for jq.
      if (dead.length > n) {
        console.error(`admin: the first ${n} dead tasks; --limit for more, or --topic to narrow`)
      }
      result = dead.slice(0, n)
      break
    }
    case "gaps":
      result = await admin.listGaps(values.topic)
      break
    case "blocked":
      result = await admin.listBlocked(values.topic)
      break
    case "rejects": {
      const n = limit() ?? 100
      const rejects = await admin.listRejects(n + 1)
      if (rejects.length > n) {
        console.error(`admin: the newest ${n} rejects; --limit for more`)
      }
      result = rejects.slice(0, n)
      break
    }
    case "dismiss": {
      const id = (name: "from" | "through") => {
        const raw = values[name]
        if (raw === undefined) fail("dismiss needs --from and --through (ids from rejects)")
        return parsePositiveInt(raw) ?? fail(`--${name} must be a reject's id (a positive integer)`)
      }
      const from = id("from")
      const through = id("through")
      if (from > through) fail(`--from ${from} is above --through ${through}`)
      result = { dismissed: await admin.dismissRejects(from, through) }
      break
    }
    case "retry":
      changed = await admin.retry(action!)
      result = { retried: changed }
      break
    case "skip":
      changed = await admin.skip(action!)
      result = { skipped: changed }
      break
    case "redrive":
      changed = await admin.redrive(action!)
      result = { redriven: changed }
      break
  }
  // A typo'd version or a task in another state than thought changes nothing: said on stderr
  // (stdout stays the JSON), or `{"retried": 0}` at 3 a.m. reads as done.
  if (action && changed === 0) {
    const s = action
    const ranged = s.fromVer !== undefined || s.toVer !== undefined
    const range = ranged ? ` v${s.fromVer ?? 1}..${s.toVer === undefined ? "" : `v${s.toVer}`}` : ""
    const what = `${s.topic}${s.key === undefined ? "" : `/${s.key}`}${range}`
    const none = {
      retry: "no dead task",
      skip: ranged
        ? "no dead or pending task, nor a version missing before one that arrived"
        : "no dead task",
      redrive: "no version that ran (done, skipped or dead since)",
    }[command as "retry" | "skip" | "redrive"]
    console.error(
      `admin: nothing changed: ${none} in ${what}; \`dead\`, \`gaps\` and \`blocked\` show where keys stand`,
    )
  }
  console.log(JSON.stringify(result, null, 2))
} catch (err) {
  // An operator reads this, not a developer: the message, not a stack. A database that does
  // not exist or lacks Keyway's tables is most often DATABASE_URL naming the wrong one.
  // describeError: Postgres refusing on `localhost` (::1 and 127.0.0.1 both tried) is an
  // AggregateError of no message.
  const message = describeError(err)
  const code = (err as { code?: string }).code
  const wrongDatabase = code === "3D000" || code === "42P01" || code === "42883"
  const hint = wrongDatabase
    ? ` (DATABASE_URL must name the migrated database of group ${JSON.stringify(values.group)}, e.g. keyway_cloud for cloud-demo under \`just up\`)`
    : code === "55P03"
      ? ` (a key or row it must lock stayed held by another session for ${LOCK_TIMEOUT_MS / 1000} s; nothing changed: try again, and if it persists pg_locks and pg_stat_activity show which session holds it)`
      : ""
  console.error(`admin: ${message}${hint}`)
  process.exitCode = 1
} finally {
  await db.destroy()
}
