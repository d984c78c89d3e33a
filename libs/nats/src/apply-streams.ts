import { readFile } from "node:fs/promises"
import {
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
  type StreamConfig,
  type StreamSource,
} from "@nats-io/jetstream"

/**
 * A stream as declared in `nats/streams/*.json`: JetStream's own field names, except that
 * durations may be written as strings ("72h", "10m", "500ms") instead of nanoseconds.
 */
export type StreamDefinition = Partial<StreamConfig> & { name: string }

const units: Record<string, number> = {
  ns: 1,
  us: 1e3,
  ms: 1e6,
  s: 1e9,
  m: 60e9,
  h: 3600e9,
  d: 86400e9,
}
const durationFields = ["max_age", "duplicate_window"] as const

/** "72h" → nanoseconds. Numbers are taken as nanoseconds already. */
export function parseDuration(value: string | number): number {
  if (typeof value === "number") return value
  const match = /^(\d+(?:\.\d+)?)(ns|us|ms|s|m|h|d)$/.exec(value.trim())
  if (!match) throw new Error(`not a duration: ${JSON.stringify(value)} (use e.g. "90s", "72h")`)
  return Math.round(Number(match[1]) * units[match[2]!]!)
}

function normalise(definition: StreamDefinition): StreamDefinition {
  const out: Record<string, unknown> = { ...definition }
  for (const field of durationFields) {
    if (out[field] !== undefined) out[field] = parseDuration(out[field] as string | number)
  }
  return out as StreamDefinition
}

// What nats.js refuses in a stream name before it asks the server (a subject token, and no
// path separator): refused here as the file's, rather than met at apply as a plain Error.
const STREAM_NAME = /^[^.*>/\\\s\p{Cc}]+$/u

export async function loadStreamDefinitions(path: string): Promise<StreamDefinition[]> {
  const parsed = JSON.parse(await readFile(path, "utf8")) as { streams?: StreamDefinition[] }
  if (!Array.isArray(parsed.streams)) throw new Error(`${path}: expected {"streams": [...]}`)
  // The file's mistakes, said as the file's: found by the server, they read as its refusals.
  const seen = new Set<string>()
  parsed.streams.forEach((s, i) => {
    if (s === null || typeof s !== "object" || typeof s.name !== "string" || s.name === "") {
      throw new Error(`${path}: streams[${i}] has no name`)
    }
    if (!STREAM_NAME.test(s.name)) {
      throw new Error(
        `${path}: stream name ${JSON.stringify(s.name)} may not hold ".", "*", ">", "/", "\\" or white space`,
      )
    }
    if (seen.has(s.name)) throw new Error(`${path}: stream ${s.name} is declared twice`)
    seen.add(s.name)
    for (const field of durationFields) {
      const value = s[field] as unknown
      // Under a second is never meant of a number in a file: a "max_age": 604800 written as
      // seconds is 0.6 ms, which the server takes, and then deletes each event before the
      // other site can copy it. A string says its unit ("500ms").
      if (typeof value === "number" && value > 0 && value < 1e9) {
        throw new Error(
          `${path}: ${s.name}.${field} ${value} is a number of nanoseconds (${value / 1e6} ms): write a duration such as "90s" or "72h"`,
        )
      }
    }
  })
  return parsed.streams.map(normalise)
}

/**
 * A declared change to an existing stream that would destroy or re-fetch what it holds (the
 * server would take it without a word), or that the server cannot make on a live stream
 * (a declaration would silently not hold). An operator who means it makes it by hand (`nats
 * stream edit`, or a new stream). Permanent: waiting does not mend it.
 */
export class StreamChangeRefusedError extends Error {
  override name = "StreamChangeRefusedError"
  readonly permanent = true
}

// Limits whose lowering deletes stored messages at once; at or below zero means none. At a
// site cut off for hours, what they delete is what the other site has not yet copied.
const limitFields = ["max_age", "max_bytes", "max_msgs", "max_msgs_per_subject"] as const

