// A copy across the link (FACTORY_IN, CLOUD_IN) must not stall on an event id its origin
// holds twice. The relay re-publishes its last 2 minutes after a reconnect; past the origin's
// duplicate window (an outage of 8 minutes or more) the origin stores such an event again.
// Arriving at the copy within the copy's own window, the second was refused, and nats-server
// 2.9.10 answers a refused sourced message by re-creating the source from the last message
// stored: the same duplicate again, every couple of seconds, until the window passed. With
// the copies' 10 minutes, everything the site sent after it waited up to 10 minutes.
import assert from "node:assert/strict"
import { test } from "node:test"
import { streamCount, waitFor } from "@keyway/testkit"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import { startSites } from "./support.ts"

test("an event the origin stores twice crosses twice, and what follows it is not held up", async () => {
  const sites = await startSites({ proxy: true })
  try {
    const admin = await sites.connect("factory", "factory-admin")
    const relay = await sites.connect("factory", "factory-relay")
    const cloud = await sites.connect("cloud", "cloud-admin")
    try {
      // The origin's window made 1 s, to pass it without waiting 10 minutes.
      const jsm = await jetstreamManager(admin)
      const { config } = await jsm.streams.info("FACTORY")
      await jsm.streams.update("FACTORY", { ...config, duplicate_window: 1e9 })
      // With the link down, as a factory often is, both copies of the event reach the cloud
      // together when it returns.
      sites.proxy!.cut()
      const js = jetstream(relay)
      await js.publish("factory.demo.item", "first send", { msgID: "factory:1" })
      await new Promise((r) => setTimeout(r, 1500))
      const again = await js.publish("factory.demo.item", "sent again", { msgID: "factory:1" })
      assert.equal(again.duplicate, false, "the origin stored it a second time")
      await js.publish("factory.demo.item", "the next event", { msgID: "factory:2" })
      sites.proxy!.restore()
      // The consumer groups drop the second copy by its event id (the inbox).
      await waitFor(async () => (await streamCount(cloud, "FACTORY_IN")) === 3, {
        timeoutMs: 30_000,
        message: "all three messages in FACTORY_IN",
      })
    } finally {
      await Promise.all([admin.close(), relay.close(), cloud.close()])
    }
  } finally {
    await sites.close()
  }
})
