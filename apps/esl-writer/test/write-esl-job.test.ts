// The writer's promise: one task per affected label in the transaction that changes the
// domain rows, and, with jobs overlapping, each label's newest task describes what the
// tables say now (the locking discipline in write-esl-job.ts).
import assert from "node:assert/strict"
import { after, before, test } from "node:test"
import { createTestDatabase, type TestDatabase, waitFor } from "@keyway/testkit"
import { sql } from "kysely"
import {
  EslWriterError,
  migrateEslSchema,
  StoredProductError,
  upsertProducts,
  writeLabelJob,
  writePriceChange,
} from "../src/index.ts"

let t: TestDatabase
before(async () => {
  t = await createTestDatabase({ poolSize: 12 })
  await migrateEslSchema(t.db)
  await migrateEslSchema(t.db) // idempotent: every writer process runs it at start
})
after(() => t.drop())

const label = (i: number) => `C0FFEE${String(i).padStart(6, "0")}`

test("a writer starting while long transactions read and write the labels takes no lock that would queue the others", {
  // A start that waited for them would wait out its lock_timeout and fail: they end after it.
  timeout: 30_000,
}, async () => {
  await upsertProducts(t.db, [{ id: "L", name: "Lentils 1 kg", priceMinor: 299, currency: "EUR" }])
  await writeLabelJob(t.db, { jobId: "locks", labels: [{ labelCode: label(90), productId: "L" }] })
  await t.db.transaction().execute(async (reader) => {
    await sql`select count(*) from esl.label`.execute(reader)
    await t.db.transaction().execute(async (writer) => {
      // A writer's row lock and RowExclusiveLock: what an exclusive lock, or the share lock
      // of a create index, would wait for.
      await sql`update esl.label set updated_at = now() where label_code = ${label(90)}`.execute(
        writer,
      )
      await migrateEslSchema(t.db)
    })
  })
})

test("a price change enqueues one task per label showing the products, with the new price", async () => {
  await upsertProducts(t.db, [
    { id: "A", name: "Apples 1 kg", priceMinor: 199, currency: "EUR" },
    { id: "B", name: "Bananas 1 kg", priceMinor: 149, currency: "EUR" },
  ])
  await writeLabelJob(t.db, {
    jobId: "bind",
    labels: [
      { labelCode: "c0:ff:ee:00:00:01", productId: "A" },
      { labelCode: label(2), productId: "A" },
      { labelCode: label(3), productId: "B" },
    ],
  })
  const change = await writePriceChange(t.db, {
    jobId: "pc1",
    changes: [{ productId: "A", priceMinor: 219 }],
  })
  assert.deepEqual(
    change.tasks.map((task) => [task.key, task.ver, task.topic]),
    [
      [label(1), 2, "esl.label"],
      [label(2), 2, "esl.label"],
    ],
  )
  const rows = await sql<{ key: string; payload: any }>`
    select key, payload from keyway.outbox where payload->>'jobId' = 'pc1' order by key`.execute(
    t.db,
  )
  assert.deepEqual(
    rows.rows.map((r) => [r.key, r.payload.pages[0].priceMinor, r.payload.pages[0].productName]),
    [
      [label(1), 219, "Apples 1 kg"],
      [label(2), 219, "Apples 1 kg"],
    ],
  )
  await assert.rejects(
    writePriceChange(t.db, { changes: [{ productId: "nope", priceMinor: 1 }] }),
    EslWriterError,
  )
})

