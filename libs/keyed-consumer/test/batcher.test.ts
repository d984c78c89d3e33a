import assert from "node:assert/strict"
import { test } from "node:test"
import { Batcher } from "../src/internal/batcher.ts"

const tick = () => new Promise((r) => setTimeout(r, 5))

test("requests made while a batch is in flight go together in the next one; the first goes alone", async () => {
  const batches: number[][] = []
  const b = new Batcher<number, number>(async (items) => {
    batches.push(items)
    await tick()
    return items.map((n) => ({ status: "fulfilled", value: n * 10 }))
  }, 3)
  const results = await Promise.all([1, 2, 3, 4, 5].map((n) => b.submit(n)))
  assert.deepEqual(results, [10, 20, 30, 40, 50])
  // 1 leaves at once; 2..5 wait for it and then go at most 3 at a time.
  assert.deepEqual(batches, [[1], [2, 3, 4], [5]])
})

test("a rejected item fails alone; a thrown batch fails all of its items, and later batches still run", async () => {
  let call = 0
  const b = new Batcher<number, number>(async (items) => {
    call++
    await tick()
    if (call === 2) throw new Error("round trip failed")
    return items.map((n) =>
      n === 1
        ? { status: "rejected", reason: new Error("bad 1") }
        : { status: "fulfilled", value: n },
    )
  }, 2)
  const settled = await Promise.allSettled([1, 2, 3, 4].map((n) => b.submit(n)))
  assert.deepEqual(
    settled.map((s) => (s.status === "fulfilled" ? s.value : (s.reason as Error).message)),
    ["bad 1", "round trip failed", "round trip failed", 4],
  )
})
