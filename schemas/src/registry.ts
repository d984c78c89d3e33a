import type { EventType } from "./define-event.ts"
import { DemoCommandSent, DemoItemChanged } from "./demo.ts"
import { EslLabelPages, EslLabelRender } from "./esl-label.ts"

// Every event type Keyway knows, by name. Adding a topic module means adding it here; the
// outbox refuses names that are not listed, so a typo fails at the writer, not downstream.
const all: readonly EventType<any>[] = [
  DemoItemChanged,
  DemoCommandSent,
  EslLabelRender,
  EslLabelPages,
]

/**
 * The types by name. Two of one name are refused: a module copied to start a v2 that kept
 * its v1 name would otherwise replace the first schema without a word, and events already
 * written would be read with the other one. Versions of one name under two topics are
 * refused too: during a rolling upgrade old and new writers would put one key's events in
 * two orders, each run without regard to the other.
 */
export function registryOf(types: readonly EventType<any>[]): ReadonlyMap<string, EventType<any>> {
  const byName = new Map<string, EventType<any>>()
  const topicOf = new Map<string, EventType<any>>()
  for (const e of types) {
    if (byName.has(e.type)) throw new Error(`event type ${e.type} is defined twice`)
    byName.set(e.type, e)
    const unversioned = e.type.replace(/\.v[0-9]+$/, "")
    const other = topicOf.get(unversioned)
    if (other && other.topic !== e.topic) {
      throw new Error(
        `event types ${other.type} and ${e.type} are versions of one event under two topics, ${other.topic} and ${e.topic}: one key's events would be ordered apart`,
      )
    }
    topicOf.set(unversioned, e)
  }
  return byName
}

export const eventTypes = registryOf(all)

export function findEventType(type: string): EventType<any> | undefined {
  return eventTypes.get(type)
}
