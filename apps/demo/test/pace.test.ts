import assert from "node:assert/strict"
import { test } from "node:test"
import { nextDue } from "../src/demo-event.ts"

test("the demo's pace after an outage: on at its rate from now, no burst to catch up", () => {
  const t0 = 1_000_000
  // On time: one interval after the last.
  assert.equal(nextDue(t0, 50, t0), t0 + 20)
  // Ten minutes away at 50/s: the next write at most a second in the past, not 30,000 of them.
  const back = t0 + 600_000
  let due = nextDue(t0, 50, back)
  let burst = 0
  while (due <= back) {
    burst++
    due = nextDue(due, 50, back)
  }
  assert.ok(burst <= 51, `${burst} writes due at once: a second's worth at most`)
})
