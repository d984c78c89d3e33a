// `just replay --stream S [options]`: a stream's messages, decoded, one JSON line each, in
// stream order, for a developer following a flow (src/replay.ts). It reads without touching
// any consumer group. What it read, and from where, goes to stderr; stdout is for jq.
import { parseArgs } from "node:util"
import { describeError, parsePositiveInt } from "@keyway/app-config"
import { connectNats } from "@keyway/nats"
import {
  JetStreamApiCodes,
  JetStreamApiError,
  jetstream,
  jetstreamManager,
} from "@nats-io/jetstream"
import { ConfigError, parseConfig } from "./config.ts"
import { replay } from "./replay.ts"

const usage = `usage: replay --stream S [--site cloud|factory] [--subject SUBJ] [--key K]
              [--from-seq N | --since 10m | --since 2026-12-06T10:00:00Z] [--to-seq N]
              [--limit N] [--follow]
  --site     a site of \`just up\`: its NATS, as its admin user
  --subject  one subject or wildcard of the stream (e.g. factory.demo.item, factory.>)
  --key      only events of this key (read client side)
  --follow   keep printing new messages until Ctrl-C
environment, without --site: NATS_URL (default nats://127.0.0.1:4222); NATS_USER, NATS_PASS
for a server with accounts (nats/README.md), NATS_INBOX_PREFIX if not the user's own`

function fail(message: string): never {
  console.error(`replay: ${message}\n${usage}`)
  process.exit(2)
}

const options = {
  stream: { type: "string" },
  site: { type: "string" },
  subject: { type: "string" },
  key: { type: "string" },
  "from-seq": { type: "string" },
  since: { type: "string" },
  "to-seq": { type: "string" },
  limit: { type: "string" },
  follow: { type: "boolean" },
  help: { type: "boolean" },
} as const
let values: ReturnType<typeof parseArgs<{ options: typeof options }>>["values"]
try {
  const parsed = parseArgs({ options, tokens: true })
  values = parsed.values
  // parseArgs keeps the last of a repeated option: `--key a --key b` would read b alone.
  const seen = new Set<string>()
  for (const t of parsed.tokens) {
    if (t.kind !== "option") continue
    if (seen.has(t.name)) fail(`--${t.name} is given twice; one read takes one`)
    seen.add(t.name)
  }
} catch (err) {
  fail((err as Error).message)
}

const count = (name: "from-seq" | "to-seq" | "limit") => {
  const raw = values[name]
  if (raw === undefined) return undefined
  return parsePositiveInt(raw) ?? fail(`--${name} must be a positive integer`)
}

/**
 * Before 1970 means every message, and is sent as no start time: nats-server 2.9.10's
 * nanosecond clock overflows before 1678 (reading it as after every message), and a span
 * too long for a date at all is refused by the server as invalid JSON.
 */
const clamp = (time: Date) =>
  time.getTime() < 0 || Number.isNaN(time.getTime()) ? undefined : time

const ISO_TIME =
  /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})$/

/**
 * An ISO 8601 time with its zone, if every field names one that exists: Date rolls 02-30 over
 * to 03-02 and 24:00 to the next day, and the read would start somewhere not asked for.
 */
function existingTime(raw: string): Date | undefined {
  const f = ISO_TIME.exec(raw)
  if (!f) return undefined
  const n = (i: number) => Number(f[i] ?? 0)
  const lastDay = new Date(Date.UTC(n(1), n(2), 0)).getUTCDate()
  if (n(2) < 1 || n(2) > 12 || n(3) < 1 || n(3) > lastDay) return undefined
  if (n(4) > 23 || n(5) > 59 || n(6) > 59) return undefined
  return new Date(raw)
}

/** `--since`: a span back from now (90s, 10m, 2h, 1d) or an ISO 8601 time with its zone. */
function since(raw: string | undefined): Date | undefined {
  if (raw === undefined) return undefined
  const span = /^(\d+)(s|m|h|d)$/.exec(raw)
  if (span) {
    const unit = { s: 1e3, m: 60e3, h: 3600e3, d: 86400e3 }[span[2] as "s" | "m" | "h" | "d"]
    return clamp(new Date(Date.now() - Number(span[1]) * unit))
  }
  // A zone is required: without one the same text means another instant on another machine.
  const time = existingTime(raw)
  if (!time || Number.isNaN(time.getTime())) {
    fail(`--since must be a span (90s, 10m, 2h, 1d) or a time like 2026-12-06T10:00:00Z`)
  }
  // Nothing is there yet to read; and nats-server 2.9.10 reads a time past 2262 (its
  // nanosecond clock overflowing) as before every message.
  if (time.getTime() > Date.now()) fail(`--since ${raw} is in the future`)
  return clamp(time)
}

