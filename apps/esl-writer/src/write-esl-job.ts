import { randomUUID } from "node:crypto"
import { type EnqueuedEvent, enqueue, type OutboxEvent } from "@keyway/outbox"
import {
  canonicalLabelCode,
  EslFields,
  EslLabelPages,
  type EslLabelPagesPayload,
  InvalidEventError,
  isKnownCurrency,
  knownCurrency,
} from "@keyway/schemas"
import { SpanStatusCode, trace } from "@opentelemetry/api"
import * as Result from "effect/Result"
import * as Schema from "effect/Schema"
import { type Kysely, sql } from "kysely"

/**
 * One page of a label bound to a product. The label's other pages keep what they show; a job
 * may bind several pages of one label, one entry each, and bring at most one to the front.
 */
export interface LabelAssignment {
  /**
   * 12 hex digits in any case: bare, six pairs with one separator throughout (`:` or `-`), or
   * three dotted groups of four; stored canonical (12 uppercase hex).
   */
  labelCode: string
  productId: string
  /** Default 1. */
  page?: number
  /** Whether the label shows this page from now on. Default true. */
  frontPage?: boolean
}

export interface LabelJobOptions {
  /** Default a random UUID. */
  jobId?: string
  labels: readonly LabelAssignment[]
}

export interface PriceChange {
  productId: string
  priceMinor: number
  currency?: string
  name?: string
}

export interface PriceChangeOptions {
  jobId?: string
  changes: readonly PriceChange[]
}

export interface EslJobResult {
  jobId: string
  /** One per affected label, sorted by label code. */
  tasks: EnqueuedEvent[]
}

export class EslWriterError extends Error {
  override name = "EslWriterError"
}

/**
 * A product as stored cannot be shown on a label: a value written before the writer checked
 * it (an older release), or one a check added since refuses (a currency code that is not
 * ISO 4217). Not the request's fault, and no retry of it mends it: a price change of the
 * product, with the value put right, does.
 */
export class StoredProductError extends EslWriterError {
  override name = "StoredProductError"
}

/** A job id that was written before: the job committed then, and is not written again. */
export class JobExistsError extends EslWriterError {
  override name = "JobExistsError"
}

// Text stored as it was sent. Postgres refuses NUL in text, as a server error naming no
// field, and stores an unpaired surrogate as U+FFFD, silently another name; the other
// control characters (C0, DEL, C1) have no business in an id or on a shelf.
const isPrintable = Schema.makeFilter<string>((s) =>
  /[\p{Cc}\p{Cs}]/u.test(s)
    ? "must be printable text: no control characters or unpaired surrogates"
    : true,
)
const JobId = EslFields.jobId.pipe(Schema.check(isPrintable))
const Currency = EslFields.currency.pipe(Schema.check(isKnownCurrency))
const ProductId = EslFields.productId.pipe(Schema.check(isPrintable))
const ProductName = EslFields.productName.pipe(Schema.check(isPrintable))
// A job with nothing in it would still take its id, and the client's real job under the same
// id would then be refused as a repeat.
const isNotEmpty = Schema.isMinLength(1, { message: "must not be empty" })

// What a caller may send, checked whole before anything is written, each field against the
// render task's own bounds (EslFields). JSON from the HTTP API arrives here unchecked.
const LabelJobRequest = Schema.Struct({
  jobId: Schema.optional(JobId),
  labels: Schema.Array(
    Schema.Struct({
      // Folded to its canonical form and checked as a MAC by writeLabelJob.
      labelCode: Schema.String,
      productId: ProductId,
      page: Schema.optional(EslFields.page),
      frontPage: Schema.optional(EslFields.frontPage),
    }),
  ).pipe(Schema.check(isNotEmpty)),
})
const PriceChangeRequest = Schema.Struct({
  jobId: Schema.optional(JobId),
  changes: Schema.Array(
    Schema.Struct({
      productId: ProductId,
      priceMinor: EslFields.priceMinor,
      currency: Schema.optional(Currency),
      name: Schema.optional(ProductName),
    }),
  ).pipe(Schema.check(isNotEmpty)),
})
// A catalogue import sets what every later job of a label shows: a value stored unchecked
// here would fail those jobs, naming fields they do not contain.
const ProductsRequest = Schema.Array(
  Schema.Struct({
    id: ProductId,
    name: ProductName,
    priceMinor: EslFields.priceMinor,
    currency: Currency,
  }),
)

