import assert from "node:assert/strict"
import { test } from "node:test"
import { decodeEnvelope, EnvelopeError, encodeEnvelope } from "../src/index.ts"

const envelope = {
  id: "cloud:7",
  site: "cloud",
  seq: 7,
  topic: "demo.item",
  key: "a",
  ver: 3,
  type: "demo.item.changed.v1",
  payload: { n: 1 },
  createdAt: "2026-12-07T10:00:00Z",
}

test("an envelope reads back as written", () => {
  assert.deepEqual(decodeEnvelope(encodeEnvelope(envelope)), envelope)
})

test("a seq or version past 2^53 - 1 is refused: it is not the integer that was written", () => {
  for (const field of ["seq", "ver"] as const) {
    const body = new TextEncoder().encode(
      JSON.stringify(envelope).replace(`"${field}":${envelope[field]}`, `"${field}":${2 ** 60}`),
    )
    assert.throws(
      () => decodeEnvelope(body),
      (err: unknown) =>
        err instanceof EnvelopeError &&
        new RegExp(`\\["${field}"\\]`).test(err.message) &&
        /2\^53/.test(err.message),
      field,
    )
  }
  assert.equal(
    decodeEnvelope(encodeEnvelope({ ...envelope, ver: Number.MAX_SAFE_INTEGER })).ver,
    Number.MAX_SAFE_INTEGER,
  )
})

test("a body that is not UTF-8 is refused, not read with its bytes replaced", () => {
  const json = new TextEncoder().encode(JSON.stringify({ ...envelope, key: "a?" }))
  // The key's "?" made a byte that is no UTF-8: read leniently, the key was "a\uFFFD".
  json[json.indexOf(0x3f)] = 0xff
  assert.throws(
    () => decodeEnvelope(json),
    (err: unknown) =>
      err instanceof EnvelopeError && /not UTF-8/.test(err.message) && err.place === undefined,
  )
})

test("a body whose bad bytes are all outside its names says the event's place", () => {
  const { payload: _payload, createdAt: _createdAt, ...place } = envelope
  const json = new TextEncoder().encode(
    JSON.stringify({ ...envelope, payload: { n: 1, note: "caf?" } }),
  )
  json[json.lastIndexOf(0x3f)] = 0xe9
  assert.throws(
    () => decodeEnvelope(json),
    (err: unknown) =>
      err instanceof EnvelopeError &&
      /not UTF-8/.test(err.message) &&
      JSON.stringify(err.place) === JSON.stringify(place),
  )
})

test("a name Postgres would store as another, or not at all, is refused naming the field", () => {
  // Escaped in the JSON, so the body is valid UTF-8: only the name check sees them. Half of a
  // surrogate pair was stored as U+FFFD, and "\ud800" and "\udbff" became one key.
  const cases: [field: string, json: string, reason: RegExp][] = [
    ["key", '"\\ud800"', /half of a surrogate pair/],
    ["key", '"a\\u0000"', /control characters/],
    ["key", '"a\\u0085"', /control characters/],
    ["id", '"cloud:\\udfff"', /half of a surrogate pair/],
    ["key", '""', /must not be empty/],
    ["topic", JSON.stringify("t".repeat(257)), /at most 256/],
  ]
  for (const [field, json, reason] of cases) {
    const body = new TextEncoder().encode(
      JSON.stringify(envelope).replace(
        `"${field}":${JSON.stringify(envelope[field as keyof typeof envelope])}`,
        `"${field}":${json}`,
      ),
    )
    assert.throws(
      () => decodeEnvelope(body),
      (err: unknown) =>
        err instanceof EnvelopeError &&
        err.message.includes(`["${field}"]`) &&
        reason.test(err.message),
      `${field} ${json}`,
    )
  }
  // A whole pair is a character like any other.
  assert.equal(
    decodeEnvelope(encodeEnvelope({ ...envelope, key: "\ud83d\ude00" })).key,
    "\ud83d\ude00",
  )
})
