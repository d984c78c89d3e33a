// The AIMS client against the fake: token handling and how each failure is classified.
import assert from "node:assert/strict"
import { createServer } from "node:http"
import type { AddressInfo } from "node:net"
import { describe, test } from "node:test"
import { startFakeAims, waitFor } from "@keyway/testkit"
import { AimsError, createAimsClient, parseRetryAfter } from "../src/aims-client.ts"
import { renderLabel } from "../src/render-label.ts"

const task = {
  labelCode: "0A1B2C3D4E5F",
  jobId: "j1",
  page: 1,
  frontPage: true,
  productId: "P-1",
  productName: "Espresso beans 1 kg",
  priceMinor: 1899,
  currency: "EUR",
}

describe("AIMS client", async () => {
  const png = await renderLabel(task)
  const push = (id: string) => ({
    labelCode: task.labelCode,
    page: 2,
    frontPage: 1,
    png,
    idempotencyKey: id,
    fencingToken: "3.7",
  })

  test("pushes the image with token, idempotency key and fencing token; reuses the token", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 2000 })
    await client.pushImage(push("s:1"))
    await client.pushImage(push("s:2"))
    const [first, second] = aims.pushes(task.labelCode)
    assert.equal(aims.tokensIssued, 1, "one token for both pushes")
    assert.equal(first!.idempotencyKey, "s:1")
    assert.equal(second!.idempotencyKey, "s:2")
    assert.equal(first!.page, 2)
    assert.equal(first!.frontPage, 1)
    assert.equal(first!.fencingToken, "3.7")
    assert.ok(first!.image.equals(png), "the fake got the PNG bytes")
  })

  test("an AIMS_URL with a path keeps it: token and image are asked for below it", async () => {
    await using aims = await startFakeAims({ basePath: "/c1" })
    for (const baseUrl of [aims.url, `${aims.url}/`]) {
      const client = createAimsClient({ ...aims, baseUrl, timeoutMs: 2000 })
      await client.pushImage(push(`p:${baseUrl}`))
    }
    assert.equal(aims.pushes(task.labelCode).length, 2)
    assert.equal(aims.tokensIssued, 2, "one token per client")
  })

  test("a 401 (token expired) re-authenticates once and the push goes through", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 2000 })
    await client.pushImage(push("s:1"))
    aims.expireTokens()
    await client.pushImage(push("s:2"))
    assert.equal(aims.tokensIssued, 2)
    assert.deepEqual(
      aims.requests().map((r) => r.outcome),
      [200, 200],
      "the 401 is answered before the body is recorded as a push",
    )
    assert.equal(aims.pushes(task.labelCode).length, 2)
  })

  test("beforeSend runs before each image request, the re-send after a 401 too; what it throws ends the push unsent", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 2000 })
    let calls = 0
    await client.pushImage({ ...push("b:1"), beforeSend: () => void calls++ })
    assert.equal(calls, 1)
    aims.expireTokens()
    const lost = new Error("lock lost")
    calls = 0
    const err = await client
      .pushImage({
        ...push("b:2"),
        beforeSend: () => {
          // The first send is answered 401; the key is lost while the token is renewed.
          if (++calls === 2) throw lost
        },
      })
      .then(
        () => undefined,
        (e) => e,
      )
    assert.equal(err, lost, "the throw itself, not an AimsError")
    assert.equal(calls, 2)
    assert.equal(aims.tokensIssued, 2, "re-authenticated, then refused to send")
    assert.deepEqual(
      aims.pushes(task.labelCode).map((p) => p.idempotencyKey),
      ["b:1"],
    )
  })

  test("a push aborted while the token is fetched fails alone; the push waiting beside it goes through", async () => {
    await using aims = await startFakeAims({ latencyMs: 300 })
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 2000 })
    // The first push starts the token fetch that both wait on; its label loses its lease.
    const aborted = new AbortController()
    const first = client.pushImage({ ...push("s:1"), signal: aborted.signal })
    const second = client.pushImage(push("s:2"))
    setTimeout(() => aborted.abort(new Error("lease lost")), 50)
    await assert.rejects(first)
    await second
    assert.deepEqual(
      aims.pushes(task.labelCode).map((p) => p.idempotencyKey),
      ["s:2"],
    )
    assert.equal(aims.tokensIssued, 1)
  })

  test("429, 5xx and a wrong store's 404 are retryable AimsErrors; a malformed request's 400 is not", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 2000 })
    aims.burst(429, 1)
    aims.burst(503, 1)
    for (const status of [429, 503]) {
      const err = await client.pushImage(push("s:1")).then(
        () => undefined,
        (e) => e,
      )
      assert.ok(err instanceof AimsError)
      assert.equal(err.status, status)
      assert.equal(err.retryable, true)
      // The fake answers its 429s with Retry-After: 1, which the keyed consumer waits.
      assert.equal(err.retryAfterMs, status === 429 ? 1000 : undefined)
    }
    // A store setting an operator can mend: dead at once, every label update in flight
    // would be dropped.
    const wrongStore = createAimsClient({
      baseUrl: aims.url,
      ...aims,
      store: "S999",
      timeoutMs: 2000,
    })
    const notFound = await wrongStore.pushImage(push("s:1")).then(
      () => undefined,
      (e) => e,
    )
    assert.ok(notFound instanceof AimsError)
    assert.equal(notFound.status, 404)
    assert.equal(notFound.retryable, true)
    const bad = await client.pushImage({ ...push("s:2"), png: Buffer.from("not a png") }).then(
      () => undefined,
      (e) => e,
    )
    assert.ok(bad instanceof AimsError)
    assert.equal(bad.status, 400)
    assert.equal(bad.retryable, false)
    assert.equal(aims.pushes().length, 0)
  })

  test("a rate limit on the token request carries its Retry-After, as one on the image does", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 2000 })
    aims.burstTokens(429, 1)
    aims.burstTokens(503, 1)
    for (const status of [429, 503]) {
      const err = await client.pushImage(push("s:1")).then(
        () => undefined,
        (e) => e,
      )
      assert.ok(err instanceof AimsError, String(err))
      assert.equal(err.status, status)
      assert.equal(err.retryable, true)
      assert.equal(err.retryAfterMs, status === 429 ? 1000 : undefined)
    }
    await client.pushImage(push("s:1"))
    assert.equal(aims.tokensIssued, 1)
    assert.equal(aims.pushes(task.labelCode).length, 1)
  })

  test("no answer within the timeout is a retryable timeout, retried once AIMS cannot apply it late", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({
      baseUrl: aims.url,
      ...aims,
      timeoutMs: 200,
      settleMs: 1500,
    })
    aims.holdNext(1)
    const err = await client.pushImage(push("s:1")).then(
      () => undefined,
      (e) => e,
    )
    assert.ok(err instanceof AimsError, String(err))
    assert.equal(err.status, "timeout")
    assert.equal(err.retryable, true)
    assert.equal(err.retryAfterMs, 1500)
    await client.pushImage(push("s:1"))
    assert.deepEqual(
      aims.requests().map((r) => r.outcome),
      ["timeout", 200],
    )
  })

  test("a push its worker gives up (stop, or its label lost) waits as a timeout does", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 5000, settleMs: 1500 })
    await client.pushImage(push("a:0")) // a token in hand: the hold below takes the image
    aims.holdNext(1)
    const aborter = new AbortController()
    const pushing = client.pushImage({ ...push("a:1"), signal: aborter.signal })
    await waitFor(() => aims.requests().length === 2, { timeoutMs: 5000, message: "sent" })
    aborter.abort(new Error("shutting down"))
    const err = await pushing.then(
      () => undefined,
      (e) => e,
    )
    assert.ok(err instanceof AimsError, String(err))
    assert.equal(err.status, "aborted")
    assert.equal(err.retryAfterMs, 1500)
    // The consumer finds the abort in the cause chain: cut short, not failed.
    const cause = err.cause as Error
    assert.ok(cause === aborter.signal.reason || cause.name === "AbortError", String(cause))
  })

  test("a push given up before it was sent is the abort itself, holding nothing", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 5000, settleMs: 1500 })
    const aborter = new AbortController()
    const reason = new Error("shutting down")
    aborter.abort(reason)
    const err = await client.pushImage({ ...push("n:1"), signal: aborter.signal }).then(
      () => undefined,
      (e) => e,
    )
    assert.equal(err, reason)
    assert.equal(aims.requests().length, 0)
  })

  test("a gateway's 502 or 504 waits as a timeout does: AIMS may have the request and apply it late", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 2000, settleMs: 1500 })
    for (const status of [502, 504, 503] as const) {
      aims.burst(status, 1)
      const err = await client.pushImage(push(`g:${status}`)).then(
        () => undefined,
        (e) => e,
      )
      assert.ok(err instanceof AimsError, String(err))
      assert.equal(err.status, status)
      assert.equal(err.retryable, true)
      assert.equal(err.retryAfterMs, status === 503 ? undefined : 1500, `HTTP ${status}`)
    }
  })

  test("a repeated idempotency key is accepted, and counted once among first-time pushes", async () => {
    await using aims = await startFakeAims()
    const client = createAimsClient({ baseUrl: aims.url, ...aims, timeoutMs: 2000 })
    await client.pushImage(push("s:1"))
    await client.pushImage(push("s:1"))
    assert.equal(aims.requests().length, 2)
    assert.equal(aims.pushes(task.labelCode).length, 1)
    assert.equal(aims.requests()[1]!.duplicate, true)
  })
})

