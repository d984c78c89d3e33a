// Per-bridge credentials (issue 4, must-show 4): each user of nats/accounts/*.conf may touch
// only its own subjects and inbox; a try outside them is a permission error; no password
// shows up in any server log. Every refusal is paired with an allowed call on the same
// connection, so a refusal for some other reason (a typo in a subject) would not pass.
import assert from "node:assert/strict"
import { after, before, describe, test } from "node:test"
import { startNatsServer, streamCount } from "@keyway/testkit"
import { jetstream, jetstreamManager } from "@nats-io/jetstream"
import { connect as connectOnce, type NatsConnection } from "@nats-io/transport-node"
import { connectNats, inboxPrefixFor, leafRemoteUrl } from "../src/index.ts"
import { assertNoSecrets, type Sites, startSites, type User, waitForLeaf } from "./support.ts"

const permissionError = /permissions violation/i

/** Resolves with the error a subscription ends with (nats.js closes it on -ERR). */
async function subscriptionError(nc: NatsConnection, subject: string): Promise<unknown> {
  const sub = nc.subscribe(subject)
  const closed = await sub.closed
  await nc.flush().catch(() => {})
  return closed
}

describe("per-user permissions on the hub and the leaf", () => {
  let sites: Sites
  const open: NatsConnection[] = []
  const clientErrors: string[] = []
  const connect = async (site: "cloud" | "factory", user: User) => {
    const nc = await sites.connect(site, user)
    open.push(nc)
    return nc
  }

  before(async () => {
    sites = await startSites()
  })
  after(async () => {
    for (const nc of open) await nc.close().catch(() => {})
    if (sites) {
      assertNoSecrets(`${await sites.logs()}\n${clientErrors.join("\n")}`, sites.passwords)
      await sites.close()
    }
  })

  test("factory-relay publishes factory events, and nothing else", async () => {
    const nc = await connect("factory", "factory-relay")
    const js = jetstream(nc)
    const ack = await js.publish("factory.demo.item", "{}", { msgID: "factory:cred-1" })
    assert.equal(ack.stream, "FACTORY")
    // Reading one message of its own stream back, as it checks a duplicate PubAck for a row
    // it never marked (libs/outbox publish-batch.ts); no other stream's.
    const streams = (await js.jetstreamManager(false)).streams
    assert.equal((await streams.getMessage("FACTORY", { seq: ack.seq }))?.seq, ack.seq)
    await assert.rejects(streams.getMessage("CLOUD_IN", { seq: 1 }), (err: Error) => {
      clientErrors.push(String(err))
      return permissionError.test(err.message)
    })
    // Another site's subjects.
    await assert.rejects(
      js.publish("cloud.demo.command", "{}", { msgID: "factory:cred-2", timeout: 2000 }),
      (err: Error) => {
        clientErrors.push(String(err))
        return permissionError.test(err.message)
      },
    )
    // The JetStream API beyond reading its own stream: it cannot delete or purge.
    const admin = await connect("factory", "factory-admin")
    await assert.rejects(
      nc.request("$JS.API.STREAM.PURGE.FACTORY", "", { timeout: 2000 }),
      (err: Error) => {
        clientErrors.push(String(err))
        return permissionError.test(err.message)
      },
    )
    assert.ok((await streamCount(admin, "FACTORY")) >= 1, "the purge did not happen")
    // Reading events back: the relay has no business subscribing to them.
    const err = await subscriptionError(nc, "factory.>")
    clientErrors.push(String(err))
    assert.match(String(err), permissionError)
  })

  test("cloud-relay cannot publish factory events nor read another user's replies", async () => {
    const nc = await connect("cloud", "cloud-relay")
    const js = jetstream(nc)
    assert.equal(
      (await js.publish("cloud.demo.command", "{}", { msgID: "cloud:cred-1" })).stream,
      "CLOUD",
    )
    await assert.rejects(
      js.publish("factory.demo.item", "{}", { msgID: "cloud:cred-2", timeout: 2000 }),
      (err: Error) => permissionError.test(err.message),
    )
    const err = await subscriptionError(nc, `${inboxPrefixFor("cloud-worker")}.>`)
    assert.match(String(err), permissionError)
  })

  test("cloud-worker consumes FACTORY_IN but cannot publish events or manage streams", async () => {
    const nc = await connect("cloud", "cloud-worker")
    const jsm = await jetstreamManager(nc)
    await jsm.consumers.add("FACTORY_IN", { durable_name: "cred_check", ack_policy: "explicit" })
    assert.equal((await jsm.consumers.info("FACTORY_IN", "cred_check")).name, "cred_check")
    await assert.rejects(
      jetstream(nc).publish("cloud.demo.command", "{}", { msgID: "cloud:cred-3", timeout: 2000 }),
      (err: Error) => permissionError.test(err.message),
    )
    await assert.rejects(jsm.streams.delete("FACTORY_IN"), (err: Error) =>
      permissionError.test(err.message),
    )
    // Consumers on streams that are not its site's.
    await assert.rejects(
      jsm.consumers.add("CLOUD_IN_NOT_HERE", { durable_name: "x", ack_policy: "explicit" }),
      (err: Error) => permissionError.test(err.message),
    )
  })

  test("factory-worker cannot read the factory relay's replies nor publish events", async () => {
    const nc = await connect("factory", "factory-worker")
    const err = await subscriptionError(nc, `${inboxPrefixFor("factory-relay")}.>`)
    assert.match(String(err), permissionError)
    await assert.rejects(
      jetstream(nc).publish("factory.demo.item", "{}", { msgID: "factory:cred-3", timeout: 2000 }),
      (e: Error) => permissionError.test(e.message),
    )
  })

  test("a user connects on its own inbox prefix unless told another; on _INBOX it gets no replies", async () => {
    const as = (inboxPrefix?: string) =>
      connectNats({
        servers: sites.leaf.url,
        user: "factory-relay",
        pass: sites.passwords["factory-relay"],
        inboxPrefix,
      }).then((nc) => {
        open.push(nc)
        return nc
      })
    // No prefix given: the user's own (before, nats.js's _INBOX, and every request failed).
    const ack = await jetstream(await as()).publish("factory.demo.item", "{}", {
      msgID: "factory:cred-4a",
      timeout: 2000,
    })
    assert.equal(ack.stream, "FACTORY")
    await assert.rejects(
      jetstream(await as("_INBOX")).publish("factory.demo.item", "{}", {
        msgID: "factory:cred-4",
        timeout: 2000,
      }),
      (err: Error) => permissionError.test(err.message),
    )
  })

  test("the leaf link's password lets a server source streams, not manage the other site's", async () => {
    // What the factory host holds: the link's password, in its remote URL. A server of its
    // own attached with it, and a client there asking the cloud's JetStream API.
    await using rogue = await startNatsServer({
      jetstream: false,
      config: `leafnodes { remotes: [ { url: "${leafRemoteUrl(sites.hubLeafUrl, "leaf-factory", sites.passwords["leaf-factory"])}" } ] }`,
    })
    await waitForLeaf(sites.hub, 20_000, 2)
    const relay = await connect("cloud", "cloud-relay")
    await jetstream(relay).publish("cloud.demo.command", "{}", { msgID: "cloud:cred-leaf" })
    const before = await streamCount(relay, "CLOUD")
    assert.ok(before > 0)
    const nc = await connectOnce({ servers: rogue.url })
    open.push(nc)
    // Replies come back on the subjects the link carries for JetStream's own replies.
    const ask = async (subject: string, n: number) => {
      const reply = `$JSC.R.cred-test.${n}`
      const sub = nc.subscribe(reply, { max: 1, timeout: 3000 })
      nc.publish(subject, "", { reply })
      for await (const m of sub) return m.string()
      return undefined
    }
    const answer = (s: string | undefined) => s ?? "no answer"
    // Allowed, and answered: sourcing creates its consumer this way.
    assert.match(
      answer(await ask("$JS.cloud.API.CONSUMER.CREATE.CLOUD", 1).catch((e) => String(e))),
      /"type":"io\.nats\.jetstream\.api\.v1\.consumer_create_response"/,
    )
    for (const [n, subject] of [
      "$JS.cloud.API.STREAM.PURGE.CLOUD",
      "$JS.cloud.API.STREAM.DELETE.FACTORY_IN",
      "$JS.cloud.API.STREAM.INFO.CLOUD",
      // The long form can name a durable: no source here uses it.
      "$JS.cloud.API.CONSUMER.CREATE.CLOUD.cloud-demo.cloud.>",
    ].entries()) {
      const got = await ask(subject, n + 2).catch((e) => String(e))
      assert.doesNotMatch(
        answer(got),
        /"success":true|"type":"io\.nats\.jetstream\.api\.v1\.stream_info_response"/,
        subject,
      )
    }
    assert.equal(await streamCount(relay, "CLOUD"), before, "nothing purged")
    const admin = await connect("cloud", "cloud-admin")
    assert.ok(await (await jetstreamManager(admin)).streams.info("FACTORY_IN"), "not deleted")
  })

  test("the leaf link's user cannot connect as a client, nor a site's admin to the other site; a wrong password is refused", async () => {
    // nats.js would retry forever on the first connect (waitOnFirstConnect); a plain connect
    // with no retries shows the refusal at once.
    const once = (user: string, pass: string, servers = sites.hub.url) =>
      connectOnce({ servers, user, pass, reconnect: false }).then(
        async (nc) => {
          await nc.close()
          return "connected"
        },
        (err: Error) => {
          clientErrors.push(String(err))
          return err.message
        },
      )
    assert.match(await once("leaf-factory", sites.passwords["leaf-factory"]), /authorization/i)
    assert.match(await once("cloud-relay", "not-the-password"), /authorization/i)
    assert.equal(await once("cloud-relay", sites.passwords["cloud-relay"]), "connected")
    // Each site's admin is a user of that site only: what a factory host holds opens nothing
    // of the cloud's JetStream, and the reverse.
    assert.match(await once("factory-admin", sites.passwords["factory-admin"]), /authorization/i)
    assert.match(
      await once("cloud-admin", sites.passwords["cloud-admin"], sites.leaf.url),
      /authorization/i,
    )
    assert.equal(await once("cloud-admin", sites.passwords["cloud-admin"]), "connected")
  })
})
