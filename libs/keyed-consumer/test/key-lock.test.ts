// redlock 5.0.0-beta.2 (pinned) has known trouble with expired locks and extension; these
// are the cases the consumer relies on, against a private Redis.
import assert from "node:assert/strict"
import { after, before, type TestContext, test } from "node:test"
import { createTcpProxy, type RedisServerHandle, startRedisServer, waitFor } from "@keyway/testkit"
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
  // Seconds, not a few hundred ms: a busy CI machine overslept a 200 ms sleep by more than
  // the 100 ms left of a 300 ms lock, and the extension came too late.
  const a = await locks.tryAcquire("k2", 2000)
  assert.ok(a)
  await sleep(1200)
  assert.equal(await a.extend(2000), true)
  await sleep(1200) // 2.4 s after acquiring: alive only because of the extension
  assert.ok(
    a.timeLeft() > 0,
    `the lock's own reckoning counts from the extension (${a.timeLeft()})`,
  )
  assert.equal(await locks.tryAcquire("k2", 2000), null)
  // extend() returns a new Lock in redlock 5; extending twice must use the new one.
  assert.equal(await a.extend(2000), true)
  // Counted from the extension's send: its round trip, on a busy machine, is already gone.
  assert.ok(
    a.timeLeft() > 1500 && a.timeLeft() <= 2000 - 22,
    `a fresh ttl, drift deducted (${a.timeLeft()})`,
  )
  await a.release()
  assert.ok(a.timeLeft() <= 0, "released: held no longer")
})

test("the lock's own reckoning runs out with its ttl, without asking Redis", async () => {
  const a = await locks.tryAcquire("k2b", 500)
  assert.ok(a)
  assert.ok(a.timeLeft() > 0)
  // Redis is not asked: a frozen process must know the moment it resumes.
  await sleep(600)
  assert.ok(a.timeLeft() <= 0, `expired by its own clock (${a.timeLeft()})`)
  await a.release()
})

// Locks of 500 ms, not 100: redlock counts an acquire that took longer than the lock's
// validity as failed, and a fresh-clone CI run, the machine busy, got null for a 100 ms one.
test("an expired lock cannot be extended, even if nobody took it", async () => {
  const a = await locks.tryAcquire("k3", 500)
  assert.ok(a)
  await sleep(800)
  assert.equal(await a.extend(1000), false)
  const b = await locks.tryAcquire("k3", 1000)
  assert.ok(b, "the expired lock is free for others")
  await b.release()
})

test("releasing an expired lock does not release the new holder's lock", async () => {
  const a = await locks.tryAcquire("k4", 500)
  assert.ok(a)
  await sleep(800)
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

/** A client that reaches the private Redis through a proxy the test can stall. */
async function clientThroughProxy(t: TestContext) {
  const proxy = await createTcpProxy({ host: "127.0.0.1", port: server.port })
  // ioredis's defaults: no command timeout, twenty retries per command.
  const client = new Redis(proxy.port, proxy.host)
  client.on("error", () => {})
  // Hooks, so that they run after a test's timeout too and the file still ends.
  t.after(async () => {
    client.disconnect()
    await proxy.close()
  })
  await client.ping() // connected and ready before the link goes quiet
  return { proxy, client }
}

// The timeouts turn a call that never returns into a failure.
test("a Redis that stops answering (a link gone quiet, no reset): each call gives up", {
  timeout: 20_000,
}, async (t) => {
  const { proxy, client } = await clientThroughProxy(t)
  const viaLink = createRedlockKeyLock(client)
  const held = await viaLink.tryAcquire("k6", 600)
  assert.ok(held)
  proxy.stall()
  assert.equal(await held.extend(600), false, "an extension nobody confirmed")
  await held.release()
  assert.equal(await viaLink.tryAcquire("k7", 600), null, "a lock nobody granted")
  const direct = await locks.tryAcquire("k7", 600)
  assert.ok(direct, "k7 was free all along: the link was at fault")
  await direct.release()
})

test("a lock granted after tryAcquire gave up on it is handed back", {
  timeout: 20_000,
}, async (t) => {
  const { proxy, client } = await clientThroughProxy(t)
  const viaLink = createRedlockKeyLock(client)
  // What the scripts do to the key, as Redis runs them.
  const monitor = await redis.monitor()
  t.after(() => monitor.disconnect())
  const seen: string[] = []
  monitor.on("monitor", (_time: string, args: string[]) => {
    if (args[1] === "k8") seen.push(String(args[0]).toLowerCase())
  })
  proxy.stall()
  assert.equal(await viaLink.tryAcquire("k8", 6000), null)
  // The request reaches Redis after all and takes the lock; the answer, come late, is let go
  // of at once instead of holding the key for its 6 s.
  proxy.resume()
  await waitFor(() => seen.includes("del"), { timeoutMs: 5000, message: "the late lock released" })
  assert.deepEqual(
    seen.filter((c) => c === "set" || c === "del"),
    ["set", "del"],
  )
  assert.equal(await redis.exists("k8"), 0)
})

test("an extension answered after release() was sent does not count the lock held again", {
  timeout: 20_000,
}, async (t) => {
  const { proxy, client } = await clientThroughProxy(t)
  const viaLink = createRedlockKeyLock(client)
  const held = await viaLink.tryAcquire("k8", 5000)
  assert.ok(held)
  // The heartbeat's extension goes out, then the drain ends and releases; Redis answers them
  // in order, the extension first.
  proxy.stall()
  const extending = held.extend(5000)
  const releasing = held.release()
  proxy.resume()
  await Promise.all([extending, releasing])
  assert.ok(held.timeLeft() <= 0, `released, whatever the extension said (${held.timeLeft()})`)
  const next = await locks.tryAcquire("k8", 5000)
  assert.ok(next, "released in Redis too")
  await next.release()
})
