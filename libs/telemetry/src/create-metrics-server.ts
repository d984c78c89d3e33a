import { createServer, type IncomingMessage, type ServerResponse } from "node:http"
import type { AddressInfo } from "node:net"
import type { MetricsRegistry } from "./create-metrics-registry.ts"

export interface MetricsServerConfig {
  registry: MetricsRegistry
  /** 0 picks a free port (see `url` after start). */
  port: number
  /** Default 0.0.0.0: Prometheus scrapes from another host. */
  host?: string
}

export interface MetricsServer {
  start(): Promise<void>
  stop(): Promise<void>
  /** `http://host:port`, once started. */
  readonly url: string
  [Symbol.asyncDispose](): Promise<void>
}

/**
 * A request handler answering `GET /metrics` from the registry and 404 otherwise, for apps
 * that already run an HTTP server.
 */
export function metricsHandler(registry: MetricsRegistry) {
  return async (req: IncomingMessage, res: ServerResponse) => {
    if (req.method !== "GET" || (req.url ?? "").split("?")[0] !== "/metrics") {
      res.writeHead(404).end()
      return
    }
    try {
      const { contentType, body } = await registry.render()
      res.writeHead(200, { "content-type": contentType }).end(body)
    } catch (err) {
      res.writeHead(500, { "content-type": "text/plain" }).end(String(err))
    }
  }
}

/** A small HTTP server with only `/metrics`, for apps with no HTTP server of their own. */
export function createMetricsServer(config: MetricsServerConfig): MetricsServer {
  const handle = metricsHandler(config.registry)
  const server = createServer((req, res) => void handle(req, res))
  let url = ""
  return {
    get url() {
      return url
    },
    start: () =>
      new Promise<void>((resolve, reject) => {
        server.once("error", reject)
        server.listen(config.port, config.host ?? "0.0.0.0", () => {
          // Past listen(), an error (say, accept() out of file descriptors) must not find
          // the stale reject, nor, the time after, no listener at all: that would be an
          // uncaught exception in a process whose job is elsewhere.
          server.off("error", reject)
          server.on("error", (err) =>
            console.error(
              JSON.stringify({ level: "error", message: "metrics server", error: err.message }),
            ),
          )
          const a = server.address() as AddressInfo
          url = `http://${a.address === "0.0.0.0" ? "127.0.0.1" : a.address}:${a.port}`
          resolve()
        })
      }),
    stop: () =>
      new Promise<void>((resolve) => {
        if (!server.listening) return resolve()
        server.close(() => resolve())
        server.closeAllConnections()
      }),
    [Symbol.asyncDispose]() {
      return this.stop()
    },
  }
}

/**
 * For an app's start-up: serves `/metrics` when a port is configured (METRICS_PORT, see
 * `metricsPortEnv`), and is undefined otherwise, so shutdown can call `stop()?.`.
 */
export async function serveMetrics(
  registry: MetricsRegistry,
  port: number | undefined,
): Promise<MetricsServer | undefined> {
  if (port === undefined) return undefined
  const server = createMetricsServer({ registry, port })
  await server.start()
  return server
}