test("a price change waiting on a label that a label job rebinds away leaves that label alone", async () => {
  await upsertProducts(t.db, [
    { id: "RA", name: "Rye bread", priceMinor: 250, currency: "EUR" },
    { id: "RB", name: "Rice 1 kg", priceMinor: 180, currency: "EUR" },
  ])
  await writeLabelJob(t.db, {
    jobId: "rebind-before",
    labels: [
      { labelCode: label(901), productId: "RA" },
      { labelCode: label(902), productId: "RA" },
    ],
  })
  // A label job's transaction, held open with label 901 rebound to RB (its rows locked, as
  // writeLabelJob locks them), while the price change of RA starts and waits on that label.
  const job = await t.db.connection().execute(async (conn) => {
    await sql`begin`.execute(conn)
    await sql`select 1 from esl.label where label_code = ${label(901)} for update`.execute(conn)
    await sql`update esl.label_page set product_id = 'RB' where label_code = ${label(901)}`.execute(
      conn,
    )
    const change = writePriceChange(t.db, {
      jobId: "rebind-pc",
      changes: [{ productId: "RA", priceMinor: 260 }],
    })
    // Until the price change waits on the label row: committed before that, the price
    // change would find the label rebound and the test would pass on the code it guards.
    await waitFor(
      async () =>
        (
          await sql<{ n: number }>`
            select count(*)::int as n from pg_stat_activity
             where wait_event_type = 'Lock' and datname = current_database()`.execute(t.db)
        ).rows[0]!.n > 0,
      { timeoutMs: 10_000, message: "the price change waiting on the label" },
    )
    await sql`commit`.execute(conn)
    return change
  })
  // Found in the snapshot from before its wait, label 901 got a task and the price change's
  // job id, though it no longer showed RA.
  assert.deepEqual(
    job.tasks.map((task) => task.key),
    [label(902)],
  )
  const last = await sql<{ label_code: string; last_job_id: string }>`
    select label_code, last_job_id from esl.label
     where label_code in (${label(901)}, ${label(902)}) order by label_code`.execute(t.db)
  assert.deepEqual(
    last.rows.map((r) => [r.label_code, r.last_job_id]),
    [
      [label(901), "rebind-before"],
      [label(902), "rebind-pc"],
    ],
  )
})

test("each task names the page the label shows then: its own at the front, else the last one brought there", async () => {
  await upsertProducts(t.db, [{ id: "S", name: "Salt 500 g", priceMinor: 89, currency: "EUR" }])
  const shown = async (jobId: string) => {
    const r = await sql<{ key: string; payload: any }>`
      select key, payload from keyway.outbox where payload->>'jobId' = ${jobId} order by key`.execute(
      t.db,
    )
    return r.rows.map((row) => [
      row.key,
      row.payload.pages.map((p: { page: number }) => p.page),
      row.payload.shownPage,
    ])
  }
  // Label 20 was never brought to a page: its first page is what it shows.
  await writeLabelJob(t.db, {
    jobId: "sp1",
    labels: [
      { labelCode: label(20), productId: "S", page: 2, frontPage: false },
      { labelCode: label(21), productId: "S", page: 3 },
    ],
  })
  assert.deepEqual(await shown("sp1"), [
    [label(20), [2], 1],
    [label(21), [3], 3],
  ])
  // Label 21 binds page 5 in the background: it keeps showing page 3, which keeps its product.
  await writeLabelJob(t.db, {
    jobId: "sp2",
    labels: [{ labelCode: label(21), productId: "S", page: 5, frontPage: false }],
  })
  await writePriceChange(t.db, { jobId: "sp3", changes: [{ productId: "S", priceMinor: 95 }] })
  assert.deepEqual(await shown("sp2"), [[label(21), [3, 5], 3]])
  assert.deepEqual(await shown("sp3"), [
    [label(20), [2], 1],
    [label(21), [3, 5], 3],
  ])
  // A label stored before shown_page existed: its page at the front, the column empty. With
  // another page bound in the background, it still shows that one.
  await writeLabelJob(t.db, {
    jobId: "sp4",
    labels: [{ labelCode: label(22), productId: "S", page: 6 }],
  })
  await sql`update esl.label set shown_page = null where label_code = ${label(22)}`.execute(t.db)
  await writeLabelJob(t.db, {
    jobId: "sp5",
    labels: [{ labelCode: label(22), productId: "S", page: 7, frontPage: false }],
  })
  assert.deepEqual(await shown("sp5"), [[label(22), [6, 7], 6]])
})