/**
 * Requests of up to this many items are told every problem at once; larger ones the first.
 * Listing them all is work in proportion to the problems: for 250,000 bad labels (a 4 MB
 * body) it held the event loop 1.8 s, every other client waiting, to answer 25 MB.
 */
const ALL_PROBLEMS_UP_TO = 1000

/** The items of a request: its array, or the arrays it holds. */
const itemsIn = (input: unknown): number =>
  Array.isArray(input)
    ? input.length
    : typeof input === "object" && input !== null
      ? Object.values(input).reduce<number>((n, v) => n + (Array.isArray(v) ? v.length : 0), 0)
      : 0

/**
 * The entries of a request, one per key (`keyOf` names it: "productId \"A\""): a repeat of an
 * entry is dropped, and two entries of one key that differ are refused, naming both. Taken as
 * "the last one wins", a caller's slip (a price typed twice, a label page given two
 * products) went to the shelf without a word.
 */
function onceEach<T extends object>(
  what: string,
  field: string,
  keyOf: (entry: T) => string,
  entries: readonly T[],
): T[] {
  const seen = new Map<string, { entry: T; at: number; json: string }>()
  for (const [at, entry] of entries.entries()) {
    const json = JSON.stringify(entry, Object.keys(entry).sort())
    const key = keyOf(entry)
    const first = seen.get(key)
    if (!first) seen.set(key, { entry, at, json })
    else if (first.json !== json) {
      throw new EslWriterError(
        `invalid ${what}: ${field}[${first.at}] and ${field}[${at}] both give ${key}, differently: give each once`,
      )
    }
  }
  return [...seen.values()].map((s) => s.entry)
}

function checked<T>(schema: Schema.Codec<T, unknown>, what: string, input: unknown): T {
  const all = itemsIn(input) <= ALL_PROBLEMS_UP_TO
  // A field the request does not know is refused, not dropped: Effect Schema drops it by
  // default, and a typo (`currency_code`, `front_page`, `job_id`) fell back to the default
  // without a word: a price shown in another currency, a label switched to its page at once,
  // a resent job made twice.
  const result = Schema.decodeUnknownResult(schema)(input, {
    errors: all ? "all" : "first",
    onExcessProperty: "error",
  })
  if (Result.isSuccess(result)) return result.success
  const more = all
    ? ""
    : ` (the first problem found: a request of over ${ALL_PROBLEMS_UP_TO} items is told one at a time)`
  throw new EslWriterError(`invalid ${what}${more}: ${result.failure.message}`, {
    cause: result.failure,
  })
}

const tracer = trace.getTracer("@keyway/esl-writer")
const DEADLOCK = "40P01"

// The locking discipline that makes overlapping jobs safe, in one place:
//  1. products before labels, each set in sorted order (ORDER BY … FOR SHARE/UPDATE locks
//     rows in the sorted order), so two jobs never wait on each other in a cycle;
//  2. a task's payload (every page of its label) is read only after its label's row lock is
//     held, and a price change takes the lock of every label showing its products before it
//     reads them: a change either committed before the read, which sees it, or commits after
//     this job, with a later version of the label. A label job holds the products it binds
//     FOR SHARE, so a price change of one waits for the binding and then finds the label.
//     Within a label, the outbox version order is commit order (the key-head lock), hence a
//     later version always carries newer data, and the last version is the truth.
// Without 2, a job could read a price, lose the race for the label to a price change, and
// enqueue the stale price as the label's newest version.

const UNIQUE_VIOLATION = "23505"

/** Records the job, or says it exists: a client that lost the answer may send it again. */
async function insertJob(trx: Kysely<any>, jobId: string, kind: string, labels: number) {
  try {
    await sql`insert into esl.job (id, kind, labels) values (${jobId}, ${kind}, ${labels})`.execute(
      trx,
    )
  } catch (err) {
    if ((err as { code?: string }).code === UNIQUE_VIOLATION) {
      throw new JobExistsError(`job ${jobId} was already written`, { cause: err })
    }
    throw err
  }
}

async function transaction<T>(
  db: Kysely<any>,
  name: string,
  attrs: Record<string, string | number>,
  body: (trx: Kysely<any>) => Promise<T>,
) {
  // The writer's span is active while enqueue() runs, so the outbox rows store its
  // traceparent and the relay's and worker's spans join this trace.
  return tracer.startActiveSpan(name, { attributes: attrs }, async (span) => {
    try {
      for (let attempt = 1; ; attempt++) {
        try {
          return await db.transaction().execute(body)
        } catch (err) {
          // The order above rules deadlocks out among writers; another client of these tables
          // might not follow it, and a retry is the standard answer.
          if ((err as { code?: string }).code !== DEADLOCK || attempt >= 3) throw err
        }
      }
    } catch (err) {
      span.recordException(err as Error)
      span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message })
      throw err
    } finally {
      span.end()
    }
  })
}

