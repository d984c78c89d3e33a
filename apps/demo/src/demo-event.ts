// What each site's demo traffic says. A factory reports items changing; the cloud sends
// commands to the factory's lines: the two directions of DESIGN.md §1, one event type each.
import type { OutboxEvent } from "@keyway/outbox"
import { DemoCommandSent, DemoItemChanged } from "@keyway/schemas"

const commands = ["start", "stop", "recalibrate", "reload-recipe"] as const

/** The `n`th demo event of `site`, on one of `keys` keys. */
export function demoEvent(site: string, n: number, keys: number): OutboxEvent {
  const k = Math.floor(Math.random() * keys)
  if (site === "cloud") {
    return {
      type: DemoCommandSent.type,
      key: `line-${k}`,
      payload: { n, command: commands[n % commands.length]! },
    }
  }
  return { type: DemoItemChanged.type, key: `item-${k}`, payload: { n, note: `from ${site}` } }
}

/**
 * When the next demo write is due, `rate` per second after the last one was due: a fixed
 * pace, without a burst to catch up after an outage (demo traffic, not a backlog). Paced from
 * its start instead, ten minutes of Postgres away at 50/s came back as 30,000 writes flat out.
 */
export function nextDue(due: number, rate: number, now = Date.now()): number {
  return Math.max(due + 1000 / rate, now - 1000)
}
