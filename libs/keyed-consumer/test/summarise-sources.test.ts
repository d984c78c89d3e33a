import assert from "node:assert/strict"
import { test } from "node:test"
import { summariseSources } from "../src/internal/summarise-sources.ts"

const seconds = (s: number) => s * 1e9

test("a stream without sources waits for nothing", () => {
  assert.deepEqual(summariseSources([]), { idleSeconds: 0, lag: 0 })
})

test("the longest silence of any source, and the lag of all of them", () => {
  assert.deepEqual(
    summariseSources([
      { active: seconds(0.25), lag: 3 },
      { active: seconds(42), lag: 0 },
      { active: seconds(7), lag: 120 },
    ]),
    { idleSeconds: 42, lag: 123 },
  )
})

test("a source never heard from is infinitely idle, whatever the others say", () => {
  // The state of a leaf link that never came up: the hub reports active -1 for the source.
  const { idleSeconds, lag } = summariseSources([
    { active: seconds(1), lag: 5 },
    { active: -1, lag: 0 },
  ])
  assert.equal(idleSeconds, Number.POSITIVE_INFINITY)
  assert.equal(lag, 5)
})
