import assert from "node:assert/strict"
import { test } from "node:test"
import { WaitForTimeoutError, waitFor } from "../src/index.ts"

test("waitFor resolves once the predicate holds", async () => {
  let calls = 0
  await waitFor(() => ++calls === 3, { timeoutMs: 1000, intervalMs: 1, message: "third call" })
  assert.equal(calls, 3)
})

test("waitFor throws the message on timeout, with the last error as cause", async () => {
  const started = Date.now()
  await assert.rejects(
    waitFor(
      async () => {
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
  assert.ok(Date.now() - started < 1000)
})