test("a label's pages each keep their product: a change of any one sends the whole label", async () => {
  await upsertProducts(t.db, [
    { id: "MILK", name: "Milk 1 l", priceMinor: 119, currency: "EUR" },
    { id: "OATS", name: "Oats 500 g", priceMinor: 159, currency: "EUR" },
  ])
  const pagesOf = async (jobId: string) => {
    const r = await sql<{ payload: any }>`
      select payload from keyway.outbox where key = ${label(30)} and payload->>'jobId' = ${jobId}`.execute(
      t.db,
    )
    assert.equal(r.rows.length, 1, `one task of ${jobId} for the label`)
    const { shownPage, pages } = r.rows[0]!.payload
    return {
      shownPage,
      pages: pages.map((p: any) => [p.page, p.productId, p.priceMinor, p.jobId]),
    }
  }
  await writeLabelJob(t.db, {
    jobId: "pg1",
    labels: [{ labelCode: label(30), productId: "MILK", page: 2 }],
  })
  // Page 4 bound in the background: page 2 keeps its product, and stays in view.
  await writeLabelJob(t.db, {
    jobId: "pg2",
    labels: [{ labelCode: label(30), productId: "OATS", page: 4, frontPage: false }],
  })
  assert.deepEqual(await pagesOf("pg2"), {
    shownPage: 2,
    pages: [
      [2, "MILK", 119, "pg1"],
      [4, "OATS", 159, "pg2"],
    ],
  })
  // A price change of the page in view reaches it; each page names the job that set it.
  await writePriceChange(t.db, { jobId: "pg3", changes: [{ productId: "MILK", priceMinor: 125 }] })
  assert.deepEqual(await pagesOf("pg3"), {
    shownPage: 2,
    pages: [
      [2, "MILK", 125, "pg3"],
      [4, "OATS", 159, "pg2"],
    ],
  })
  // Two pages in one job, one brought to the front.
  await writeLabelJob(t.db, {
    jobId: "pg4",
    labels: [
      { labelCode: label(30), productId: "OATS", page: 1, frontPage: false },
      { labelCode: label(30), productId: "MILK", page: 4 },
    ],
  })
  assert.deepEqual(await pagesOf("pg4"), {
    shownPage: 4,
    pages: [
      [1, "OATS", 159, "pg4"],
      [2, "MILK", 125, "pg3"],
      [4, "MILK", 125, "pg4"],
    ],
  })
  // A catalogue import may not change OATS: a label's background page shows it.
  await assert.rejects(
    upsertProducts(t.db, [{ id: "OATS", name: "Oats 500 g", priceMinor: 1, currency: "EUR" }]),
    /OATS \(1 labels\)/,
  )
  // Two pages of a label to the front at once (frontPage defaults to true): refused.
  await assert.rejects(
    writeLabelJob(t.db, {
      jobId: "pg5",
      labels: [
        { labelCode: label(30), productId: "OATS", page: 1 },
        { labelCode: label(30), productId: "MILK", page: 3 },
      ],
    }),
    /label C0FFEE000030 is to show page 1 and page 3 .*: give frontPage false to all its pages but one/,
  )
  assert.equal((await sql`select 1 from esl.job where id = 'pg5'`.execute(t.db)).rows.length, 0)
})

test("labels stored before pages had their own table keep their page and product", async () => {
  const old = await createTestDatabase()
  try {
    await migrateEslSchema(old.db)
    await upsertProducts(old.db, [{ id: "E", name: "Eggs x6", priceMinor: 239, currency: "EUR" }])
    // As a writer before esl.label_page left them.
    await sql`drop trigger label_page_from_label on esl.label; drop table esl.label_page`.execute(
      old.db,
    )
    await sql`insert into esl.label (label_code, product_id, page, front_page, shown_page, last_job_id)
              values (${label(40)}, 'E', 3, false, 1, 'old-job'), (${label(41)}, 'E', 5, true, null, null)`.execute(
      old.db,
    )
    await migrateEslSchema(old.db)
    const pages =
      await sql`select label_code, page, product_id, job_id from esl.label_page order by label_code`.execute(
        old.db,
      )
    assert.deepEqual(pages.rows, [
      { label_code: label(40), page: 3, product_id: "E", job_id: "old-job" },
      { label_code: label(41), page: 5, product_id: "E", job_id: "before-pages" },
    ])
    const job = await writePriceChange(old.db, {
      jobId: "after",
      changes: [{ productId: "E", priceMinor: 249 }],
    })
    assert.deepEqual(
      job.tasks.map((task) => task.key),
      [label(40), label(41)],
    )
    const shown = await sql<{ key: string; shown: number }>`
      select key, (payload->>'shownPage')::int as shown from keyway.outbox order by key`.execute(
      old.db,
    )
    assert.deepEqual(
      shown.rows.map((r) => [r.key, r.shown]),
      [
        [label(40), 1],
        [label(41), 5],
      ],
    )
  } finally {
    await old.drop()
  }
})

