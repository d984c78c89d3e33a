import assert from "node:assert/strict"
import { test } from "node:test"
import { describeError, retryUntilReady } from "@keyway/app-config"

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

test("retryUntilReady throws at once what waiting cannot mend, and retries the rest", async () => {
  const pgError = (code: string) => Object.assign(new Error(`pg ${code}`), { code })
  const jsError = (status: number, code: number) =>
    Object.assign(new Error(`js ${status}`), { name: "JetStreamApiError", status, code })
  // As ioredis reports a Redis error reply.
  const redisError = (message: string) => Object.assign(new Error(message), { name: "ReplyError" })
  const authError = Object.assign(new Error("Authorization Violation"), {
    name: "AuthorizationError",
  })
  const outcome = async (err: Error) => {
    let calls = 0
    try {
      await retryUntilReady(
        async () => {
          if (++calls === 1) throw err
          return "ready"
        },
        { what: "x", log: () => {}, firstDelayMs: 1 },
      )
      return `retried (${calls} calls)`
    } catch (thrown) {
      assert.equal(thrown, err)
      return `thrown (${calls} calls)`
    }
  }
  // As nats.js reports a subject outside the user's permissions, here a stream it may not read.
  const violation = Object.assign(
    new Error('Permissions Violation for Publish to "$JS.API.STREAM.INFO.CLOUD_IN"'),
    { name: "PermissionViolationError" },
  )
  const requestRefused = Object.assign(new Error(violation.message, { cause: violation }), {
    name: "RequestError",
  })
  const requestTimedOut = Object.assign(new Error("timeout", { cause: new Error("TIMEOUT") }), {
    name: "RequestError",
  })
  const refused = Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:5432"), {
    code: "ECONNREFUSED",
  })
  assert.deepEqual(
    {
      "wrong password": await outcome(pgError("28P01")),
      "no privilege": await outcome(pgError("42501")),
      "nats credentials": await outcome(authError),
      "nats permissions": await outcome(violation),
      // As nats.js refuses an inbox prefix with a wildcard, before it connects.
      "nats options": await outcome(
        Object.assign(new Error("'prefix' cannot have wildcards ('_I.>')"), {
          name: "InvalidArgumentError",
        }),
      ),
      "a request refused for permissions": await outcome(requestRefused),
      "a request timed out": await outcome(requestTimedOut),
      "bad stream config": await outcome(jsError(400, 10052)),
      "refused before asking": await outcome(Object.assign(new Error("no"), { permanent: true })),
      refused: await outcome(refused),
      "database not created yet": await outcome(pgError("3D000")),
      "server starting up": await outcome(pgError("57P03")),
      "stream not found": await outcome(jsError(404, 10059)),
      "jetstream not ready": await outcome(jsError(503, 10008)),
      "redis password": await outcome(redisError("WRONGPASS invalid username-password pair")),
      "redis without a password": await outcome(redisError("NOAUTH Authentication required.")),
      "redis loading": await outcome(redisError("LOADING Redis is loading the dataset")),
    },
    {
      "wrong password": "thrown (1 calls)",
      "no privilege": "thrown (1 calls)",
      "nats credentials": "thrown (1 calls)",
      "nats permissions": "thrown (1 calls)",
      "nats options": "thrown (1 calls)",
      "a request refused for permissions": "thrown (1 calls)",
      "a request timed out": "retried (2 calls)",
      "bad stream config": "thrown (1 calls)",
      "refused before asking": "thrown (1 calls)",
      refused: "retried (2 calls)",
      "database not created yet": "retried (2 calls)",
      "server starting up": "retried (2 calls)",
      "stream not found": "retried (2 calls)",
      "jetstream not ready": "retried (2 calls)",
      "redis password": "thrown (1 calls)",
      "redis without a password": "thrown (1 calls)",
      "redis loading": "retried (2 calls)",
    },
  )
})

test("retryUntilReady logs what a refused localhost says (an AggregateError without a message)", async () => {
  const logged: unknown[] = []
  let calls = 0
  await retryUntilReady(
    async () => {
      if (++calls === 1) {
        throw new AggregateError([
          new Error("connect ECONNREFUSED ::1:5432"),
          new Error("connect ECONNREFUSED 127.0.0.1:5432"),
        ])
      }
    },
    { what: "Postgres", log: (_m, fields) => logged.push(fields.error), firstDelayMs: 1 },
  )
  assert.deepEqual(logged, ["connect ECONNREFUSED ::1:5432; connect ECONNREFUSED 127.0.0.1:5432"])
})

test("retryUntilReady gives a try up after attemptTimeoutMs, as a failure, and tries again", async () => {
  const logged: Record<string, unknown>[] = []
  let calls = 0
  const value = await retryUntilReady(
    () => (++calls === 1 ? new Promise<string>(() => {}) : Promise.resolve("ready")),
    {
      what: "Redis",
      log: (message, fields) => logged.push({ message, ...fields }),
      firstDelayMs: 1,
      attemptTimeoutMs: 20,
    },
  )
  assert.equal(value, "ready")
  assert.equal(calls, 2)
  assert.deepEqual(logged, [
    { message: "waiting for Redis", attempt: 1, retryInMs: 1, error: "no answer within 20 ms" },
  ])
})

test("describeError says what an AggregateError of no message holds: a refusal on localhost", () => {
  // Node tries ::1 and 127.0.0.1 for localhost where both are listed, and reports the two
  // refusals together with an empty message; `admin:` and `just up:` printed nothing else.
  const refused = (address: string) =>
    Object.assign(new Error(`connect ECONNREFUSED ${address}:5432`), { code: "ECONNREFUSED" })
  const both = new AggregateError([refused("::1"), refused("127.0.0.1")])
  assert.equal(
    describeError(both),
    "connect ECONNREFUSED ::1:5432; connect ECONNREFUSED 127.0.0.1:5432",
  )
  assert.equal(describeError(Object.assign(new Error(""), { code: "ECONNRESET" })), "ECONNRESET")
  assert.equal(describeError("plain"), "plain")
})
