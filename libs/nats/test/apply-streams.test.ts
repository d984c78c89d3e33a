// applyStreams against a real server: declared streams are created and updated, but a change
// that would destroy or re-fetch what a stream holds is refused before anything is touched.
import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import { after, before, test } from "node:test"
import {
  type JetStreamManager,
  jetstream,
  jetstreamManager,
  type StreamConfig,
} from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import {
  applyStreams,
  connectNats,
  destructiveChanges,
  fieldsNotKept,
  parseDuration,
  StreamChangeRefusedError,
  type StreamDefinition,
} from "../src/index.ts"

const SHARED_NATS = process.env.KEYWAY_TEST_NATS_URL ?? "nats://127.0.0.1:4222"
let nc: NatsConnection
let jsm: JetStreamManager
const created: string[] = []

before(async () => {
  nc = await connectNats({ servers: SHARED_NATS })
  jsm = await jetstreamManager(nc)
})
after(async () => {
  for (const name of created) await jsm.streams.delete(name).catch(() => {})
  await nc.close()
})

const uniqueName = () => {
  const name = `APPLY${randomBytes(4).toString("hex").toUpperCase()}`
  created.push(name)
  return name
}
const hours = (n: number) => n * 3600e9

test("a lower limit, or a changed source, is refused whole; raising a limit is applied", async () => {
  const origin = uniqueName()
  const copy = uniqueName()
  const subject = origin.toLowerCase()
  const declared: StreamDefinition[] = [
    { name: origin, subjects: [`${subject}.>`], max_age: hours(168), duplicate_window: 600e9 },
    {
      name: copy,
      max_age: hours(168),
      sources: [{ name: "ELSEWHERE", external: { api: "$JS.elsewhere.API", deliver: "" } }],
    },
  ]
  await applyStreams(jsm, declared)
  for (let i = 0; i < 5; i++) await jetstream(nc).publish(`${subject}.x`, String(i))

  // Lowering max_age deletes whatever is older at once; a new API prefix for a source makes
  // the copy fetch it again from its start. Refused, and neither stream changed, not even
  // the one whose declared change was harmless.
  await assert.rejects(
    applyStreams(jsm, [
      { ...declared[0]!, max_age: hours(1), description: "now described" },
      {
        ...declared[1]!,
        sources: [{ name: "ELSEWHERE", external: { api: "$JS.renamed.API", deliver: "" } }],
      },
    ]),
    (err: Error) => {
      assert.ok(err instanceof StreamChangeRefusedError)
      assert.match(err.message, new RegExp(`${origin}: max_age ${hours(168)} -> ${hours(1)}`))
      assert.match(err.message, new RegExp(`${copy}: source ELSEWHERE changed`))
      return true
    },
  )
  const originInfo = await jsm.streams.info(origin)
  assert.equal(originInfo.config.max_age, hours(168))
  assert.equal(originInfo.config.description ?? "", "")
  assert.equal(originInfo.state.messages, 5)
  const copyInfo = await jsm.streams.info(copy)
  assert.equal(copyInfo.config.sources?.[0]?.external?.api, "$JS.elsewhere.API")

  // A higher limit deletes nothing.
  await applyStreams(jsm, [{ ...declared[0]!, max_age: hours(336), description: "kept longer" }])
  const raised = await jsm.streams.info(origin)
  assert.equal(raised.config.max_age, hours(336))
  assert.equal(raised.config.description, "kept longer")
  assert.equal(raised.state.messages, 5)

  // A limit where there was none is a lower one too.
  await assert.rejects(
    applyStreams(jsm, [{ ...declared[0]!, max_age: hours(336), max_msgs: 3 }]),
    /max_msgs unlimited -> 3 deletes what is over it/,
  )
  assert.equal((await jsm.streams.info(origin)).state.messages, 5)
})

