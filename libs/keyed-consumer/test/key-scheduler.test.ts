import assert from "node:assert/strict"
import { test } from "node:test"
import type { KeyRef } from "../src/internal/inbox-sql.ts"
import { KeyScheduler } from "../src/internal/key-scheduler.ts"

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const a: KeyRef = { topic: "t", key: "a" }
const b: KeyRef = { topic: "t", key: "b" }

/**
 * A scheduler with one slot whose drains last until the test ends them, recording each
 * drain's key, the wait it was told and when it started. The assertions compare the reported
 * waits with the test's own clock, so a slow machine moves both sides alike.
 */
function oneSlot() {
  const drains: { key: string; waitedMs: number; startedAt: number; end: () => void }[] = []
  const scheduler = new KeyScheduler(
    1,
    (ref, waitedMs) =>
      new Promise<void>((end) => {
        drains.push({ key: ref.key, waitedMs, startedAt: performance.now(), end })
      }),
    (err) => assert.fail(String(err)),
  )
  const started = async (n: number) => {
    while (drains.length < n) await sleep(1)
    return drains[n - 1]!
  }
  return { scheduler, started }
}

test("a key that finds the slots taken reports how long it waited for one", async () => {
  const { scheduler, started } = oneSlot()
  scheduler.wake(a)
  const bWokenAt = performance.now()
  scheduler.wake(b)
  await sleep(30)
  const first = await started(1)
  assert.ok(first.waitedMs < 5, `a had a free slot: ${first.waitedMs}`)
  first.end()
  const second = await started(2)
  assert.equal(second.key, "b")
  // Waited from its wake to its start, within the few statements between our clock and its.
  const expected = second.startedAt - bWokenAt
  assert.ok(Math.abs(second.waitedMs - expected) < 5, `${second.waitedMs} vs ${expected}`)
  second.end()
  await scheduler.stop()
})

test("a key woken while it drains waits from that drain's end; a second wake keeps the first's time", async () => {
  const { scheduler, started } = oneSlot()
  scheduler.wake(a)
  const a1 = await started(1)
  scheduler.wake(a) // while a drains: again, once it ends
  scheduler.wake(b) // queued for the slot
  await sleep(20)
  const bWokenAgainAt = performance.now()
  scheduler.wake(b) // already queued
  await sleep(20)
  const a1EndedAt = performance.now()
  a1.end()
  const b1 = await started(2)
  assert.equal(b1.key, "b")
  // Counted from the first wake, at least 20 ms before the second.
  assert.ok(
    b1.waitedMs >= b1.startedAt - bWokenAgainAt + 15,
    `b's wait ${b1.waitedMs} counts from its first wake`,
  )
  await sleep(30)
  b1.end()
  const a2 = await started(3)
  assert.equal(a2.key, "a")
  // Queued when its first drain ended, after a1EndedAt and before b started; not from its
  // wake during that drain, 40 ms earlier.
  assert.ok(a2.waitedMs <= a2.startedAt - a1EndedAt + 1, `a's wait ${a2.waitedMs} is not older`)
  assert.ok(a2.waitedMs >= a2.startedAt - b1.startedAt - 1, `a waited for b: ${a2.waitedMs}`)
  a2.end()
  await scheduler.stop()
})
