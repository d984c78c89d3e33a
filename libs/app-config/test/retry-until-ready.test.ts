import assert from "node:assert/strict"
import { test } from "node:test"
import { retryUntilReady } from "@keyway/app-config"

test("retryUntilReady retries a failing step, logging each failure, until it succeeds", async () => {
  const logged: Record<string, unknown>[] = []
  let calls = 0
  const value = await retryUntilReady(
    async () => {
      calls++
      if (calls < 4) throw new Error(`refused ${calls}`)
      return "ready"
    },
    {
      what: "the server",
      log: (message, fields) => logged.push({ message, ...fields }),
      firstDelayMs: 1,
      maxDelayMs: 3,
    },
  )
  assert.equal(value, "ready")
  assert.equal(calls, 4)
  assert.deepEqual(logged, [
    { message: "waiting for the server", attempt: 1, retryInMs: 1, error: "refused 1" },
    { message: "waiting for the server", attempt: 2, retryInMs: 2, error: "refused 2" },
    { message: "waiting for the server", attempt: 3, retryInMs: 3, error: "refused 3" },
  ])
})

test("retryUntilReady stops waiting when its signal aborts, with the signal's reason", async () => {
  const stop = new AbortController()
  let calls = 0
  const waiting = retryUntilReady(
    async () => {
      calls++
      throw new Error("refused")
    },
    { what: "the server", log: () => {}, signal: stop.signal, firstDelayMs: 60_000 },
  )
  await new Promise((r) => setTimeout(r, 20))
  const reason = new Error("SIGTERM")
  stop.abort(reason)
  // Within the 60 s delay: the abort, not the timer, ended the wait.
  await assert.rejects(waiting, (err) => err === reason)
  assert.equal(calls, 1)
  // An aborted signal runs nothing.
  await assert.rejects(
    retryUntilReady(
      async () => {
        calls++
      },
      { what: "x", log: () => {}, signal: stop.signal },
    ),
    (err) => err === reason,
  )
  assert.equal(calls, 1)
})