test("a field left out of a declaration is set back to its default, not kept from before", async () => {
  const name = uniqueName()
  const subject = name.toLowerCase()
  const full: StreamDefinition = {
    name,
    subjects: [`${subject}.>`],
    max_age: hours(168),
    max_msgs_per_subject: 5,
    description: "with limits",
    allow_rollup_hdrs: true,
  }
  await applyStreams(jsm, [{ ...full, allow_direct: true, no_ack: true }])
  assert.equal((await jsm.streams.info(name)).config.allow_direct, true)
  assert.equal((await jsm.streams.info(name)).config.no_ack, true)
  // The limits deleted from the declaration: no limit. nats.js merges an update into the
  // live config, which kept all of them.
  await applyStreams(jsm, [{ name, subjects: [`${subject}.>`] }])
  const config = (await jsm.streams.info(name)).config
  assert.equal(config.max_age, 0)
  assert.equal(config.max_msgs_per_subject, -1)
  assert.equal(config.description ?? "", "")
  assert.equal(config.allow_rollup_hdrs ?? false, false)
  assert.equal(config.allow_direct ?? false, false)
  // Kept, a stream that sends no PubAck timed out every publish of the relay.
  assert.equal(config.no_ack ?? false, false)

  // What the server cannot undo on a live stream is refused when left out, not kept unseen.
  const denied = uniqueName()
  const deniedSubjects = [`${denied.toLowerCase()}.>`]
  await applyStreams(jsm, [{ name: denied, subjects: deniedSubjects, deny_purge: true }])
  await assert.rejects(
    applyStreams(jsm, [{ name: denied, subjects: deniedSubjects }]),
    new RegExp(`${denied}: deny_purge is set on the live stream and the server cannot clear it`),
  )
  await applyStreams(jsm, [{ name: denied, subjects: deniedSubjects, deny_purge: true }])
  // republish is compared as the server keeps it (src defaulted to ">"), and a change to it,
  // which the server would refuse midway through the streams, is refused before any.
  const dest = `${denied.toLowerCase()}-out.>`
  const republished = uniqueName()
  const republishedSubjects = [`${republished.toLowerCase()}.>`]
  await applyStreams(jsm, [
    { name: republished, subjects: republishedSubjects, republish: { dest } as never },
  ])
  await applyStreams(jsm, [
    { name: republished, subjects: republishedSubjects, republish: { dest } as never },
  ])
  await assert.rejects(
    applyStreams(jsm, [
      { name: denied, subjects: deniedSubjects, deny_purge: true, description: "not applied" },
      { name: republished, subjects: republishedSubjects },
    ]),
    new RegExp(`${republished}: republish \\[">","${dest.replace(".>", "\\.>")}",false\\] -> none`),
  )
  assert.equal((await jsm.streams.info(denied)).config.description ?? "", "")
  // So is a storage or retention other than the live stream's.
  await assert.rejects(
    applyStreams(jsm, [
      { name: denied, subjects: deniedSubjects, deny_purge: true, description: "not applied" },
      { name: republished, subjects: republishedSubjects, storage: "memory" as never },
    ]),
    new RegExp(`${republished}: storage file -> memory: the server cannot change it`),
  )
  assert.equal((await jsm.streams.info(denied)).config.description ?? "", "")
  // An empty src is what the server keeps as ">".
  await applyStreams(jsm, [
    { name: republished, subjects: republishedSubjects, republish: { src: "", dest } as never },
  ])
  await assert.rejects(
    applyStreams(jsm, [{ name: denied, subjects: deniedSubjects, deny_purge: true, sealed: true }]),
    new RegExp(`${denied}: sealed is not declared`),
  )

  // A source deleted from a declaration is a source removed: refused like one.
  const copy = uniqueName()
  const source = { name: "ELSEWHERE", external: { api: "$JS.elsewhere.API", deliver: "" } }
  await applyStreams(jsm, [{ name: copy, sources: [source] }])
  await assert.rejects(
    applyStreams(jsm, [{ name: copy, subjects: [`${copy.toLowerCase()}.>`] }]),
    new RegExp(`${copy}: source ELSEWHERE removed`),
  )
  assert.equal((await jsm.streams.info(copy)).config.sources?.length, 1)
})

test("subjects left out of a declaration are not kept: an origin made a copy stops taking them", async () => {
  const name = uniqueName()
  const subjects = [`${name.toLowerCase()}.>`]
  await applyStreams(jsm, [{ name, subjects }])
  const source = { name: "ELSEWHERE", external: { api: "$JS.elsewhere.API", deliver: "" } }
  await applyStreams(jsm, [{ name, sources: [source] }])
  const config = (await jsm.streams.info(name)).config
  assert.deepEqual(config.subjects ?? [], [], "a copy listens on no subject")
  assert.equal(config.sources?.length, 1)
  await assert.rejects(
    jetstream(nc).publish(`${name.toLowerCase()}.x`, "written to the copy"),
    // No stream takes the subject: nats.js reads the server's 503 so.
    /no responders|jetstream is not enabled/,
  )
})

test("a source declared by domain is the same source the server reports by API prefix", () => {
  const live = {
    name: "CLOUD_IN",
    num_replicas: 1,
    max_age: hours(168),
    sources: [{ name: "CLOUD", external: { api: "$JS.cloud.API", deliver: "" } }],
  } as unknown as StreamConfig
  assert.deepEqual(
    destructiveChanges(live, { name: "CLOUD_IN", sources: [{ name: "CLOUD", domain: "cloud" }] }),
    [],
  )
  assert.deepEqual(
    destructiveChanges(live, {
      name: "CLOUD_IN",
      sources: [{ name: "CLOUD", domain: "elsewhere" }],
    }),
    ["source CLOUD changed: the copy would fetch it again from its start"],
  )
})

