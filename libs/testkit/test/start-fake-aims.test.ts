// The fake AIMS is the oracle of the ESL tests (what each label shows, which requests were
// refused or applied late): what it answers and records is checked here on its own, over
// plain HTTP, not through the client it judges.
import assert from "node:assert/strict"
import { test } from "node:test"
import { setTimeout as sleep } from "node:timers/promises"
import { type FakeAims, startFakeAims } from "../src/index.ts"

const PNG = Buffer.concat([
  Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
  Buffer.from("not really an image"),
])

async function tokenOf(aims: FakeAims): Promise<{ status: number; token?: string }> {
  const res = await fetch(`${aims.url}/common/api/v2/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ username: aims.username, password: aims.password }),
  })
  const body = (await res.json()) as { responseMessage?: { access_token?: string } }
  return { status: res.status, token: body.responseMessage?.access_token }
}

function push(
  aims: FakeAims,
  token: string,
  body: Record<string, unknown>,
  options: { key?: string; signal?: AbortSignal; store?: string } = {},
) {
  const url = new URL(`${aims.url}/common/api/v2/common/labels/image`)
  url.searchParams.set("company", aims.company)
  url.searchParams.set("store", options.store ?? aims.store)
  return fetch(url, {
    method: "POST",
    headers: {
      authorization: `Bearer ${token}`,
      "content-type": "application/json",
      ...(options.key ? { "idempotency-key": options.key } : {}),
    },
    body: JSON.stringify({ page: 1, frontPage: 1, image: PNG.toString("base64"), ...body }),
    signal: options.signal,
  })
}

test("a token stops working after its time; a refused request is not recorded as a label's", async () => {
  await using aims = await startFakeAims({ tokenTtlMs: 300 })
  const { status, token } = await tokenOf(aims)
  assert.equal(status, 200)
  assert.equal((await push(aims, token!, { labelCode: "A" })).status, 200)
  await sleep(400)
  assert.equal((await push(aims, token!, { labelCode: "A" })).status, 401)
  assert.equal((await push(aims, "made-up", { labelCode: "A" })).status, 401)
  assert.equal((await push(aims, token!, { labelCode: "A" }, { store: "S999" })).status, 401)
  const fresh = (await tokenOf(aims)).token!
  assert.equal((await push(aims, fresh, { labelCode: "A" }, { store: "S999" })).status, 404)
  assert.equal((await push(aims, fresh, { labelCode: "A", frontPage: 8 })).status, 400)
  assert.equal((await push(aims, fresh, { labelCode: "A", frontPage: true })).status, 400)
  assert.equal(aims.tokensIssued, 2)
  assert.equal(aims.requests().length, 1, "only the well-formed, authorised push")
  assert.equal(aims.pushes("A").length, 1)
})

test("a repeated idempotency key is marked a duplicate and drawn all the same", async () => {
  // Nothing says AIMS honours the header: an older version sent again after a newer one is
  // what the label then shows, and the fake must say so.
  await using aims = await startFakeAims()
  const token = (await tokenOf(aims)).token!
  for (const [labelCode, key] of [
    ["A", "s:1"],
    ["A", "s:1"],
    ["A", "s:2"],
    ["A", "s:1"],
  ]) {
    assert.equal((await push(aims, token, { labelCode }, { key })).status, 200)
  }
  assert.deepEqual(
    aims.requests().map((r) => [r.idempotencyKey, r.duplicate]),
    [
      ["s:1", false],
      ["s:1", true],
      ["s:2", false],
      ["s:1", true],
    ],
  )
  assert.deepEqual(
    aims.pushes("A").map((p) => p.idempotencyKey),
    ["s:1", "s:2"],
    "first-time pushes",
  )
  assert.equal(aims.lastPush("A")!.idempotencyKey, "s:1", "the repeat drawn last")
  assert.equal(aims.shown("A")!.push!.idempotencyKey, "s:1")
})

test("a request held and applied late lands over what was applied meanwhile", async () => {
  await using aims = await startFakeAims()
  const token = (await tokenOf(aims)).token!
  aims.holdNext(1, 500)
  const giveUp = new AbortController()
  const first = push(
    aims,
    token,
    { labelCode: "A", page: 2, frontPage: 2 },
    { key: "v1", signal: giveUp.signal },
  )
  while (aims.requests().length < 1) await sleep(10)
  giveUp.abort()
  await first.catch(() => {})
  assert.equal(aims.lastPush("A"), undefined, "not applied while held")
  assert.equal((await push(aims, token, { labelCode: "A" }, { key: "v2" })).status, 200)
  assert.equal(aims.lastPush("A")!.idempotencyKey, "v2")
  while (aims.requests()[0]!.appliedAt === undefined) await sleep(20)
  // What a slow AIMS may do with a request whose client gave up: the older image shows.
  assert.equal(aims.lastPush("A")!.idempotencyKey, "v1")
  assert.equal(aims.requests()[0]!.outcome, "late")
})

test("the same seed rolls the same injected failures", async () => {
  const outcomes = async () => {
    await using aims = await startFakeAims({
      seed: 42,
      failureRates: { rateLimited: 0.2, serverError: 0.2 },
    })
    const token = (await tokenOf(aims)).token!
    const statuses: number[] = []
    for (let i = 0; i < 40; i++)
      statuses.push((await push(aims, token, { labelCode: `L${i}` })).status)
    assert.deepEqual(
      statuses,
      aims.requests().map((r) => r.outcome),
      "each answer is what the fake recorded",
    )
    return statuses
  }
  const once = await outcomes()
  assert.deepEqual(await outcomes(), once)
  for (const status of [200, 429, 503]) assert.ok(once.includes(status), `rolled ${status}`)
})
