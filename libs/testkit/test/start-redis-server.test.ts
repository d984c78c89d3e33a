import assert from "node:assert/strict"
import { stat } from "node:fs/promises"
import { connect, createServer } from "node:net"
import { test } from "node:test"
import { startRedisServer } from "../src/index.ts"

/** Sends one inline command; returns a status reply's line or a bulk reply's value. */
function command(port: number, line: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let data = ""
    const socket = connect({ port, host: "127.0.0.1" }, () => socket.write(`${line}\r\n`))
    socket.setEncoding("utf8")
    socket.on("data", (chunk: string) => {
      data += chunk
      // A bulk reply ($n) has its value on the next line; $-1 is nil.
      const needed = data.startsWith("$") && !data.startsWith("$-1") ? 2 : 1
      const lines = data.split("\r\n")
      if (lines.length > needed) {
        socket.destroy()
        resolve(lines[needed - 1]!)
      }
    })
    socket.on("error", reject)
  })
}

test("redis answers PING and restarts on the same port", async () => {
  await using redis = await startRedisServer()
  assert.equal(redis.url, `redis://127.0.0.1:${redis.port}`)
  assert.equal(await command(redis.port, "PING"), "+PONG")
  assert.equal(await command(redis.port, "SET k v"), "+OK")

  await redis.restart()
  assert.equal(await command(redis.port, "PING"), "+PONG")
  // No persistence: a restart forgets everything.
  assert.equal(await command(redis.port, "GET k"), "$-1")

  await redis.kill()
  await assert.rejects(command(redis.port, "PING"), { code: "ECONNREFUSED" })
  await redis.start()
  assert.equal(await command(redis.port, "PING"), "+PONG")
})

test("aof persistence keeps writes across a kill", async () => {
  const redis = await startRedisServer({ persistence: "aof" })
  assert.equal(await command(redis.port, "SET k kept"), "+OK")
  await redis.kill()
  await redis.start()
  assert.equal(await command(redis.port, "GET k"), "kept")
  await redis[Symbol.asyncDispose]()
  await assert.rejects(stat(redis.dir), { code: "ENOENT" })
})

test("a restart onto a port another server took while it was down fails, not takes that server for its own", async () => {
  await using redis = await startRedisServer()
  await redis.stop()
  // What answers PING as any Redis does: another test's server, say.
  const squatter = createServer((s) => s.on("data", () => s.write("+PONG\r\n")))
  await new Promise<void>((r) => squatter.listen(redis.port, "127.0.0.1", r))
  try {
    await assert.rejects(redis.start(), /address already in use/i)
    assert.equal(redis.pid, undefined)
  } finally {
    squatter.close()
  }
})
