// closeNats at shutdown: a drain when the server is there, a close when it is not, and never
// a rejection or a hang that would keep a stopping process from exiting. Each test has a
// timeout: a closeNats that hangs fails it rather than the whole run.
import assert from "node:assert/strict"
import { test } from "node:test"
import { closeNats, connectNats } from "@keyway/nats"
import { createTcpProxy, startNatsServer } from "@keyway/testkit"

test("closeNats drains: what was published before it reaches the server", {
  timeout: 30_000,
}, async () => {
  await using server = await startNatsServer({ jetstream: false })
  const reader = await connectNats({ servers: server.url })
  let received = 0
  reader.subscribe("work", {
    callback: () => {
      received++
    },
  })
  await reader.flush()
  const writer = await connectNats({ servers: server.url })
  // Published, still in the client's buffer: a close without drain would drop most of them.
  for (let i = 0; i < 50_000; i++) writer.publish("work", "x")
  await closeNats(writer)
  assert.ok(writer.isClosed())
  await reader.flush()
  await closeNats(reader)
  assert.equal(received, 50_000)
})

test("closeNats closes a connection whose server is gone: no rejection", {
  timeout: 30_000,
}, async () => {
  await using server = await startNatsServer({ jetstream: false })
  const nc = await connectNats({ servers: server.url })
  const plain = await connectNats({ servers: server.url })
  for (const c of [nc, plain]) c.subscribe("x.>")
  await server.stop()
  // What this replaces: drain() rejects ("connection disconnected"), which in a shutdown
  // handler is an unhandled rejection and an exit code 1 instead of 0.
  await assert.rejects(plain.drain())
  await plain.close()
  await closeNats(nc)
  assert.ok(nc.isClosed())
})

test("closeNats gives up on a drain that cannot finish and closes", {
  timeout: 30_000,
}, async () => {
  await using server = await startNatsServer({ jetstream: false })
  await using proxy = await createTcpProxy({ host: "127.0.0.1", port: server.port })
  const nc = await connectNats({ servers: `nats://127.0.0.1:${proxy.port}` })
  nc.subscribe("x.>")
  // A link that delivers nothing and resets nothing: drain's flush waits for an answer.
  proxy.stall()
  await closeNats(nc, 300)
  assert.ok(nc.isClosed())
})