test("Retry-After is read as delay-seconds or as an HTTP-date", () => {
  const now = Date.parse("2026-12-06T10:00:00Z")
  assert.equal(parseRetryAfter("120", now), 120_000)
  assert.equal(parseRetryAfter("Sun, 06 Dec 2026 10:00:30 GMT", now), 30_000)
  assert.equal(parseRetryAfter("Sun, 06 Dec 2026 09:00:00 GMT", now), 0, "a date past is now")
  assert.equal(parseRetryAfter("soon", now), undefined)
  assert.equal(parseRetryAfter(undefined, now), undefined)
})

// Not against the fake, which follows the client's idea of AIMS: what goes on the wire, as the
// public SoluM clients send it.
test("the requests AIMS gets: its token and image paths, page numbers, a base64 PNG", async () => {
  const seen: { path: string; body: any }[] = []
  const server = createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on("data", (c) => chunks.push(c))
    req.on("end", () => {
      const url = new URL(req.url ?? "/", "http://x")
      seen.push({
        path: `${req.method} ${url.pathname}${url.search}`,
        body: JSON.parse(Buffer.concat(chunks).toString()),
      })
      res.setHeader("content-type", "application/json")
      res.end(
        url.pathname.endsWith("/token")
          ? JSON.stringify({ responseCode: "200", responseMessage: { access_token: "t" } })
          : JSON.stringify({ responseCode: "200", responseMessage: "SUCCESS" }),
      )
    })
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  try {
    const { port } = server.address() as AddressInfo
    const png = await renderLabel(task)
    const client = createAimsClient({
      baseUrl: `http://127.0.0.1:${port}`,
      company: "ACME",
      store: "S7",
      username: "u",
      password: "p",
      timeoutMs: 2000,
    })
    await client.pushImage({
      labelCode: task.labelCode,
      page: 3,
      frontPage: 1,
      png,
      idempotencyKey: "k",
      fencingToken: "1.1",
    })
    assert.deepEqual(
      seen.map((r) => r.path),
      [
        "POST /common/api/v2/token",
        "POST /common/api/v2/common/labels/image?company=ACME&store=S7",
      ],
    )
    assert.deepEqual(seen[0]!.body, { username: "u", password: "p" })
    const { image, ...rest } = seen[1]!.body
    assert.deepEqual(rest, { labelCode: task.labelCode, page: 3, frontPage: 1 })
    assert.ok(Buffer.from(image, "base64").equals(png))
  } finally {
    server.close()
  }
})
