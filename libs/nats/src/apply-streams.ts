import { readFile } from "node:fs/promises"
import {
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
  type StreamConfig,
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

export async function loadStreamDefinitions(path: string): Promise<StreamDefinition[]> {
  const parsed = JSON.parse(await readFile(path, "utf8")) as { streams?: StreamDefinition[] }
  if (!Array.isArray(parsed.streams)) throw new Error(`${path}: expected {"streams": [...]}`)
  return parsed.streams.map(normalise)
}

/**
 * Creates missing streams and updates existing ones to their declared config. Never deletes
 * a stream: deleting and recreating an origin stream loses its messages and resets the
 * sequence numbers its sourced copies track.
 */
export async function applyStreams(
  jsm: JetStreamManager,
  definitions: readonly StreamDefinition[],
): Promise<void> {
  for (const raw of definitions) {
    const definition = normalise(raw)
    let exists = true
    try {
      await jsm.streams.info(definition.name)
    } catch (err) {
      if (err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound) {
        exists = false
      } else throw err
    }
    if (exists) {
      const { name, ...rest } = definition
      await jsm.streams.update(name, rest)
    } else {
      await jsm.streams.add(definition)
    }
  }
}