/** What updating `live` to `declared` would destroy or restart, one line each. */
export function destructiveChanges(live: StreamConfig, declared: StreamDefinition): string[] {
  const out: string[] = []
  for (const field of limitFields) {
    const to = declared[field] as number | undefined
    const from = live[field] as number
    if (to !== undefined && to > 0 && (from <= 0 || to < from)) {
      out.push(`${field} ${from <= 0 ? "unlimited" : from} -> ${to} deletes what is over it`)
    }
  }
  if (declared.num_replicas !== undefined && declared.num_replicas < live.num_replicas) {
    out.push(`num_replicas ${live.num_replicas} -> ${declared.num_replicas} drops copies`)
  }
  // Subjects a stream takes no more: every publish to them then finds no stream (each relay
  // holds the topic), and a declaration that misspelt "subjects" took them all away. Unless
  // the stream becomes a copy (sources declared, no subjects), which listens on none; and a
  // stream declared with neither gets its own name from the server.
  const becomesCopy = !declared.subjects?.length && !!declared.sources?.length
  const after = declared.subjects?.length ? declared.subjects : [declared.name]
  const removed = (live.subjects ?? []).filter((s) => !after.includes(s))
  if (removed.length > 0 && !becomesCopy) {
    out.push(`subjects ${removed.join(", ")} removed: publishes to them would find no stream`)
  }
  // A source is tracked by its name and API prefix: changed, the copy starts it over from
  // its first message, and stores again what is older than its duplicate window (all but
  // the last second, for Keyway's copies).
  if (declared.sources !== undefined) {
    const same = (a: unknown, b: unknown) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null)
    // A source may be declared by domain; nats.js sends it as that domain's API prefix.
    const apiOf = (s: { external?: { api?: string }; domain?: string }) =>
      s.external?.api ?? (s.domain ? `$JS.${s.domain}.API` : undefined)
    // By both: a cloud stream sources one FACTORY stream from each factory's domain, and a
    // match by name alone paired the second factory's with the first's declaration.
    const sameSource = (a: StreamSource, b: StreamSource) =>
      a.name === b.name && same(apiOf(a), apiOf(b))
    const liveSources = live.sources ?? []
    for (const source of liveSources) {
      const kept = declared.sources.find((d) => sameSource(d, source))
      // A declared source of this name that matches no live one: its API prefix changed.
      const moved = declared.sources.some(
        (d) => d.name === source.name && !liveSources.some((l) => sameSource(d, l)),
      )
      if (kept ? !same(kept.filter_subject, source.filter_subject) : moved) {
        out.push(`source ${source.name} changed: the copy would fetch it again from its start`)
      } else if (!kept) {
        out.push(`source ${source.name} removed`)
      }
    }
  }
  return out
}

// Fields nats-server (2.9.10) will not undo on a live stream: an update that leaves one out
// is merged with it kept, so the declaration would not be what runs. deny_delete, deny_purge
// and sealed can be set later, not cleared; republish cannot be added, changed or removed.
const clearedNever = ["deny_delete", "deny_purge", "sealed"] as const

/** republish as the server keeps it: src empty or absent is ">", headers_only false. */
const republishOf = (r: StreamConfig["republish"] | undefined) =>
  r ? JSON.stringify([r.src || ">", r.dest, r.headers_only ?? false]) : "none"

/** Differences from `live` that `declared` asks for and the server cannot make. */
export function unchangeableFields(live: StreamConfig, declared: StreamDefinition): string[] {
  const out = clearedNever
    .filter((f) => live[f] === true && declared[f] !== true)
    .map((f) => `${f} is set on the live stream and the server cannot clear it`)
  // Declared and different: left out, nats.js's update keeps what the stream has.
  for (const field of ["storage", "retention"] as const) {
    if (declared[field] !== undefined && declared[field] !== live[field]) {
      out.push(
        `${field} ${live[field]} -> ${declared[field]}: the server cannot change it on a live stream`,
      )
    }
  }
  if (republishOf(live.republish) !== republishOf(declared.republish)) {
    out.push(
      `republish ${republishOf(live.republish)} -> ${republishOf(declared.republish)}: the server cannot change it on a live stream`,
    )
  }
  // What to do about any of them is the operator's call: declare what runs, or make a new stream.
  return out
}

/**
 * What a stream has when its declaration leaves a field out: nats-server's defaults, for the
 * fields that can change on a live stream. nats.js's update merges what it is given into the
 * live config, so a limit or a source deleted from a declaration stayed in force, unseen;
 * the declaration is the whole config, and a field it leaves out is set back to this.
 * (Fields the server will not change on a live stream, such as storage, retention, mirror,
 * and those unchangeableFields checks, are not here.)
 */
export const STREAM_DEFAULTS = {
  description: "",
  max_age: 0,
  max_bytes: -1,
  max_msgs: -1,
  max_msgs_per_subject: -1,
  max_msg_size: -1,
  discard: "old",
  duplicate_window: 120e9,
  num_replicas: 1,
  // None: a stream that only copies others (sources) listens on no subject. Kept from before,
  // an origin turned into a copy went on taking its subjects too, and stored events twice.
  // (One declared with neither gets the server's default, its own name.)
  subjects: [],
  sources: [],
  allow_rollup_hdrs: false,
  allow_direct: false,
  // Set by hand and kept, the stream sends no PubAck, and every publish of the relay times out.
  no_ack: false,
} as const satisfies Partial<StreamConfig>

/** The declaration with the fields it leaves out at their defaults, where `live` has others. */
export function declaredConfig(live: StreamConfig, declared: StreamDefinition): StreamDefinition {
  const out: Record<string, unknown> = { ...declared }
  for (const [field, fallback] of Object.entries(STREAM_DEFAULTS)) {
    const current = (live as unknown as Record<string, unknown>)[field]
    if (out[field] !== undefined || current === undefined) continue
    // The server's own rule: a duplicate window is never longer than max_age.
    const maxAge = (out.max_age ?? live.max_age) as number
    const value =
      field === "duplicate_window" && maxAge > 0 ? Math.min(maxAge, fallback as number) : fallback
    if (JSON.stringify(current) !== JSON.stringify(value)) out[field] = value
  }
  return out as StreamDefinition
}