if (values.help) {
  console.log(usage)
  process.exit(0)
}
if (!values.stream) fail("--stream is required")
const fromSeq = count("from-seq")
const toSeq = count("to-seq")
const start = since(values.since)
const limit = count("limit")
if (fromSeq !== undefined && start !== undefined) fail("give --from-seq or --since, not both")
if (fromSeq !== undefined && toSeq !== undefined && fromSeq > toSeq) {
  fail(`--from-seq ${fromSeq} is above --to-seq ${toSeq}`)
}
if (values.follow && toSeq !== undefined) fail("--follow reads on for ever: it takes no --to-seq")

/** Where to connect: a site of `just up` (its admin user), or the environment's server. */
async function natsTarget() {
  if (values.site === undefined) {
    try {
      const config = parseConfig(process.env)
      return {
        servers: config.natsServers,
        user: config.natsUser,
        pass: config.natsPass,
        inboxPrefix: config.natsInboxPrefix,
      }
    } catch (err) {
      if (err instanceof ConfigError) fail(err.message)
      throw err
    }
  }
  const { SITES, SITE_NAMES, passwordVariable, repositoryRoot, siteAdminNats } = await import(
    "@keyway/ops-local/site-plan"
  )
  const { readSiteSecrets } = await import("@keyway/ops-local/secrets")
  if (!(SITE_NAMES as readonly string[]).includes(values.site)) {
    fail(`--site must be one of ${SITE_NAMES.join(", ")}`)
  }
  const plan = SITES[values.site as keyof typeof SITES]
  const runDir = `${repositoryRoot()}/.run`
  // Another user's file (`just up` run as root), or a directory in its place: said in a line,
  // not as a stack trace.
  const secrets = await readSiteSecrets(runDir, plan.site).catch((err) => {
    console.error(
      `replay: cannot read the ${plan.site} site's secrets under ${runDir}: ${describeError(err)}`,
    )
    process.exit(1)
  })
  const password = secrets?.[passwordVariable(plan.adminUser)]
  if (!password)
    fail(`the ${plan.site} site has not been brought up here: run \`npx just up\` first`)
  return siteAdminNats(plan, password)
}

const target = await natsTarget()
const nc = await connectNats({
  ...target,
  name: "keyway-replay",
  // A developer at a prompt wants the error, not a wait for a server that may never come.
  waitForServer: false,
}).catch((err: Error) => {
  console.error(`replay: cannot reach NATS at ${target.servers.join(",")}: ${err.message}`)
  process.exit(1)
})
const aborter = new AbortController()
// Ctrl-C at a prompt is SIGINT; through `npx just`, whose wrapper passes it on as SIGTERM, and
// under a supervisor it is SIGTERM: both end the read the same way, its consumer deleted.
process.once("SIGINT", () => aborter.abort())
process.once("SIGTERM", () => aborter.abort())
// A reader that stops early (`| head`) is no error: stop there, quietly. Not by exiting
// at once: the read deletes its consumer on the way out, which the server would otherwise
// keep, with its pending count, for 5 minutes.
let outputClosed = false
process.stdout.on("error", (err: NodeJS.ErrnoException) => {
  if (err.code !== "EPIPE") throw err
  outputClosed = true
  aborter.abort()
})
try {
  const jsm = await jetstreamManager(nc)
  let info: Awaited<ReturnType<typeof jsm.streams.info>>
  try {
    info = await jsm.streams.info(values.stream)
  } catch (err) {
    if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound) {
      const names: string[] = []
      for await (const s of jsm.streams.names()) names.push(s)
      throw new Error(
        `no stream ${JSON.stringify(values.stream)} on this server (its streams: ${names.sort().join(", ") || "none"})`,
      )
    }
    throw err
  }
  const { first_seq, last_seq, messages } = info.state
  console.error(
    `replay: ${values.stream} holds ${messages} messages, seq ${first_seq}..${last_seq}`,
  )
  const printed = await replay(
    jetstream(nc),
    {
      stream: values.stream,
      subject: values.subject,
      key: values.key,
      fromSeq,
      since: start,
      // Without --follow, the end is what the stream held at the start.
      toSeq: values.follow ? undefined : Math.min(toSeq ?? last_seq, last_seq),
      limit,
      follow: values.follow ?? false,
      signal: aborter.signal,
      onWait: (reason) => console.error(`replay: ${reason} (Ctrl-C ends the read)`),
    },
    (line) => {
      if (!outputClosed) process.stdout.write(`${JSON.stringify(line)}\n`)
    },
  )
  console.error(`replay: ${printed} printed`)
} catch (err) {
  console.error(`replay: ${(err as Error).message}`)
  process.exitCode = 1
} finally {
  await nc.close()
}
