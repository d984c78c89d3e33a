import assert from "node:assert/strict"
import { test } from "node:test"
import { gate } from "@keyway/testkit"
import { RunGate } from "../src/internal/run-gate.ts"

/** A run that records when it starts and ends, and lasts until the test ends it. */
function runs(runGate: RunGate, log: string[]) {
  return (name: string, alone: boolean) => {
    const { opened, open } = gate()
    const done = runGate.run(alone, async () => {
      log.push(`${name} starts`)
      await opened
      log.push(`${name} ends`)
    })
    return { end: open, done }
  }
}

const settle = () => new Promise((r) => setImmediate(r))

test("a run alone waits for the runs in progress, and those after it wait for it", async () => {
  const log: string[] = []
  const g = new RunGate()
  const start = runs(g, log)
  const a = start("a", false)
  const b = start("b", false)
  const suspect = start("suspect", true)
  const c = start("c", false)
  await settle()
  assert.deepEqual(log, ["a starts", "b starts"])
  assert.deepEqual(g.size, { running: 2, waiting: 2 })
  a.end()
  await a.done
  await settle()
  assert.deepEqual(log.slice(2), ["a ends"], "one run still in progress: the suspect waits")
  b.end()
  await b.done
  await settle()
  assert.deepEqual(log.slice(3), ["b ends", "suspect starts"], "c, behind it, waits too")
  suspect.end()
  await suspect.done
  await settle()
  assert.deepEqual(log.slice(5), ["suspect ends", "c starts"])
  c.end()
  await c.done
  assert.deepEqual(g.size, { running: 0, waiting: 0 })
})

test("runs not alone go side by side; a run alone that throws gives its place back", async () => {
  const g = new RunGate()
  const log: string[] = []
  const start = runs(g, log)
  const many = Array.from({ length: 5 }, (_, n) => start(`r${n}`, false))
  await settle()
  assert.equal(log.length, 5, "all five started at once")
  const failing = g.run(true, async () => {
    throw new Error("boom")
  })
  for (const r of many) r.end()
  await Promise.all(many.map((r) => r.done))
  await assert.rejects(failing, /boom/)
  await g.run(false, async () => {})
  assert.deepEqual(g.size, { running: 0, waiting: 0 })
})
