import assert from "node:assert/strict"
import { test } from "node:test"
import { RunGate } from "../src/internal/run-gate.ts"

const settle = () => new Promise((r) => setImmediate(r))

/** Enters `g`, logging when the run starts; `end()` ends it once it has started. */
function arrive(g: RunGate, log: string[], name: string, alone: boolean, signal?: AbortSignal) {
  const entered = g.enter(alone, signal).then((turn) => {
    log.push(turn ? `${name} starts` : `${name} gave up`)
    return turn
  })
  return {
    entered,
    end: async () => {
      ;(await entered)?.end()
      log.push(`${name} ends`)
      await settle()
    },
  }
}

test("a run alone waits for the runs in progress, and those after it wait for it", async () => {
  const log: string[] = []
  const g = new RunGate()
  const a = arrive(g, log, "a", false)
  const b = arrive(g, log, "b", false)
  const suspect = arrive(g, log, "suspect", true)
  const c = arrive(g, log, "c", false)
  await settle()
  assert.deepEqual(log, ["a starts", "b starts"])
  assert.deepEqual(g.size, { running: 2, waiting: 2 })
  await a.end()
  assert.deepEqual(log.slice(2), ["a ends"], "one run still in progress: the suspect waits")
  await b.end()
  assert.deepEqual(log.slice(3), ["b ends", "suspect starts"], "c, behind it, waits too")
  await suspect.end()
  assert.deepEqual(log.slice(5), ["suspect ends", "c starts"])
  await c.end()
  assert.deepEqual(g.size, { running: 0, waiting: 0 })
})

test("a run alone that gives up (its signal, or its longest wait) lets those behind it in", async () => {
  const log: string[] = []
  const g = new RunGate()
  const hung = arrive(g, log, "hung", false)
  const aborter = new AbortController()
  arrive(g, log, "aborted", true, aborter.signal)
  const behind = arrive(g, log, "behind", false)
  await settle()
  assert.deepEqual(log, ["hung starts"])
  aborter.abort()
  await settle()
  assert.deepEqual(log, ["hung starts", "aborted gave up", "behind starts"])

  const timedOut = g.enter(true, undefined, 50)
  const later = arrive(g, log, "later", false)
  await settle()
  assert.equal(log.includes("later starts"), false, "held back while the lone run waits")
  assert.equal(await timedOut, undefined, "gave up after its longest wait")
  await later.entered
  assert.equal(log.at(-1), "later starts")
  await Promise.all([hung.end(), behind.end(), later.end()])
  assert.deepEqual(g.size, { running: 0, waiting: 0 })
  assert.equal(
    await g.enter(true, AbortSignal.abort()),
    undefined,
    "an aborted signal: not even queued",
  )
})

test("a lone run that shares its turn lets the others in; closing the gate sends waiting runs away", async () => {
  const log: string[] = []
  const g = new RunGate()
  const suspect = arrive(g, log, "suspect", true)
  const a = arrive(g, log, "a", false)
  await settle()
  assert.deepEqual(log, ["suspect starts"])
  ;(await suspect.entered)!.share()
  await settle()
  assert.deepEqual(log, ["suspect starts", "a starts"], "beside the suspect, once it shares")
  const lone = arrive(g, log, "lone", true)
  const b = arrive(g, log, "b", false)
  await settle()
  g.close()
  await settle()
  assert.deepEqual(log.slice(2), ["lone gave up", "b gave up"])
  assert.equal(await g.enter(false), undefined, "closed: no run starts")
  await Promise.all([suspect.end(), a.end(), lone.end(), b.end()])
  assert.deepEqual(g.size, { running: 0, waiting: 0 })
})
