import assert from "node:assert/strict"
import { test } from "node:test"
import { WaitForTimeoutError, waitFor } from "../src/index.ts"

test("waitFor resolves once the predicate holds", async () => {
  let calls = 0
  await waitFor(() => ++calls === 3, { timeoutMs: 1000, intervalMs: 1, message: "third call" })
  assert.equal(calls, 3)
})

test("waitFor throws the message on timeout, with the last error as cause", async () => {
  let calls = 0
  await assert.rejects(
    waitFor(
      async () => {
        calls++
        throw new Error("not yet")
      },
      { timeoutMs: 100, intervalMs: 10, message: "server never came up" },
    ),
    (err: unknown) => {
      assert.ok(err instanceof WaitForTimeoutError)
      assert.match(
        err.message,
        /^server never came up \(gave up after 100 ms; last error: not yet\)$/,
      )
      assert.equal((err.cause as Error).message, "not yet")
      return true
    },
  )
  // Each check is followed by a pause of the interval or what is left of the timeout, so a
  // slow machine only means fewer checks: about 100 / 10 + 1 here (a few more when timers fire
  // a millisecond early). One that overran its deadline tenfold would make about a hundred.
  assert.ok(calls >= 1 && calls <= 30, `${calls} checks`)
})
