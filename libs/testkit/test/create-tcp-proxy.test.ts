import assert from "node:assert/strict"
import { once } from "node:events"
import { connect, createServer, type Server, type Socket } from "node:net"
import { test } from "node:test"
import { createTcpProxy, waitFor } from "../src/index.ts"

async function startEchoServer(): Promise<Server & AsyncDisposable> {
  const sockets = new Set<Socket>()
  const server = createServer((socket) => {
    sockets.add(socket)
    socket.on("close", () => sockets.delete(socket))
    socket.on("error", () => {})
    socket.pipe(socket)
  })
  server.listen(0, "127.0.0.1")
  await once(server, "listening")
  return Object.assign(server, {
    [Symbol.asyncDispose]: async () => {
      for (const s of sockets) s.destroy()
      await new Promise((resolve) => server.close(resolve))
    },
  })
}

function portOf(server: Server): number {
  const address = server.address()
  assert.ok(address && typeof address === "object")
  return address.port
}

async function open(port: number): Promise<Socket> {
  const socket = connect({ port, host: "127.0.0.1" })
  socket.setEncoding("utf8")
  await once(socket, "connect")
  return socket
}

async function echo(socket: Socket, text: string): Promise<string> {
  socket.write(text)
  let got = ""
  while (got.length < text.length) {
    const [chunk] = await once(socket, "data")
    got += chunk
  }
  return got
}

/** True when the socket closes (or errors) within the time, without receiving anything. */
async function closesWithin(socket: Socket, ms: number): Promise<boolean> {
  if (socket.destroyed || socket.readableEnded) return true
  const closed = new Promise<boolean>((resolve) => {
    socket.once("close", () => resolve(true))
    socket.once("end", () => resolve(true))
    socket.once("error", () => resolve(true))
  })
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), ms)
  })
  const result = await Promise.race([closed, timeout])
  clearTimeout(timer)
  return result
}

test("the proxy forwards, cuts and restores", async () => {
  await using upstream = await startEchoServer()
  await using proxy = await createTcpProxy({ host: "127.0.0.1", port: portOf(upstream) })
  assert.equal(proxy.host, "127.0.0.1")

  const a = await open(proxy.port)
  assert.equal(await echo(a, "hello"), "hello")
  assert.equal(await echo(a, "x".repeat(100_000)), "x".repeat(100_000))
  await waitFor(() => proxy.connections === 1, { timeoutMs: 1000, message: "one connection" })
  assert.equal(proxy.bytesToTarget, 100_005, "what the client sent, not what came back")

  proxy.cut()
  assert.equal(await closesWithin(a, 1000), true)
  assert.equal(proxy.connections, 0)

  // While cut, a new connection is accepted by the kernel and dropped at once.
  const b = connect({ port: proxy.port, host: "127.0.0.1" })
  b.on("error", () => {})
  b.write("anyone?")
  assert.equal(await closesWithin(b, 1000), true)
  b.destroy()

  proxy.restore()
  const c = await open(proxy.port)
  assert.equal(await echo(c, "back"), "back")
  assert.equal(proxy.bytesToTarget, 100_009, "nothing counted of the connection dropped while cut")
  c.destroy()
  a.destroy()
})

test("an unreachable target closes the client's connection", async () => {
  await using upstream = await startEchoServer()
  const port = portOf(upstream)
  await upstream[Symbol.asyncDispose]()
  await using proxy = await createTcpProxy({ host: "127.0.0.1", port })
  const socket = await open(proxy.port)
  assert.equal(await closesWithin(socket, 1000), true)
  await waitFor(() => proxy.connections === 0, { timeoutMs: 1000, message: "pair removed" })
})