test("a binding an older writer writes to esl.label alone is a page's binding: later tasks draw it", async () => {
  await upsertProducts(t.db, [
    { id: "KALE", name: "Kale 250 g", priceMinor: 189, currency: "EUR" },
    { id: "LEEK", name: "Leeks", priceMinor: 149, currency: "EUR" },
  ])
  await writeLabelJob(t.db, {
    jobId: "new-1",
    labels: [{ labelCode: label(50), productId: "KALE", page: 2 }],
  })
  // An older writer, running beside this one during an upgrade: one binding per label.
  await sql`update esl.label set product_id = 'LEEK', page = 2, last_job_id = 'old-1'
             where label_code = ${label(50)}`.execute(t.db)
  await sql`insert into esl.label (label_code, product_id, page, front_page, shown_page, last_job_id)
            values (${label(51)}, 'LEEK', 1, true, 1, 'old-2')`.execute(t.db)
  const job = await writePriceChange(t.db, {
    jobId: "leek-up",
    changes: [{ productId: "LEEK", priceMinor: 159 }],
  })
  assert.deepEqual(
    job.tasks.map((task) => task.key),
    [label(50), label(51)],
  )
  const pages = await sql<{ key: string; pages: any[] }>`
    select key, payload->'pages' as pages from keyway.outbox
     where payload->>'jobId' = 'leek-up' order by key`.execute(t.db)
  assert.deepEqual(
    pages.rows.map((r) => [r.key, r.pages.map((p) => [p.page, p.productId, p.priceMinor])]),
    [
      [label(50), [[2, "LEEK", 159]]],
      [label(51), [[1, "LEEK", 159]]],
    ],
  )
})

test("a catalogue import is checked like a price change; a bad product writes nothing", async () => {
  const bad = [
    [{ id: "C", name: "", priceMinor: 100, currency: "EUR" }, /\["name"\]/],
    [{ id: "C", name: "Cherries", priceMinor: 100, currency: "eur" }, /\["currency"\]/],
    [{ id: "C", name: "Cherries", priceMinor: 100, currency: "ABC" }, /"ABC" is not an ISO 4217/],
    [{ id: "C\u0000", name: "Cherries", priceMinor: 100, currency: "EUR" }, /\["id"\]/],
    [{ id: "C", name: "Cherries", priceMinor: -1, currency: "EUR" }, /\["priceMinor"\]/],
  ] as const
  for (const [product, field] of bad) {
    await assert.rejects(
      upsertProducts(t.db, [{ id: "D", name: "Dates", priceMinor: 300, currency: "EUR" }, product]),
      (err: Error) => err instanceof EslWriterError && field.test(err.message),
      JSON.stringify(product),
    )
  }
  const stored = await sql`select id from esl.product where id in ('C', 'D')`.execute(t.db)
  assert.deepEqual(stored.rows, [])
})

test("a bad request is told every problem; a huge one its first, at once", async () => {
  await assert.rejects(
    writeLabelJob(t.db, {
      labels: [{ labelCode: 1 } as never, { labelCode: label(1), productId: "" }],
    }),
    (err: Error) =>
      err instanceof EslWriterError &&
      /\["labels"\]\[0\]\["labelCode"\]/.test(err.message) &&
      /\["labels"\]\[1\]\["productId"\]/.test(err.message),
  )
  // Every problem of 100,000 bad labels made a message of some 10 MB, for the HTTP answer.
  const huge = { labels: Array.from({ length: 100_000 }, () => ({ labelCode: 1 })) }
  await assert.rejects(
    writeLabelJob(t.db, huge as never),
    (err: Error) =>
      err instanceof EslWriterError &&
      err.message.length < 1000 &&
      /first problem found/.test(err.message) &&
      /\["labels"\]\[0\]/.test(err.message),
  )
})

