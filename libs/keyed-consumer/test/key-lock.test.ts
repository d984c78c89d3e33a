// redlock 5.0.0-beta.2 (pinned) has known trouble with expired locks and extension; these
// are the cases the consumer relies on, against a private Redis.
import assert from "node:assert/strict"
import { type AddressInfo, connect, createServer, type Socket } from "node:net"
import { after, before, test } from "node:test"
import { type RedisServerHandle, startRedisServer } from "@keyway/testkit"
import { Redis } from "ioredis"
import { createRedlockKeyLock, type KeyLock } from "../src/internal/key-lock.ts"

let server: RedisServerHandle
let redis: Redis
let locks: KeyLock
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

before(async () => {
  server = await startRedisServer()
  redis = new Redis(server.url)
  locks = createRedlockKeyLock(redis)
})
after(async () => {
  redis.disconnect()
  await server[Symbol.asyncDispose]()
})

test("a held lock is refused to others until released", async () => {
  const a = await locks.tryAcquire("k1", 5000)
  assert.ok(a)
  assert.equal(await locks.tryAcquire("k1", 5000), null)
  await a.release()
  const b = await locks.tryAcquire("k1", 5000)
  assert.ok(b)
  await b.release()
})

test("extend keeps a live lock past its first expiry", async () => {
  const a = await locks.tryAcquire("k2", 300)
  assert.ok(a)
  await sleep(200)
  assert.equal(await a.extend(300), true)
  await sleep(200) // 400 ms after acquiring: alive only because of the extension
  assert.equal(await locks.tryAcquire("k2", 300), null)
  // extend() returns a new Lock in redlock 5; extending twice must use the new one.
  assert.equal(await a.extend(300), true)
  await a.release()
})

test("an expired lock cannot be extended, even if nobody took it", async () => {
  const a = await locks.tryAcquire("k3", 100)
  assert.ok(a)
  await sleep(250)
  assert.equal(await a.extend(1000), false)
  const b = await locks.tryAcquire("k3", 1000)
  assert.ok(b, "the expired lock is free for others")
  await b.release()
})

test("releasing an expired lock does not release the new holder's lock", async () => {
  const a = await locks.tryAcquire("k4", 100)
  assert.ok(a)
  await sleep(250)
  const b = await locks.tryAcquire("k4", 5000)
  assert.ok(b)
  await a.release() // must not throw, must not touch b's entry
  assert.equal(await locks.tryAcquire("k4", 5000), null, "b still holds it")
  assert.equal(await a.extend(1000), false, "a cannot take it back by extending")
  await b.release()
})

test("with Redis down, acquiring fails cleanly instead of hanging", async () => {
  const offline = new Redis(`redis://127.0.0.1:1`, {
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    lazyConnect: true,
  })
  offline.on("error", () => {})
  const offlineLocks = createRedlockKeyLock(offline)
  assert.equal(await offlineLocks.tryAcquire("k5", 1000), null)
  offline.disconnect()
})

// The timeout turns a call that never returns into a failure; the cleanup is a hook, so
// that it runs after a timeout too and the file still ends.
test("a Redis that stops answering (packets lost, no reset): each call gives up after the ttl", {
  timeout: 20_000,
}, async (t) => {
  // A forwarder that can go silent: the connection stays open and what crosses it is
  // dropped, so the client sees no error and no answer, as on a link that loses packets.
  let silent = false
  const sockets = new Set<Socket>()
  const forwarder = createServer((client) => {
    const upstream = connect(server.port, "127.0.0.1")
    for (const s of [client, upstream]) {
      sockets.add(s)
      s.on("error", () => {}).on("close", () => {
        client.destroy()
        upstream.destroy()
      })
    }
    client.on("data", (d) => silent || upstream.write(d))
    upstream.on("data", (d) => silent || client.write(d))
  })
  await new Promise<void>((r) => forwarder.listen(0, "127.0.0.1", r))
  // ioredis's defaults: no command timeout, twenty retries per command.
  const client = new Redis((forwarder.address() as AddressInfo).port, "127.0.0.1")
  client.on("error", () => {})
  t.after(async () => {
    client.disconnect()
    for (const s of sockets) s.destroy()
    await new Promise((r) => forwarder.close(r))
  })
  const viaLink = createRedlockKeyLock(client)
  const held = await viaLink.tryAcquire("k6", 500)
  assert.ok(held)
  silent = true
  assert.equal(await held.extend(500), false, "an extension nobody confirmed")
  await held.release()
  assert.equal(await viaLink.tryAcquire("k7", 500), null, "a lock nobody granted")
  assert.ok(await locks.tryAcquire("k7", 500), "k7 was free all along: the link was the fault")
})
