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
    (err: unknown) => err instanceof EnvelopeError && /not UTF-8/.test(err.message),
  )
})
