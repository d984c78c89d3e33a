import assert from "node:assert/strict"
import { test } from "node:test"
import type { KeyRef } from "../src/internal/inbox-sql.ts"
import { KeyScheduler } from "../src/internal/key-scheduler.ts"

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))
const a: KeyRef = { topic: "t", key: "a" }
const b: KeyRef = { topic: "t", key: "b" }

/**
 * A scheduler with one slot whose drains last until the test ends them, recording each
 * drain's key and the wait it was told. Its clock moves only when the test sets it, so the
 * waits are exact whatever the machine's load.
 */
function oneSlot() {
  const clock = { ms: 0 }
  const drains: { key: string; waitedMs: number; end: () => void }[] = []
  // What the scheduler reported failing; a throw from here would be swallowed by it.
  const errors: unknown[] = []
  const scheduler = new KeyScheduler(
    1,
    (ref, waitedMs) =>
      new Promise<void>((end) => {
        drains.push({ key: ref.key, waitedMs, end })
      }),
    (err) => errors.push(err),
    () => clock.ms,
  )
  const started = async (n: number) => {
    while (drains.length < n) await sleep(1)
    return drains[n - 1]!
  }
  return { scheduler, clock, started, drains, errors }
}

test("a key that finds the slots taken reports how long it waited for one", async () => {
  const { scheduler, clock, started, errors } = oneSlot()
  scheduler.wake(a)
  clock.ms = 10
  scheduler.wake(b)
  clock.ms = 25
  const first = await started(1)
  assert.deepEqual([first.key, first.waitedMs], ["a", 0], "a had a free slot")
  first.end()
  const second = await started(2)
  assert.deepEqual([second.key, second.waitedMs], ["b", 15], "b waited from its wake to a's end")
  second.end()
  await scheduler.stop()
  assert.deepEqual(errors, [], "no drain failed")
})

test("a key woken while it drains waits from that drain's end; a second wake keeps the first's time", async () => {
  const { scheduler, clock, started, errors } = oneSlot()
  scheduler.wake(a)
  const a1 = await started(1)
  clock.ms = 5
  scheduler.wake(a) // while a drains: again, once it ends
  scheduler.wake(b) // queued for the slot
  clock.ms = 20
  scheduler.wake(b) // already queued: keeps its first time
  clock.ms = 40
  a1.end()
  const b1 = await started(2)
  assert.deepEqual([b1.key, b1.waitedMs], ["b", 35], "b counts from its first wake, at 5")
  clock.ms = 70
  b1.end()
  const a2 = await started(3)
  // Queued when its first drain ended, at 40; not from its wake during that drain, at 5.
  assert.deepEqual([a2.key, a2.waitedMs], ["a", 30], "a counts from its drain's end")
  a2.end()
  await scheduler.stop()
  assert.deepEqual(errors, [], "no drain failed")
})

test("an onError that throws neither ends the process nor stops the scheduler", async () => {
  const drained: string[] = []
  const scheduler = new KeyScheduler(
    1,
    async (ref) => {
      drained.push(ref.key)
      if (ref.key === "a") throw new Error("drain failed")
    },
    () => {
      throw new Error("the logger failed too")
    },
  )
  scheduler.wake(a)
  scheduler.wake(b)
  while (drained.length < 2) await sleep(1)
  // An unhandled rejection would fail this file before the next tick's end.
  await sleep(20)
  scheduler.wake(a)
  while (drained.length < 3) await sleep(1)
  assert.deepEqual(drained, ["a", "b", "a"])
})

test("a key held is not drained until released, by a wake-up taken in before the hold or after", async () => {
  const { scheduler, started, drains, errors } = oneSlot()
  scheduler.wake(a)
  const a1 = await started(1)
  scheduler.wake(a) // a poll while it drains: again, once it ends
  scheduler.hold(a) // the drain puts the key off
  a1.end()
  scheduler.wake(a) // the next poll
  scheduler.wake(b)
  const b1 = await started(2)
  assert.equal(b1.key, "b", "a was not drained again")
  b1.end()
  await sleep(5)
  assert.equal(drains.length, 2, "the slot free, a still held: not drained")
  scheduler.release(a)
  scheduler.wake(a) // the put-off's timer
  const a2 = await started(3)
  assert.equal(a2.key, "a")
  a2.end()
  await scheduler.stop()
  assert.deepEqual(errors, [], "no drain failed")
})