test('subjects a stream would take no more are refused, a misspelt "subjects" among them; a copy takes none', () => {
  const live = {
    name: "FACTORY",
    num_replicas: 1,
    max_age: hours(168),
    subjects: ["factory.>"],
  } as unknown as StreamConfig
  const removed = ["subjects factory.> removed: publishes to them would find no stream"]
  assert.deepEqual(destructiveChanges(live, { name: "FACTORY", subjects: ["factory.>"] }), [])
  assert.deepEqual(
    destructiveChanges(live, { name: "FACTORY", subjects: ["factory.>", "more.>"] }),
    [],
    "added",
  )
  assert.deepEqual(
    destructiveChanges(live, { name: "FACTORY", subjects: ["factory.demo.>"] }),
    removed,
  )
  assert.deepEqual(
    destructiveChanges(live, {
      name: "FACTORY",
      subject: ["factory.>"],
    } as unknown as StreamDefinition),
    removed,
  )
  assert.deepEqual(
    destructiveChanges(live, { name: "FACTORY", sources: [{ name: "F", domain: "far" }] }),
    [],
    "an origin made a copy",
  )
  assert.deepEqual(
    destructiveChanges(live, {
      name: "FACTORY",
      subjects: ["factory.demo.>"],
      sources: [{ name: "F", domain: "far" }],
    }),
    removed,
    "sources added beside narrowed subjects: no copy, subjects lost all the same",
  )
  const named = { ...live, subjects: ["PLAIN"], name: "PLAIN" } as StreamConfig
  assert.deepEqual(destructiveChanges(named, { name: "PLAIN" }), [], "the server's own default")
})

test("a window under a second, as loaded from a file, is applied", async () => {
  const name = uniqueName()
  await applyStreams(jsm, [
    { name, subjects: [`${name.toLowerCase()}.>`], duplicate_window: parseDuration("500ms") },
  ])
  assert.equal((await jsm.streams.info(name)).config.duplicate_window, 500e6)
})

test("a copy of one stream name from two domains is applied again as it is, and each source is told apart", async () => {
  const copy = uniqueName()
  const from = (domain: string) => ({
    name: "FACTORY",
    external: { api: `$JS.${domain}.API`, deliver: "" },
  })
  await applyStreams(jsm, [{ name: copy, sources: [from("factory-1"), from("factory-2")] }])
  await applyStreams(jsm, [{ name: copy, sources: [from("factory-1"), from("factory-2")] }])
  assert.equal((await jsm.streams.info(copy)).config.sources?.length, 2)
  const live = (await jsm.streams.info(copy)).config
  assert.deepEqual(
    destructiveChanges(live, { name: copy, sources: [from("factory-2"), from("factory-1")] }),
    [],
    "in another order",
  )
  assert.deepEqual(destructiveChanges(live, { name: copy, sources: [from("factory-1")] }), [
    "source FACTORY removed",
  ])
  assert.deepEqual(
    destructiveChanges(live, { name: copy, sources: [from("factory-1"), from("factory-3")] }),
    ["source FACTORY changed: the copy would fetch it again from its start"],
  )
})

test("a declared field the server does not know is refused by name once applied; one it keeps is not", async () => {
  const name = uniqueName()
  const declared = {
    name,
    subjects: [`${name.toLowerCase()}.>`],
    max_age: hours(1),
    duplicate_window: "90s",
    deny_delete: false,
    // Misspelt, and a field of nats-server 2.11: 2.9.10 drops both without a word.
    max_agee: hours(2),
    allow_msg_ttl: true,
    sources: [
      { name: "FAR", domain: "far" },
      { name: "NEAR", external: { api: "$JS.near.API", deliver: "" }, opt_start_seq: 0 },
    ],
  } as unknown as StreamDefinition
  await assert.rejects(
    applyStreams(jsm, [declared]),
    (err: Error) =>
      err instanceof StreamChangeRefusedError &&
      err.message.includes(`${name}: max_agee, allow_msg_ttl`) &&
      /did not keep/.test(err.message),
  )
  // Applied as the server runs it; without the two fields, the same declaration is whole.
  const { max_agee, allow_msg_ttl, ...kept } = declared as unknown as Record<string, unknown>
  await applyStreams(jsm, [kept as StreamDefinition])
  assert.equal((await jsm.streams.info(name)).config.max_age, hours(1))
  // What the server reports holds each declared field, written as the server writes it.
  const live = (await jsm.streams.info(name)).config
  assert.deepEqual(
    fieldsNotKept({ ...(kept as StreamDefinition), duplicate_window: 90e9 }, live),
    [],
  )
  assert.deepEqual(fieldsNotKept({ name, max_age: hours(3), subjects: ["other.>"] }, live), [
    "max_age",
    "subjects",
  ])
})