/** A source as the server reports one declared by domain: by that domain's API prefix. */
function sourceAsReported(source: StreamSource): StreamSource {
  if (!source.domain) return source
  const { domain, ...rest } = source
  return { ...rest, external: { api: `$JS.${domain}.API`, deliver: "" } }
}

/**
 * An empty value: declared, it asks for the server's default, which the server writes its own
 * way (a republish `src` of "" comes back as ">"), so it is not compared.
 */
const unset = (v: unknown) =>
  v === undefined ||
  v === null ||
  v === false ||
  v === "" ||
  v === 0 ||
  (typeof v === "object" && Object.keys(v as object).length === 0)

/** Whether `got` holds everything `want` says (the server adds fields of its own). */
function holds(want: unknown, got: unknown): boolean {
  if (unset(want)) return true
  if (Array.isArray(want)) {
    return (
      Array.isArray(got) && got.length === want.length && want.every((w, i) => holds(w, got[i]))
    )
  }
  if (want !== null && typeof want === "object") {
    if (got === null || typeof got !== "object") return false
    const fields = got as Record<string, unknown>
    return Object.entries(want).every(([k, w]) => holds(w, fields[k]))
  }
  // A start time comes back in the server's own writing of the same instant.
  if (typeof want === "string" && typeof got === "string" && /^\d{4}-\d\d-\d\dT/.test(want)) {
    return Date.parse(want) === Date.parse(got)
  }
  return want === got
}

/**
 * The declared fields that the config the server answered with does not hold as declared.
 * nats-server drops a field it does not know without a word: a typo (`max_agee`) or one newer
 * than it (2.11's `allow_msg_ttl` on 2.9.10; nats.js checks the 2.10 ones itself).
 */
export function fieldsNotKept(declared: StreamDefinition, applied: StreamConfig): string[] {
  const live = applied as unknown as Record<string, unknown>
  const wanted: Record<string, unknown> = { ...declared }
  if (declared.sources) wanted.sources = declared.sources.map(sourceAsReported)
  return Object.entries(wanted)
    .filter(([field, want]) => !holds(want, live[field]))
    .map(([field]) => field)
}

/**
 * Creates missing streams and updates existing ones to their declared config (what it leaves
 * out at its default: STREAM_DEFAULTS). Never deletes
 * a stream: deleting and recreating an origin stream loses its messages and resets the
 * sequence numbers its sourced copies track. Nor does it make a change that would destroy
 * or re-fetch what a stream holds (see destructiveChanges): that is refused, whole, before
 * any stream is touched. What the server then reports is read back: a declared field it did
 * not keep (fieldsNotKept) is refused too, once every stream is applied.
 */
export async function applyStreams(
  jsm: JetStreamManager,
  definitions: readonly StreamDefinition[],
): Promise<void> {
  const planned: { definition: StreamDefinition; exists: boolean }[] = []
  const refused: string[] = []
  for (const raw of definitions) {
    const normalised = normalise(raw)
    // The server refuses a stream created sealed, and sealing one rewrites its limits and
    // discard policy, which the declaration would then contradict: an operator's act.
    if (normalised.sealed === true) {
      refused.push(`${normalised.name}: sealed is not declared (seal a stream by hand)`)
      continue
    }
    try {
      const live = await jsm.streams.info(normalised.name)
      const definition = declaredConfig(live.config, normalised)
      planned.push({ definition, exists: true })
      for (const change of [
        ...destructiveChanges(live.config, definition),
        ...unchangeableFields(live.config, definition),
      ]) {
        refused.push(`${definition.name}: ${change}`)
      }
    } catch (err) {
      if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound)) {
        throw err
      }
      planned.push({ definition: normalised, exists: false })
    }
  }
  if (refused.length > 0) {
    throw new StreamChangeRefusedError(
      `refused to apply stream changes that would destroy or re-fetch stored messages, or that the server cannot make (make them by hand if meant): ${refused.join("; ")}`,
    )
  }
  const notKept: string[] = []
  for (const { definition, exists } of planned) {
    const { name, ...rest } = definition
    const info = exists ? await jsm.streams.update(name, rest) : await jsm.streams.add(definition)
    const fields = fieldsNotKept(definition, info.config)
    if (fields.length > 0) notKept.push(`${name}: ${fields.join(", ")}`)
  }
  // Applied without them, as the server would run it: said, so the declaration is mended.
  if (notKept.length > 0) {
    throw new StreamChangeRefusedError(
      `the NATS server did not keep these declared stream fields, which it does not know (a misspelling, or a field of a later server version): ${notKept.join("; ")}`,
    )
  }
}
