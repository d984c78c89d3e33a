// The relay as the benchmarks run it: its own process (apps/relay), as deployed. In the
// benchmark's process it would share an event loop with the writers and wait behind their
// callbacks.
import { fileURLToPath } from "node:url"
import { spawnTs, type TsChild } from "@keyway/testkit"
import { hasExited } from "./cleanups.ts"

export const relayEntry = fileURLToPath(new URL("../../apps/relay/src/main.ts", import.meta.url))

/** Starts a relay process and returns once it has taken the lead. */
export async function startRelayProcess(env: Record<string, string>): Promise<TsChild> {
  const relay = spawnTs(relayEntry, env)
  // A relay that waits for ever (NATS or Postgres away) held the benchmark as long.
  const deadline = Date.now() + 60_000
  while (!relay.json().some((l) => l.message === "relay active")) {
    if (hasExited(relay)) throw new Error(`the relay died at start: ${relay.lines.join("\n")}`)
    if (Date.now() > deadline) {
      relay.kill("SIGKILL")
      throw new Error(`the relay did not lead within 60 s: ${relay.lines.join("\n")}`)
    }
    await new Promise((r) => setTimeout(r, 20))
  }
  return relay
}