test("a price change or label job giving an entry twice, differently, is refused naming both; a plain repeat is one entry", async () => {
  await upsertProducts(t.db, [{ id: "TW", name: "Tea", priceMinor: 250, currency: "EUR" }])
  const taskCount = async () =>
    Number(
      (await sql<{ n: string }>`select count(*) as n from keyway.outbox`.execute(t.db)).rows[0]!.n,
    )
  const before = await taskCount()
  await assert.rejects(
    writePriceChange(t.db, {
      changes: [
        { productId: "TW", priceMinor: 260 },
        { productId: "TW", priceMinor: 270 },
      ],
    }),
    (err: Error) =>
      err instanceof EslWriterError &&
      /changes\[0\] and changes\[1\] both give productId "TW", differently/.test(err.message),
  )
  // The same label, once bare and once in pairs: one label, given two products.
  await assert.rejects(
    writeLabelJob(t.db, {
      labels: [
        { labelCode: label(900), productId: "TW" },
        { labelCode: "c0:ff:ee:00:09:00", productId: "D" },
      ],
    }),
    /labels\[0\] and labels\[1\] both give label C0FFEE000900 page 1, differently/,
  )
  assert.equal(await taskCount(), before, "nothing enqueued")
  assert.equal(
    (await sql`select 1 from esl.label where label_code = ${label(900)}`.execute(t.db)).rows.length,
    0,
  )
  // Page 1 at the front is what an entry without them means: the same entry, drawn once.
  const job = await writeLabelJob(t.db, {
    labels: [
      { labelCode: label(901), productId: "TW" },
      { labelCode: label(901), productId: "TW", page: 1, frontPage: true },
    ],
  })
  assert.equal(job.tasks.length, 1)
})

test("a product stored with a value no label can show is named, and a price change mends it", async () => {
  // As an older release stored it, before prices were bounded.
  await upsertProducts(t.db, [{ id: "NEW", name: "New stock", priceMinor: 100, currency: "EUR" }])
  await sql`insert into esl.product (id, name, price_minor, currency)
            values ('OLD', 'Old stock', 5000000000, 'EUR')`.execute(t.db)
  const refused = (err: Error) =>
    err instanceof StoredProductError &&
    /product OLD as stored cannot be shown on a label/.test(err.message) &&
    /priceMinor/.test(err.message) &&
    /price change of OLD/.test(err.message)
  await assert.rejects(
    writeLabelJob(t.db, {
      labels: [
        { labelCode: label(60), productId: "NEW" },
        { labelCode: label(61), productId: "OLD" },
      ],
    }),
    refused,
  )
  const bound = await sql`select 1 from esl.label where label_code = ${label(61)}`.execute(t.db)
  assert.equal(bound.rows.length, 0, "nothing of the refused job written")
  // A currency stored before codes were checked: the writer's own check, not the schema's.
  await sql`insert into esl.product (id, name, price_minor, currency)
            values ('ODD', 'Odd stock', 100, 'ABC')`.execute(t.db)
  await assert.rejects(
    writeLabelJob(t.db, { labels: [{ labelCode: label(62), productId: "ODD" }] }),
    (err: Error) =>
      err instanceof StoredProductError &&
      /product ODD as stored cannot be shown on a label \(currency "ABC" is not an ISO 4217 code\)/.test(
        err.message,
      ),
  )
  await writePriceChange(t.db, {
    changes: [{ productId: "OLD", priceMinor: 100, currency: "EUR" }],
  })
  const job = await writeLabelJob(t.db, { labels: [{ labelCode: label(61), productId: "OLD" }] })
  assert.deepEqual(
    job.tasks.map((task) => task.key),
    [label(61)],
  )
})

test("a catalogue import may not change a product labels show: refused by name, nothing written", async () => {
  await upsertProducts(t.db, [{ id: "E", name: "Eggs 10", priceMinor: 299, currency: "EUR" }])
  await writeLabelJob(t.db, { labels: [{ labelCode: label(50), productId: "E" }] })
  const tasks = async () =>
    (await sql`select seq from keyway.outbox where key = ${label(50)}`.execute(t.db)).rows.length
  const before = await tasks()
  await assert.rejects(
    upsertProducts(t.db, [
      { id: "F", name: "Flour 1 kg", priceMinor: 99, currency: "EUR" },
      { id: "E", name: "Eggs 10", priceMinor: 349, currency: "EUR" },
    ]),
    (err: Error) => err instanceof EslWriterError && /E \(1 labels\)/.test(err.message),
  )
  const stored = await sql<{ id: string; price_minor: number }>`
    select id, price_minor::int from esl.product where id in ('E', 'F') order by id`.execute(t.db)
  assert.deepEqual(stored.rows, [{ id: "E", price_minor: 299 }])
  // The same values again change nothing and pass; a price change redraws the label.
  await upsertProducts(t.db, [
    { id: "E", name: "Eggs 10", priceMinor: 299, currency: "EUR" },
    { id: "F", name: "Flour 1 kg", priceMinor: 99, currency: "EUR" },
    { id: "F", name: "Flour 1 kg", priceMinor: 109, currency: "EUR" },
  ])
  await writePriceChange(t.db, { changes: [{ productId: "E", priceMinor: 349 }] })
  assert.equal(await tasks(), before + 1)
  const f = await sql<{
    price_minor: number
  }>`select price_minor::int from esl.product where id = 'F'`.execute(t.db)
  assert.deepEqual(f.rows, [{ price_minor: 109 }])
})

