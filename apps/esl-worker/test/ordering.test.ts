// Must-show 1 of issue 5: ordering under failure. 10 writers run 50 overlapping jobs over 500
// labels; AIMS injects 429s, 503s, timeouts, bursts and token expiry; two worker processes
// (the real esl-worker main) drain, and one is kill -9'd midway. The checker reads what the
// fake AIMS recorded, the outbox and the admin API.
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import {
  migrateEslSchema,
  upsertProducts,
  writeLabelJob,
  writePriceChange,
} from "@keyway/esl-writer-app"
import { createConsumerAdmin } from "@keyway/keyed-consumer"
import { connectNats } from "@keyway/nats"
import { createRelay } from "@keyway/outbox"
import {
  createTestDatabase,
  createTestStream,
  spawnTs,
  startFakeAims,
  type TsChild,
  waitFor,
} from "@keyway/testkit"
import { jetstream } from "@nats-io/jetstream"
import type { NatsConnection } from "@nats-io/transport-node"
import { sql } from "kysely"
import {
  committedTasks,
  eventIdOf,
  imageHashOf,
  macs,
  SHARED_NATS,
  SHARED_REDIS,
  sleep,
  unfinishedLabels,
  unique,
  workerMain,
} from "./support.ts"

const LABELS = 500
const PRODUCTS = 50
const WRITERS = 10
const JOBS_PER_WRITER = 5

let nc: NatsConnection
const cleanups: (() => Promise<unknown>)[] = []
before(async () => {
  nc = await connectNats({ servers: SHARED_NATS })
})
after(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => {})
  await nc.close()
})