test("close ends forwarded connections and is idempotent", async () => {
  await using upstream = await startEchoServer()
  const proxy = await createTcpProxy({ host: "127.0.0.1", port: portOf(upstream) })
  const socket = await open(proxy.port)
  assert.equal(await echo(socket, "hi"), "hi")
  await Promise.all([proxy.close(), proxy[Symbol.asyncDispose]()])
  assert.equal(await closesWithin(socket, 1000), true)
  await assert.rejects(open(proxy.port), { code: "ECONNREFUSED" })
})

test("a stalled proxy holds what both sides send, connections open, and delivers it on resume", async () => {
  await using upstream = await startEchoServer()
  await using proxy = await createTcpProxy({ host: "127.0.0.1", port: portOf(upstream) })
  const a = await open(proxy.port)
  assert.equal(await echo(a, "before"), "before")
  proxy.stall()
  // One already open and one opened while stalled; what each receives from here on.
  const b = await open(proxy.port)
  const got = new Map<Socket, string>([
    [a, ""],
    [b, ""],
  ])
  for (const s of [a, b]) {
    s.on("error", () => {})
    s.on("data", (chunk) => got.set(s, (got.get(s) ?? "") + chunk))
  }
  const sentBefore = proxy.bytesToTarget
  a.write("held")
  b.write("new")
  // Counted as sent, though held: a test can wait for a request to be in the stall.
  await waitFor(() => proxy.bytesToTarget === sentBefore + 7, {
    timeoutMs: 5000,
    message: () => `the held bytes counted (${proxy.bytesToTarget - sentBefore})`,
  })
  // Nothing comes back and nothing closes while stalled: a silent link, not a broken one.
  assert.equal(await closesWithin(a, 300), false)
  assert.deepEqual([got.get(a), got.get(b)], ["", ""])
  assert.equal(proxy.connections, 2)
  proxy.resume()
  await waitFor(() => got.get(a) === "held" && got.get(b) === "new", {
    timeoutMs: 5000,
    message: "the held bytes, echoed",
  })
  a.destroy()
  b.destroy()
})

test("an end sent into a stall is held behind the bytes before it, and passed on at resume", async () => {
  await using upstream = await startEchoServer()
  await using proxy = await createTcpProxy({ host: "127.0.0.1", port: portOf(upstream) })
  const a = await open(proxy.port)
  assert.equal(await echo(a, "before"), "before")
  proxy.stall()
  let got = ""
  let ended = false
  a.on("data", (chunk: string) => {
    got += chunk
  })
  a.on("end", () => {
    ended = true
  })
  const sent = proxy.bytesToTarget
  a.end("last words")
  await waitFor(() => proxy.bytesToTarget === sent + 10, {
    timeoutMs: 5000,
    message: "the last words read into the stall",
  })
  // Neither the words nor the end have reached the echo: nothing comes back, nothing closes.
  assert.equal(await closesWithin(a, 300), false)
  assert.equal(proxy.connections, 1)
  proxy.resume()
  // The echo server got the words, then the end: it echoed them, then ended too.
  await waitFor(() => got === "last words" && ended, {
    timeoutMs: 5000,
    message: () => `echoed and ended (got ${JSON.stringify(got)}, ended ${ended})`,
  })
  await waitFor(() => proxy.connections === 0, { timeoutMs: 5000, message: "pair gone" })
})

test("resume without a stall, or twice, forwards everything once", async () => {
  await using target = await startEchoServer()
  await using proxy = await createTcpProxy({ host: "127.0.0.1", port: portOf(target) })
  const socket = await open(proxy.port)
  // The proxy's side of the connection exists: resume() acts on it.
  await waitFor(() => proxy.connections === 1, { timeoutMs: 5000, message: "accepted" })
  proxy.resume()
  proxy.stall()
  proxy.resume()
  proxy.resume()
  let got = ""
  socket.on("data", (chunk: string) => {
    got += chunk
  })
  socket.write("once")
  // Copies would arrive within this, after the first.
  await new Promise((r) => setTimeout(r, 300))
  assert.equal(got, "once")
  socket.destroy()
})
