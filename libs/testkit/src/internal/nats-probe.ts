import { open } from "node:fs/promises"
import { httpGet } from "./http-get.ts"
import { tcpProbe } from "./tcp-probe.ts"

export interface NatsProbeSpec {
  port: number
  httpPort: number
  /** Healthy only once JetStream is up. */
  jetstream: boolean
  /** Where the server's stdout and stderr go. */
  logPath: string
}

/**
 * One readiness check of the nats-server `pid`, whose output is appended to the log from
 * `logStart` on; false rather than throwing, for a poll loop. Another test's server on our
 * client port (a free-port race, or the port taken while ours was stopped for a restart)
 * answers with an INFO just as ours would. Its `server_id` is what tells them apart: a new
 * random one each time a server starts, which ours writes to its log on a line that starts
 * with its pid. Names cannot: the repository's configs fix them (cloud-hub), and parallel
 * test files start servers from the same config.
 */
export async function natsReady(
  spec: NatsProbeSpec,
  pid: number,
  logStart: number,
): Promise<boolean> {
  const id = await loggedServerId(spec.logPath, pid, logStart)
  if (id === undefined) return false
  if (!(await tcpProbe({ port: spec.port, expect: infoOf(id) }))) return false
  // Asked only now: nats-server opens its monitor before the client port and exits when it
  // cannot, so once the client port is ours the monitor is too. And /healthz alone will not
  // do, as it answers before clients can connect.
  const path = spec.jetstream ? "/healthz?js-enabled-only=1" : "/healthz"
  const health = await httpGet(`http://127.0.0.1:${spec.httpPort}${path}`).catch(() => undefined)
  return health?.status === 200
}

// The startup banner is the first thing the server writes; this much holds it many times over.
const bannerBytes = 64 * 1024

/** The ID the server `pid` logged at startup ("[pid] … [INF]   ID:  N…"), once it has. */
async function loggedServerId(
  logPath: string,
  pid: number,
  from: number,
): Promise<string | undefined> {
  let text: string
  try {
    const file = await open(logPath, "r")
    try {
      const buf = Buffer.alloc(bannerBytes)
      const { bytesRead } = await file.read(buf, 0, bannerBytes, from)
      text = buf.toString("utf8", 0, bytesRead)
    } finally {
      await file.close()
    }
  } catch {
    return undefined
  }
  // Server IDs are nkeys: "N" and 55 base32 characters. The line's end is required, so a
  // line still being written is not read short.
  const line = new RegExp(`^\\[${pid}\\] .*\\[INF\\]\\s+ID:\\s+(N[A-Z2-7]{55})\\s*\\n`, "m")
  return line.exec(text)?.[1]
}

/** The verdict on the first line a NATS server sends: its INFO, naming the server `id`. */
function infoOf(id: string) {
  return (data: string): boolean | undefined => {
    const end = data.indexOf("\n")
    if (end < 0) return undefined
    const line = data.slice(0, end)
    if (!line.startsWith("INFO ")) return false
    try {
      return (JSON.parse(line.slice(5)) as { server_id?: unknown }).server_id === id
    } catch {
      return false
    }
  }
}
