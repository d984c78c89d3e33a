// connectNats never gives up reconnecting (reference/nats-2.9.md rule 10), and that includes
// a server that refuses the password for a while: a credentials rotation rolled out to the
// server before the apps. nats.js by default closes the connection for good after two
// refusals in a row, and a relay on a closed connection keeps its leadership in Postgres
// while publishing nothing, so no standby takes over.
import assert from "node:assert/strict"
import { readFile, writeFile } from "node:fs/promises"
import { test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { connectNats } from "@keyway/nats"
import { startNatsServer, waitFor } from "@keyway/testkit"
import { errors } from "@nats-io/transport-node"

test("a password refused for a while does not close the connection: it is back once the server takes it again", {
  timeout: 60_000,
}, async () => {
  await using server = await startNatsServer({
    jetstream: false,
    config: "authorization { user: app, password: before }",
  })
  const nc = await connectNats({ servers: server.url, user: "app", pass: "before" })
  try {
    const original = await readFile(server.configPath, "utf8")
    const refusals = async () =>
      ((await readFile(server.logPath, "utf8")).match(/authentication error/gi) ?? []).length
    const refusedBefore = await refusals()
    await server.stop()
    await writeFile(server.configPath, original.replace("password: before", "password: after"))
    await server.start()
    await waitFor(async () => (await refusals()) >= refusedBefore + 4, {
      timeoutMs: 20_000,
      message: "the client kept trying through four refusals",
    })
    let reconnected = false
    void (async () => {
      for await (const s of nc.status()) if (s.type === "reconnect") reconnected = true
    })()
    await server.stop()
    await writeFile(server.configPath, original)
    await server.start()
    // A closed connection never reconnects.
    await waitFor(() => reconnected, { timeoutMs: 10_000, message: "reconnected" })
    assert.equal(nc.isClosed(), false)
    await nc.flush()
  } finally {
    await nc.close()
  }
})

test("with its defaults, connectNats waits for a server that is not up yet, but not through a refused password", {
  timeout: 60_000,
}, async () => {
  await using server = await startNatsServer({
    jetstream: false,
    config: "authorization { user: app, password: right }",
  })
  // nats.js's own wait for a first connect retried this for ever, without a word.
  await assert.rejects(
    connectNats({ servers: server.url, user: "app", pass: "wrong" }),
    errors.AuthorizationError,
  )
  await server.stop()
  let settled = false
  const pending = connectNats({ servers: server.url, user: "app", pass: "right" }).finally(() => {
    settled = true
  })
  await sleep(1500)
  assert.equal(settled, false, "still waiting while no server answers")
  await server.start()
  const nc = await pending
  try {
    await nc.flush()
  } finally {
    await nc.close()
  }
})
