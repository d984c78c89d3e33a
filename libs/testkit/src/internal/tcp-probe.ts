import { connect } from "node:net"

export interface TcpProbeOptions {
  port: number
  host?: string
  /** Written once the connection is up. */
  send?: string
  /** Judges the bytes received so far: true or false settles the probe, undefined reads on. */
  expect: (received: string) => boolean | undefined
  timeoutMs?: number
}

/** One connection attempt; resolves false instead of throwing so it can sit in a poll loop. */
export function tcpProbe(options: TcpProbeOptions): Promise<boolean> {
  return new Promise((resolve) => {
    let received = ""
    let settled = false
    const socket = connect({ port: options.port, host: options.host ?? "127.0.0.1" })
    const finish = (ok: boolean) => {
      if (settled) return
      settled = true
      socket.destroy()
      resolve(ok)
    }
    socket.setTimeout(options.timeoutMs ?? 1000, () => finish(false))
    socket.once("error", () => finish(false))
    socket.once("close", () => finish(false))
    socket.once("connect", () => {
      if (options.send !== undefined) socket.write(options.send)
    })
    socket.on("data", (chunk: Buffer) => {
      received += chunk.toString("latin1")
      const verdict = options.expect(received)
      if (verdict !== undefined) finish(verdict)
    })
  })
}
