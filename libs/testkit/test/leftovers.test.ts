import assert from "node:assert/strict"
import { test } from "node:test"
import { jetstreamManager } from "@nats-io/jetstream"
import { connect } from "@nats-io/transport-node"
import { startNatsServer } from "../src/index.ts"
import { sweepTestStreams } from "../src/internal/leftovers.ts"

test("test streams left by a killed test file are deleted once old; fresh ones and others stay", async () => {
  // A private server: the sweep must not meet the streams of test files running meanwhile.
  await using server = await startNatsServer()
  const nc = await connect({ servers: server.url })
  try {
    const jsm = await jetstreamManager(nc)
    for (const name of ["T0A1B2C3D", "ORDERS", "T0A1B2C3D4"]) {
      await jsm.streams.add({ name, subjects: [`${name.toLowerCase()}.>`] })
    }
    assert.deepEqual(await sweepTestStreams(jsm), [], "none is two hours old")
    assert.deepEqual(await sweepTestStreams(jsm, { olderThanMs: 0 }), ["T0A1B2C3D"])
    const left: string[] = []
    for await (const info of jsm.streams.list()) left.push(info.config.name)
    assert.deepEqual(left.sort(), ["ORDERS", "T0A1B2C3D4"])
  } finally {
    await nc.close()
  }
})
