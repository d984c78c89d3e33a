import { join } from "node:path"
import { freePort } from "./free-port.ts"
import { redisServerBinary } from "./internal/binaries.ts"
import {
  isAddressInUse,
  lifecycleOf,
  ManagedServer,
  type ServerLifecycle,
} from "./internal/managed-server.ts"
import { tcpProbe } from "./internal/tcp-probe.ts"
import { createTempDir } from "./internal/temp-dir.ts"

export interface RedisServerOptions {
  /** "none" (default): data lives in memory only; "aof": appendonly, fsync every second. */
  persistence?: "none" | "aof"
  /** Defaults to 10 s. */
  readyTimeoutMs?: number
}

export interface RedisServerHandle extends ServerLifecycle {
  /** `redis://127.0.0.1:<port>` */
  readonly url: string
  readonly port: number
  /** The temp directory, also the server's `dir`; removed on dispose. */
  readonly dir: string
  readonly logPath: string
}

const startAttempts = 3

/** Starts a private redis-server on a free port and resolves once it answers PING. */
export async function startRedisServer(
  options: RedisServerOptions = {},
): Promise<RedisServerHandle> {
  const temp = await createTempDir("redis")
  const dir = temp.path
  const logPath = join(dir, "redis.log")
  try {
    for (let attempt = 1; ; attempt++) {
      const port = await freePort()
      const server = new ManagedServer({
        label: "redis-server",
        command: redisServerBinary,
        args: [
          "--port",
          String(port),
          "--bind",
          "127.0.0.1",
          "--dir",
          dir,
          // No RDB snapshots: a restarted server holds what the AOF holds, or nothing.
          "--save",
          "",
          "--appendonly",
          options.persistence === "aof" ? "yes" : "no",
          "--daemonize",
          "no",
        ],
        logPath,
        cwd: dir,
        readyTimeoutMs: options.readyTimeoutMs ?? 10_000,
        // While it loads the AOF the server answers -LOADING, so only +PONG means ready; and
        // INFO's process_id says the answer is this server's.
        probe: (pid) =>
          tcpProbe({ port, send: "PING\r\nINFO server\r\n", expect: redisReadyAs(pid) }),
      })
      try {
        await server.start()
      } catch (err) {
        if (attempt < startAttempts && isAddressInUse(err)) continue
        throw err
      }
      return Object.assign(
        lifecycleOf(server, () => temp.remove()),
        {
          url: `redis://127.0.0.1:${port}`,
          port,
          dir,
          logPath,
        },
      )
    }
  } catch (err) {
    // A ServerStartError already carries the log's tail, so the directory can go.
    await temp.remove()
    throw err
  }
}

/**
 * The verdict on the answers to PING and INFO: undefined until they are whole. Read as
 * latin1, one character a byte, as the bulk string's length counts them.
 */
function redisReadyAs(pid: number) {
  return (data: string): boolean | undefined => {
    const pong = data.indexOf("\r\n")
    if (pong < 0) return undefined
    if (!data.startsWith("+PONG")) return false
    const info = /^\$(\d+)\r\n/.exec(data.slice(pong + 2))
    if (!info) return data.length > pong + 2 && data[pong + 2] !== "$" ? false : undefined
    const body = data.slice(pong + 2 + info[0].length)
    if (body.length < Number(info[1])) return undefined
    return body.includes(`\r\nprocess_id:${pid}\r\n`)
  }
}