test("50 overlapping jobs over 500 labels, AIMS failing, a worker kill -9'd: every label ends on its last job, pushes in version order", async () => {
  const t = await createTestDatabase({ poolSize: WRITERS + 4 })
  cleanups.push(() => t.drop())
  await migrateEslSchema(t.db)
  const stream = await createTestStream(nc)
  cleanups.push(() => stream.delete())
  const group = unique("esl")
  const seed = Math.floor(Math.random() * 2 ** 31)
  const aims = await startFakeAims({
    latencyMs: 2,
    failureRates: { rateLimited: 0.03, serverError: 0.03, timeout: 0.005 },
    seed,
  })
  cleanups.push(() => aims.stop())
  const relay = createRelay({
    connectionString: t.url,
    jetstream: jetstream(nc),
    connection: nc,
    site: stream.site,
  })
  cleanups.push(() => relay.stop())
  await relay.start()

  // The catalogue and the labels' starting bindings, without tasks: the jobs make those.
  const labels = macs(LABELS)
  const products = Array.from({ length: PRODUCTS }, (_, i) => `P${String(i).padStart(3, "0")}`)
  await upsertProducts(
    t.db,
    products.map((id, i) => ({ id, name: `Product ${i}`, priceMinor: 100 + i, currency: "EUR" })),
  )
  await sql`
    insert into esl.label (label_code, product_id)
    select * from unnest(${labels}::text[], ${labels.map((_, i) => products[i % PRODUCTS]!)}::text[])
  `.execute(t.db)

  const startWorker = (id: string): TsChild => {
    const child = spawnTs(workerMain, {
      DATABASE_URL: t.url,
      NATS_URL: SHARED_NATS,
      REDIS_URL: SHARED_REDIS,
      ESL_STREAM: stream.name,
      ESL_GROUP: group,
      ESL_FILTER_SUBJECT: `${stream.site}.esl.label`,
      WORKER_ID: id,
      AIMS_URL: aims.url,
      AIMS_COMPANY: aims.company,
      AIMS_STORE: aims.store,
      AIMS_USERNAME: aims.username,
      AIMS_PASSWORD: aims.password,
      AIMS_TIMEOUT_MS: "300",
      // The fake never applies a request it held: no wait is needed, beyond the timeout.
      AIMS_SETTLE_MS: "300",
      ESL_BACKOFF_MS: "50",
      ESL_MAX_BACKOFF_MS: "1000",
      ESL_MAX_ATTEMPTS: "10",
      LEASE_MS: "2000",
      POLL_MS: "500",
      RECOVERY_MS: "500",
    })
    cleanups.push(async () => {
      child.kill("SIGKILL")
      await child.exited()
    })
    return child
  }
  const workers = [startWorker("w0"), startWorker("w1")]
  await waitFor(() => workers.every((w) => w.json().some((l) => l.started)), {
    timeoutMs: 20_000,
    message: "both workers started",
  })

  // Vendor trouble on top of the random failures: bursts of 429/5xx and revoked tokens.
  let troubles = 0
  const trouble = setInterval(() => {
    // Bursts stop near the end: with few labels left, every burst would land on the same
    // ones and kill them, which tests the vendor's cruelty rather than the ordering.
    if (enqueued > 0 && aims.pushes().length > enqueued * 0.9) return
    troubles++
    if (troubles % 3 === 0) aims.expireTokens()
    else aims.burst(troubles % 2 === 0 ? 429 : 502, 15)
  }, 400)
  cleanups.push(async () => clearInterval(trouble))

  // 10 writers, 5 jobs each, in quick succession: label jobs rebinding 30–80 random labels,
  // and price changes over 3–6 products (touching every label that shows them).
  const pick = <T>(list: readonly T[], n: number) =>
    [...list].sort(() => Math.random() - 0.5).slice(0, n)
  const rand = (lo: number, hi: number) => lo + Math.floor(Math.random() * (hi - lo + 1))
  let enqueued = 0
  await Promise.all(
    Array.from({ length: WRITERS }, async (_, w) => {
      for (let j = 0; j < JOBS_PER_WRITER; j++) {
        const jobId = `w${w}j${j}`
        const result =
          (w + j) % 3 === 0
            ? await writePriceChange(t.db, {
                jobId,
                changes: pick(products, rand(3, 6)).map((productId) => ({
                  productId,
                  priceMinor: rand(50, 99_999),
                })),
              })
            : await writeLabelJob(t.db, {
                jobId,
                labels: pick(labels, rand(30, 80)).map((labelCode) => ({
                  labelCode,
                  productId: products[rand(0, PRODUCTS - 1)]!,
                })),
              })
        enqueued += result.tasks.length
        await sleep(rand(0, 60))
      }
    }),
  )

  // Midway: a third of the pushes in, the first worker dies without a word.
  await waitFor(() => aims.pushes().length >= enqueued / 3, {
    timeoutMs: 60_000,
    message: "a third of the labels pushed",
  })
  // It took part: it had claimed keys of its own (a key keeps its last owner until the
  // recovery loop clears a lapsed lease).
  const ownedByW0 = await sql<{ n: number }>`
    select count(*)::int as n from keyway.consumer_key where grp = ${group} and owner = 'w0'`.execute(
    t.db,
  )
  workers[0]!.kill("SIGKILL")
  await workers[0]!.exited()
  const pushedAtKill = aims.pushes().length
  assert.ok(ownedByW0.rows[0]!.n > 0, "the worker killed had drained labels")
  assert.ok(pushedAtKill < enqueued, "the worker died with work left")

  await waitFor(async () => (await unfinishedLabels(t.db, group)) === 0, {
    timeoutMs: 90_000,
    intervalMs: 250,
    message: "every label's newest version finished",
  })
  clearInterval(trouble)

  const { byLabel, byEventId } = await committedTasks(t.db, stream.site)
  const dead = await createConsumerAdmin({ db: t.db, group }).listDead("esl.label")
  const deadSet = new Set(dead.map((d) => `${d.key}/${d.ver}`))
  const lastJob = new Map(
    (
      await sql<{ label_code: string; last_job_id: string | null }>`
        select label_code, last_job_id from esl.label`.execute(t.db)
    ).rows.map((r) => [r.label_code, r.last_job_id]),
  )
  const problems: string[] = []
  let total = 0
  for (const code of labels) {
    const tasks = byLabel.get(code) ?? []
    total += tasks.length
    // Every accepted push, repeats of an idempotency key included: the fake does not apply a
    // repeat, but nothing says AIMS ignores one, so an older version sent again after a newer
    // one would be what the shelf shows.
    const accepted = aims.requests().filter((p) => p.labelCode === code && p.outcome === 200)
    if (tasks.length === 0) {
      if (accepted.length > 0) problems.push(`${code}: pushed without a task`)
      continue
    }
    // Pushes in version order, every version pushed unless it is dead and listed. A version
    // pushed again right after itself (the worker killed between its push and done) is the
    // same image again.
    const versions = accepted
      .map((p) => byEventId.get(eventIdOf(p))?.ver ?? -1)
      .filter((v, i, all) => i === 0 || v !== all[i - 1])
    // Every version not dead whose image differs from the last one drawn: the worker pushes
    // only pages whose image changed. A version that draws what the one before drew is done
    // without a push; counted as missing, one failed this test (fake AIMS seed 123834858): a
    // price change that a label job's rebinding had raced, which the writer no longer makes.
    const expected: number[] = []
    let lastDrawn: string | undefined
    for (const task of tasks) {
      if (deadSet.has(`${code}/${task.ver}`)) continue
      const drawn = await imageHashOf(task.payload)
      if (drawn === lastDrawn) continue
      expected.push(task.ver)
      lastDrawn = drawn
    }
    if (JSON.stringify(versions) !== JSON.stringify(expected)) {
      problems.push(
        `${code}: pushed versions ${versions.join(",")}, expected ${expected.join(",")}`,
      )
    }
    // The label shows its last job: the newest version's image, and that is the job the
    // writer's domain rows name.
    const newest = tasks.at(-1)!
    if (newest.payload.jobId !== lastJob.get(code)) {
      problems.push(
        `${code}: newest task from ${newest.payload.jobId}, label row says ${lastJob.get(code)}`,
      )
    }
    if (!deadSet.has(`${code}/${newest.ver}`)) {
      const shown = accepted.at(-1)?.imageSha256
      if (shown !== (await imageHashOf(newest.payload))) {
        problems.push(`${code}: final image is not v${newest.ver}'s (job ${newest.payload.jobId})`)
      }
    }
  }
  assert.deepEqual(problems, [], `ordering problems (fake AIMS seed ${seed})`)
  assert.equal(total, enqueued, "the outbox holds exactly the tasks the writers enqueued")
  const labelsTouched = [...byLabel.keys()].length
  assert.ok(labelsTouched > LABELS * 0.9, `most labels had tasks (${labelsTouched})`)
  assert.ok(
    [...byLabel.values()].some((tasks) => tasks.length >= 4),
    "jobs overlapped: some label got several tasks",
  )
  // The failures really happened, and were ridden out.
  const outcomes = new Map<string, number>()
  for (const r of aims.requests())
    outcomes.set(String(r.outcome), (outcomes.get(String(r.outcome)) ?? 0) + 1)
  for (const o of ["429", "502", "503", "timeout"]) {
    assert.ok((outcomes.get(o) ?? 0) > 0, `AIMS injected ${o} (${JSON.stringify([...outcomes])})`)
  }
  assert.ok(aims.tokensIssued > 2, "tokens were revoked and fetched again")
  // Every failure injected here is one to ride out. With this test's 10 attempts at most 1 s
  // apart, a task can die of bad luck alone (ten injected failures in a row, about 1e-6 at
  // these rates), but far more likely of a transient answer taken for a permanent one.
  assert.deepEqual(
    dead.map((d) => `${d.key}/${d.ver} after ${d.attempts}: ${d.lastError}`),
    [],
    "nothing dead",
  )
  // A 429's Retry-After (1 s from the fake) is waited out before the same push comes again.
  // Not every time: a worker killed between the 429 and recording it, or whose lease another
  // took meanwhile, leaves the task to another worker with no wait recorded. Without
  // Retry-After the retries come 100-200 ms later (the policy's first backoff), nearly all.
  const requests = aims.requests()
  const waits: number[] = []
  for (const [n, r] of requests.entries()) {
    if (r.outcome !== 429 || r.answeredAt === undefined) continue
    const again = requests.slice(n + 1).find((x) => x.idempotencyKey === r.idempotencyKey)
    if (again) waits.push(again.receivedAt - r.answeredAt)
  }
  const early = waits.filter((ms) => ms < 950)
  assert.ok(waits.length >= 5, `pushes sent again after a 429: ${waits.length}`)
  assert.ok(
    early.length <= waits.length / 10,
    `${early.length} of ${waits.length} pushes sent again sooner than 950 ms after their 429: ${early.map(Math.round).join(", ")} ms`,
  )
  console.log(
    JSON.stringify({
      enqueued,
      labelsTouched,
      pushedAtKill,
      pushes: aims.pushes().length,
      requests: aims.requests().length,
      outcomes: Object.fromEntries(outcomes),
      tokens: aims.tokensIssued,
      dead: dead.map((d) => `${d.key}/${d.ver} after ${d.attempts}: ${d.lastError}`),
    }),
  )
})
