import { readFileSync } from "node:fs"
import { createServer } from "node:net"

// Ports are taken from below the kernel's ephemeral range. A server that a test kills and
// restarts must get its port back, and while it is down, every outgoing connection on the
// machine (clients retrying it, for a start) takes a source port from the ephemeral range;
// one of them holding the server's port would make the restart fail.
const fallbackRange = { low: 20_000, high: 32_767 }

function belowEphemeralRange(): { low: number; high: number } | undefined {
  try {
    const [ephemeralLow] = readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8")
      .trim()
      .split(/\s+/)
      .map(Number)
    if (ephemeralLow === undefined || !Number.isInteger(ephemeralLow)) return undefined
    const high = Math.min(ephemeralLow - 1, fallbackRange.high)
    return high - fallbackRange.low >= 1000 ? { low: fallbackRange.low, high } : undefined
  } catch {
    return undefined
  }
}

const range = belowEphemeralRange()

function tryListen(port: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    const server = createServer()
    server.unref()
    server.once("error", () => resolve(undefined))
    server.listen({ port, host: "127.0.0.1", exclusive: true }, () => {
      const address = server.address()
      const bound = address !== null && typeof address === "object" ? address.port : undefined
      server.close(() => resolve(bound))
    })
  })
}

/**
 * A TCP port on 127.0.0.1 that was free a moment ago. Another process can still take it
 * before the caller binds it; testkit's servers retry with fresh ports when that happens.
 */
export async function freePort(): Promise<number> {
  if (range) {
    for (let i = 0; i < 20; i++) {
      const candidate = range.low + Math.floor(Math.random() * (range.high - range.low + 1))
      const port = await tryListen(candidate)
      if (port !== undefined) return port
    }
  }
  const port = await tryListen(0)
  if (port === undefined) throw new Error("no free TCP port on 127.0.0.1")
  return port
}
