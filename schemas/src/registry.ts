import type { EventType } from "./define-event.ts"
import { DemoCommandSent, DemoItemChanged } from "./demo.ts"
import { EslLabelRender } from "./esl-label.ts"

// Every event type Keyway knows, by name. Adding a topic module means adding it here; the
// outbox refuses names that are not listed, so a typo fails at the writer, not downstream.
const all: readonly EventType<any>[] = [DemoItemChanged, DemoCommandSent, EslLabelRender]

export const eventTypes: ReadonlyMap<string, EventType<any>> = new Map(all.map((e) => [e.type, e]))

export function findEventType(type: string): EventType<any> | undefined {
  return eventTypes.get(type)
}
