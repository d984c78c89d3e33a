import { connect, createServer, type Socket } from "node:net"

export interface TcpProxyTarget {
  host: string
  port: number
}

export interface TcpProxy {
  readonly host: string
  readonly port: number
  /** Connections currently forwarded. */
  readonly connections: number
  /**
   * Bytes the clients have sent towards the target so far, those a stall holds included: a
   * test can see that a request left before the answer to the one ahead of it came back, or
   * that one is waiting in a stall.
   */
  readonly bytesToTarget: number
  /**
   * Destroys every forwarded connection and, until restore(), every new one as soon as it is
   * accepted: both ends see the link drop and every reconnect attempt fail.
   */
  cut(): void
  restore(): void
  /**
   * Stops forwarding without closing anything: what either side sends waits in the proxy
   * until resume(), as on a link that stops delivering packets without a reset. Neither end
   * sees an error, only no answer. New connections are accepted and held the same way.
   */
  stall(): void
  /** Delivers what waited, in order, and forwards again. */
  resume(): void
  close(): Promise<void>
  [Symbol.asyncDispose](): Promise<void>
}

/** A TCP forwarder on a free 127.0.0.1 port, to cut and restore a link (a NATS leaf, say). */
export function createTcpProxy(target: TcpProxyTarget): Promise<TcpProxy> {
  // What each direction of a stalled pair has read and holds, in order; undefined while the
  // pair forwards.
  interface Pair {
    client: Socket
    upstream: Socket
    toUpstream?: Buffer[]
    toClient?: Buffer[]
    // An end (FIN) read during a stall, passed on after what was held, on resume.
    clientEnded?: boolean
    upstreamEnded?: boolean
  }
  const pairs = new Set<Pair>()
  let bytesToTarget = 0
  let isCut = false
  let isStalled = false
  const forward = (p: Pair) => {
    // What was held goes first, in the same tick as the pipes are set up: nothing read
    // meanwhile can pass it.
    for (const chunk of p.toUpstream ?? []) p.upstream.write(chunk)
    for (const chunk of p.toClient ?? []) p.client.write(chunk)
    p.toUpstream = undefined
    p.toClient = undefined
    // An end read during the stall, after what came before it; pipe() passes on later ones.
    if (p.clientEnded) p.upstream.end()
    else p.client.pipe(p.upstream)
    if (p.upstreamEnded) p.client.end()
    else p.upstream.pipe(p.client)
  }
  // Read on and kept here, rather than left unread in the kernel's buffers: the proxy can
  // then count what a client sent into the stall.
  const hold = (p: Pair) => {
    p.client.unpipe(p.upstream)
    p.upstream.unpipe(p.client)
    p.toUpstream ??= []
    p.toClient ??= []
    // unpipe() pauses a source left without a destination; the 'data' listeners read on.
    p.client.resume()
    p.upstream.resume()
  }

  // Half-open, both sockets: an end read during a stall must not close the other side before
  // the bytes held ahead of it (Node's default answers a FIN with its own at once).
  const server = createServer({ allowHalfOpen: true }, (client) => {
    if (isCut) {
      client.destroy()
      return
    }
    const upstream = connect({ host: target.host, port: target.port, allowHalfOpen: true })
    const pair: Pair = { client, upstream }
    pairs.add(pair)
    // Either side failing or closing ends both: a half-dead pair would hide the cut.
    const teardown = () => {
      pairs.delete(pair)
      client.destroy()
      upstream.destroy()
    }
    client.on("error", teardown).on("close", teardown)
    client.on("data", (chunk: Buffer) => {
      bytesToTarget += chunk.length
      pair.toUpstream?.push(chunk)
    })
    upstream.on("data", (chunk: Buffer) => {
      pair.toClient?.push(chunk)
    })
    client.on("end", () => {
      if (pair.toUpstream) pair.clientEnded = true
    })
    upstream.on("end", () => {
      if (pair.toClient) pair.upstreamEnded = true
    })
    upstream.on("error", teardown).on("close", teardown)
    if (isStalled) hold(pair)
    else forward(pair)
  })

  const destroyAll = () => {
    for (const { client, upstream } of pairs) {
      client.destroy()
      upstream.destroy()
    }
    pairs.clear()
  }

  return new Promise((resolve, reject) => {
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      server.off("error", reject)
      const address = server.address()
      if (address === null || typeof address === "string") {
        server.close()
        reject(new Error(`unexpected listen address: ${String(address)}`))
        return
      }
      let closed: Promise<void> | undefined
      const close = () => {
        closed ??= new Promise<void>((done) => {
          isCut = true
          destroyAll()
          server.close(() => done())
        })
        return closed
      }
      resolve({
        host: "127.0.0.1",
        port: address.port,
        get connections() {
          return pairs.size
        },
        get bytesToTarget() {
          return bytesToTarget
        },
        cut: () => {
          isCut = true
          destroyAll()
        },
        restore: () => {
          isCut = false
        },
        stall: () => {
          isStalled = true
          for (const pair of pairs) hold(pair)
        },
        resume: () => {
          // Only a stalled proxy resumes: piping a pair that already forwards would send
          // everything twice.
          if (!isStalled) return
          isStalled = false
          for (const pair of pairs) forward(pair)
        },
        close,
        [Symbol.asyncDispose]: close,
      })
    })
  })
}