interface PageRow {
  label_code: string
  shown_page: number
  page: number
  job_id: string
  product_id: string
  name: string
  price_minor: number
  currency: string
}

/** One task per label: every page it has, as the tables hold them now. */
async function enqueueTasks(
  trx: Kysely<any>,
  jobId: string,
  codes: string[],
): Promise<EnqueuedEvent[]> {
  if (codes.length === 0) return []
  // A row stored before shown_page was added has none; its front_page still tells.
  const rows = await sql<PageRow>`
    select lp.label_code, lp.page, lp.job_id, lp.product_id, p.name, p.price_minor, p.currency,
           coalesce(l.shown_page, case when l.front_page then l.page end, 1) as shown_page
      from esl.label_page lp
      join esl.label l on l.label_code = lp.label_code
      join esl.product p on p.id = lp.product_id
     where lp.label_code = any(${codes}::text[])
     order by lp.label_code, lp.page
  `.execute(trx)
  // The writer's own check, which the event schema leaves out (it depends on the runtime):
  // a code stored before it existed would reach the shelf as itself, two decimals guessed.
  const unknown = rows.rows.find((r) => !knownCurrency(r.currency))
  if (unknown) {
    throw new StoredProductError(
      `product ${unknown.product_id} as stored cannot be shown on a label (currency ${JSON.stringify(unknown.currency)} is not an ISO 4217 code); put it right with a price change of ${unknown.product_id}`,
    )
  }
  const byLabel = new Map<string, PageRow[]>()
  for (const r of rows.rows) {
    const pages = byLabel.get(r.label_code)
    if (pages) pages.push(r)
    else byLabel.set(r.label_code, [r])
  }
  const events: OutboxEvent<EslLabelPagesPayload>[] = [...byLabel].map(([labelCode, pages]) => ({
    type: EslLabelPages.type,
    key: labelCode,
    payload: {
      labelCode,
      jobId,
      shownPage: pages[0]!.shown_page,
      pages: pages.map((r) => ({
        page: r.page,
        jobId: r.job_id,
        productId: r.product_id,
        productName: r.name,
        priceMinor: Number(r.price_minor),
        currency: r.currency,
      })),
    },
  }))
  let tasks: EnqueuedEvent[]
  try {
    tasks = await enqueue(trx, events)
  } catch (err) {
    if (!(err instanceof InvalidEventError)) throw err
    // Every field of a task comes from the tables, which the requests are checked against:
    // the stored row is at fault. Said by name, the first such product (looked for only
    // now, on the way out: a job of thousands of labels is not checked twice), each page
    // checked as a task of its own.
    for (const { payload } of events) {
      for (const page of payload.pages) {
        try {
          EslLabelPages.check({ ...payload, pages: [page] })
        } catch (bad) {
          if (!(bad instanceof InvalidEventError)) throw bad
          throw new StoredProductError(
            `product ${page.productId} as stored cannot be shown on a label (${bad.reason}); put it right with a price change of ${page.productId}`,
            { cause: bad },
          )
        }
      }
    }
    throw err
  }
  await sql`
    insert into esl.job_label (job_id, label_code, ver)
    select ${jobId}, * from unnest(${tasks.map((t) => t.key)}::text[], ${tasks.map((t) => t.ver)}::bigint[])
  `.execute(trx)
  return tasks
}

/**
 * A job over a set of labels: binds each label page named to a product (creating the label if
 * new) and enqueues one render task per label, all in one transaction with the domain rows. A
 * label code that is not a MAC is refused before anything is written, naming the label.
 */
