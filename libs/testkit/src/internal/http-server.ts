import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http"
import type { AddressInfo } from "node:net"

/** Reads a request body whole. */
export function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    req.on("data", (c: Buffer) => chunks.push(c))
    req.on("end", () => resolve(Buffer.concat(chunks)))
    req.on("error", reject)
  })
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers = {}) {
  if (res.destroyed || res.headersSent) return
  res
    .writeHead(status, { "content-type": "application/json", ...headers })
    .end(JSON.stringify(body))
}

/**
 * An HTTP server on 127.0.0.1 and a port the OS picks (no race with another test taking it).
 * close() also drops open connections: a fake that holds requests to inject timeouts would
 * otherwise keep the test process alive.
 */
export async function listenHttp(
  port: number,
  handle: (req: IncomingMessage, res: ServerResponse) => Promise<void>,
): Promise<{ server: Server; url: string; close(): Promise<void> }> {
  const server = createServer((req, res) => {
    handle(req, res).catch((err) => sendJson(res, 500, { error: String(err) }))
  })
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject)
    server.listen(port, "127.0.0.1", () => resolve())
  })
  const a = server.address() as AddressInfo
  let closed: Promise<void> | undefined
  return {
    server,
    url: `http://127.0.0.1:${a.port}`,
    close() {
      closed ??= new Promise<void>((resolve) => {
        server.close(() => resolve())
        server.closeAllConnections()
      })
      return closed
    },
  }
}