test("overlapping jobs and price changes: every label's newest task matches the tables", async () => {
  const products = Array.from({ length: 4 }, (_, i) => `Q${i}`)
  await upsertProducts(
    t.db,
    products.map((id) => ({ id, name: `Product ${id}`, priceMinor: 100, currency: "EUR" })),
  )
  const labels = Array.from({ length: 8 }, (_, i) => label(100 + i))
  await writeLabelJob(t.db, {
    labels: labels.map((labelCode, i) => ({ labelCode, productId: products[i % 4]! })),
  })
  const rand = (n: number) => Math.floor(Math.random() * n)
  // Ten writers racing on 8 labels and 4 products: rebinding labels while prices change.
  await Promise.all(
    Array.from({ length: 10 }, async (_, w) => {
      for (let j = 0; j < 15; j++) {
        if ((w + j) % 2 === 0) {
          await writePriceChange(t.db, {
            changes: [{ productId: products[rand(4)]!, priceMinor: rand(100_000) }],
          })
        } else {
          await writeLabelJob(t.db, {
            // Three labels of the eight, each once, on one of three pages (in the background
            // but for page 1): a label comes to show up to three products.
            labels: [...new Set(Array.from({ length: 3 }, () => labels[rand(8)]!))].map(
              (labelCode) => {
                const page = 1 + rand(3)
                return { labelCode, productId: products[rand(4)]!, page, frontPage: page === 1 }
              },
            ),
          })
        }
      }
    }),
  )
  const newest = await sql<{ key: string; payload: any }>`
    select distinct on (key) key, payload from keyway.outbox
     where key = any(${labels}::text[]) order by key, ver desc`.execute(t.db)
  const truth = await sql<{ label_code: string; last_job_id: string; pages: unknown[] }>`
    select l.label_code, l.last_job_id,
           json_agg(json_build_array(lp.page, lp.product_id, p.price_minor::int, lp.job_id)
                    order by lp.page) as pages
      from esl.label l join esl.label_page lp using (label_code) join esl.product p on p.id = lp.product_id
     where l.label_code = any(${labels}::text[])
     group by l.label_code, l.last_job_id`.execute(t.db)
  const byLabel = new Map(truth.rows.map((r) => [r.label_code, r]))
  let pagesSeen = 0
  for (const { key, payload } of newest.rows) {
    const now = byLabel.get(key)!
    pagesSeen += payload.pages.length
    assert.deepEqual(
      [payload.jobId, payload.pages.map((p: any) => [p.page, p.productId, p.priceMinor, p.jobId])],
      [now.last_job_id, now.pages],
      `${key}: the newest task shows what the tables say, every page`,
    )
  }
  assert.ok(pagesSeen > labels.length, `labels came to show several pages (${pagesSeen})`)
  // Versions are gapless per label and every task is recorded against its job.
  const gaps = await sql<{ n: number }>`
    select count(*)::int as n from (
      select key, max(ver) - count(*) as missing from keyway.outbox group by key) g
     where missing <> 0`.execute(t.db)
  assert.equal(gaps.rows[0]!.n, 0)
  const unrecorded = await sql<{ n: number }>`
    select count(*)::int as n from keyway.outbox o
     where not exists (select 1 from esl.job_label j where j.label_code = o.key and j.ver = o.ver)`.execute(
    t.db,
  )
  assert.equal(unrecorded.rows[0]!.n, 0)
})