export async function writeLabelJob(
  db: Kysely<any>,
  request: LabelJobOptions,
): Promise<EslJobResult> {
  const options = checked(LabelJobRequest, "label job", request)
  const jobId = options.jobId ?? randomUUID()
  const canonical = options.labels.map((a, i) => {
    const code = canonicalLabelCode(a.labelCode)
    if (code === undefined) {
      const shown = a.labelCode.length > 40 ? `${a.labelCode.slice(0, 40)}…` : a.labelCode
      throw new EslWriterError(
        `invalid label job: labels[${i}].labelCode ${JSON.stringify(shown)} is not a label MAC (12 hex digits: bare, in pairs separated by : or - throughout, or in dotted fours)`,
      )
    }
    return { ...a, page: a.page ?? 1, frontPage: a.frontPage ?? true, labelCode: code }
  })
  const entries = onceEach(
    "label job",
    "labels",
    (l) => `label ${l.labelCode} page ${l.page}`,
    canonical,
  ).sort((a, b) =>
    a.labelCode === b.labelCode ? a.page - b.page : a.labelCode < b.labelCode ? -1 : 1,
  )
  // Per label, the page it shows from now on, if the job brings one to the front (at most
  // one: frontPage defaults to true, so a job binding two pages of a label says which).
  const front = new Map<string, number>()
  for (const e of entries) {
    if (!e.frontPage) continue
    const other = front.get(e.labelCode)
    if (other !== undefined) {
      throw new EslWriterError(
        `invalid label job: label ${e.labelCode} is to show page ${other} and page ${e.page} (frontPage defaults to true): give frontPage false to all its pages but one`,
      )
    }
    front.set(e.labelCode, e.page)
  }
  // One row per label. Its product_id and page are for writers of older releases, which know
  // one page per label: the page brought to the front, else the job's first for the label.
  const first = new Map<string, (typeof entries)[number]>()
  for (const e of entries) if (!first.has(e.labelCode) || e.frontPage) first.set(e.labelCode, e)
  const labels = [...first.values()]
  const productIds = [...new Set(entries.map((l) => l.productId))].sort()
  return transaction(
    db,
    "esl label job",
    { "esl.job.id": jobId, "esl.job.labels": labels.length },
    async (trx) => {
      const found = await sql<{ id: string }>`
      select id from esl.product where id = any(${productIds}::text[]) order by id for share
    `.execute(trx)
      if (found.rows.length !== productIds.length) {
        const known = new Set(found.rows.map((r) => r.id))
        throw new EslWriterError(
          `unknown products: ${productIds.filter((p) => !known.has(p)).join(", ")}`,
        )
      }
      const codes = labels.map((l) => l.labelCode)
      await sql`select 1 from esl.label where label_code = any(${codes}::text[]) order by label_code for update`.execute(
        trx,
      )
      await sql`
      insert into esl.label (label_code, product_id, page, front_page, shown_page, last_job_id)
      select code, product, page, front, case when front then page end, ${jobId}
        from unnest(${codes}::text[], ${labels.map((l) => l.productId)}::text[],
                    ${labels.map((l) => l.page)}::int[], ${labels.map((l) => l.frontPage)}::boolean[])
          as t(code, product, page, front)
      on conflict (label_code) do update
        set product_id = excluded.product_id, page = excluded.page, front_page = excluded.front_page,
            -- A row stored before shown_page was added has none; its front_page still tells.
            shown_page = coalesce(excluded.shown_page, esl.label.shown_page,
                                  case when esl.label.front_page then esl.label.page end),
            last_job_id = excluded.last_job_id, updated_at = now()
    `.execute(trx)
      await sql`
      insert into esl.label_page (label_code, page, product_id, job_id)
      select code, page, product, ${jobId}
        from unnest(${entries.map((e) => e.labelCode)}::text[], ${entries.map((e) => e.page)}::int[],
                    ${entries.map((e) => e.productId)}::text[]) as t(code, page, product)
      on conflict (label_code, page) do update
        set product_id = excluded.product_id, job_id = excluded.job_id
    `.execute(trx)
      await insertJob(trx, jobId, "label_job", labels.length)
      return { jobId, tasks: await enqueueTasks(trx, jobId, codes) }
    },
  )
}

/**
 * A price edit over many products: updates them and enqueues one render task for every
 * label with a page showing one of them, in one transaction.
 */
export async function writePriceChange(
  db: Kysely<any>,
  request: PriceChangeOptions,
): Promise<EslJobResult> {
  const options = checked(PriceChangeRequest, "price change", request)
  const jobId = options.jobId ?? randomUUID()
  const changes = onceEach(
    "price change",
    "changes",
    (c) => `productId ${JSON.stringify(c.productId)}`,
    options.changes,
  ).sort((a, b) => (a.productId < b.productId ? -1 : 1))
  const ids = changes.map((c) => c.productId)
  return transaction(
    db,
    "esl price change",
    { "esl.job.id": jobId, "esl.job.products": ids.length },
    async (trx) => {
      const found = await sql<{ id: string }>`
      select id from esl.product where id = any(${ids}::text[]) order by id for update
    `.execute(trx)
      if (found.rows.length !== ids.length) {
        const known = new Set(found.rows.map((r) => r.id))
        throw new EslWriterError(`unknown products: ${ids.filter((p) => !known.has(p)).join(", ")}`)
      }
      await sql`
      update esl.product p
         set price_minor = c.price, currency = coalesce(c.currency, p.currency),
             name = coalesce(c.name, p.name), updated_at = now()
        from unnest(${ids}::text[], ${changes.map((c) => c.priceMinor)}::bigint[],
                    ${changes.map((c) => c.currency ?? null)}::text[], ${changes.map((c) => c.name ?? null)}::text[])
          as c(id, price, currency, name)
       where p.id = c.id
    `.execute(trx)
      const candidates = await sql<{ label_code: string }>`
      select label_code from esl.label
       where label_code in (select label_code from esl.label_page where product_id = any(${ids}::text[]))
       order by label_code for update
    `.execute(trx)
      // Read again once locked, in a statement of its own: the one above found its labels in a
      // snapshot from before its wait, so a label job that rebound a label away from these
      // products and committed meanwhile left it in. It got a task (the label as that job
      // had drawn it) and this job's id as its last, though the change was nothing of its.
      const labels = await sql<{ label_code: string }>`
      select distinct label_code from esl.label_page
       where product_id = any(${ids}::text[])
         and label_code = any(${candidates.rows.map((r) => r.label_code)}::text[])
       order by label_code
    `.execute(trx)
      const codes = labels.rows.map((r) => r.label_code)
      await sql`update esl.label set last_job_id = ${jobId}, updated_at = now() where label_code = any(${codes}::text[])`.execute(
        trx,
      )
      await sql`update esl.label_page set job_id = ${jobId} where product_id = any(${ids}::text[])`.execute(
        trx,
      )
      await insertJob(trx, jobId, "price_change", codes.length)
      return { jobId, tasks: await enqueueTasks(trx, jobId, codes) }
    },
  )
}

/**
 * Creates products, or updates those no label shows (catalogue import, tests). A change to a
 * product that labels show is refused, naming it: written here it would leave those labels
 * showing the old price, since only writePriceChange enqueues the tasks that redraw them.
 */
export async function upsertProducts(
  db: Kysely<any>,
  request: readonly { id: string; name: string; priceMinor: number; currency: string }[],
): Promise<void> {
  const products = checked(ProductsRequest, "products", request)
  if (products.length === 0) return
  // The last of a product's entries counts, unlike a price change's or a label job's: a
  // catalogue feed repeats a product when a later row corrects an earlier one. (One
  // statement cannot write a row twice.)
  const sorted = [...new Map(products.map((p) => [p.id, p])).values()].sort((a, b) =>
    a.id < b.id ? -1 : 1,
  )
  const columns = sql`unnest(${sorted.map((p) => p.id)}::text[], ${sorted.map((p) => p.name)}::text[],
                       ${sorted.map((p) => p.priceMinor)}::bigint[], ${sorted.map((p) => p.currency)}::text[])`
  await db.transaction().execute(async (trx) => {
    // Locked first, in id order as writeLabelJob's share locks: a label bound meanwhile is
    // either seen below or binds after this commits, to the new price.
    await sql`select 1 from esl.product where id = any(${sorted.map((p) => p.id)}::text[])
               order by id for update`.execute(trx)
    const shown = await sql<{ id: string; labels: number }>`
      select p.id,
             (select count(distinct l.label_code)::int from esl.label_page l
               where l.product_id = p.id) as labels
        from esl.product p
        join ${columns} as n(id, name, price_minor, currency) on n.id = p.id
       where (p.name, p.price_minor, p.currency) is distinct from (n.name, n.price_minor, n.currency)
         and exists (select 1 from esl.label_page l where l.product_id = p.id)
       order by p.id`.execute(trx)
    if (shown.rows.length > 0) {
      const list = shown.rows.map((r) => `${r.id} (${r.labels} labels)`).join(", ")
      throw new EslWriterError(
        `products shown on labels change only through a price change, which redraws the labels: ${list}; nothing written`,
      )
    }
    await sql`
      insert into esl.product (id, name, price_minor, currency)
      select * from ${columns}
      on conflict (id) do update set name = excluded.name, price_minor = excluded.price_minor,
                                     currency = excluded.currency, updated_at = now()
       where (esl.product.name, esl.product.price_minor, esl.product.currency)
             is distinct from (excluded.name, excluded.price_minor, excluded.currency)
    `.execute(trx)
  })
}
