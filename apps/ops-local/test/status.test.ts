import assert from "node:assert/strict"
import { test } from "node:test"
import { createTestDatabase } from "@keyway/testkit"
import { sql } from "kysely"
import { SITES } from "../src/site-plan.ts"
import { collectStatus, outOfOrderSql, printStatus } from "../src/status.ts"

test("status shows the group's dead tasks and rejects with the commands that list them, and no password", async () => {
  // The site's database and NATS need not be up: what cannot be read says so.
  const status = await collectStatus(
    SITES.cloud,
    "postgres://postgres:s3cret@127.0.0.1:5432/postgres",
    [],
  )
  assert.ok(!JSON.stringify(status).includes("s3cret"), "the password stays out of status")
  assert.equal(status.databaseUrl, `postgres://postgres@127.0.0.1:5432/${SITES.cloud.database}`)

  const lines: string[] = []
  printStatus(
    {
      ...status,
      group: {
        deadTasks: 2,
        blockedKeys: 1,
        gapKeys: 3,
        oldestGapSeconds: 150,
        pendingKeys: 5,
        oldestPendingSeconds: 42,
        rejects: 4,
      },
    },
    (line) => lines.push(line),
  )
  assert.ok(
    lines.includes(
      `  group       cloud-demo: 5 keys with a task waiting to run (the oldest for 42s), 2 dead tasks, 1 keys blocked, 3 keys at a gap (waiting 2m at most), 4 messages rejected in the last day; list them: DATABASE_URL=${status.databaseUrl} npx just admin dead --group cloud-demo, DATABASE_URL=${status.databaseUrl} npx just admin rejects --group cloud-demo`,
    ),
    lines.join("\n"),
  )
  const healthy: string[] = []
  printStatus(
    {
      ...status,
      group: {
        deadTasks: 0,
        blockedKeys: 0,
        gapKeys: 0,
        oldestGapSeconds: 0,
        pendingKeys: 0,
        oldestPendingSeconds: 0,
        rejects: 0,
      },
    },
    (line) => healthy.push(line),
  )
  assert.ok(
    healthy.includes(
      "  group       cloud-demo: nothing waiting to run, 0 dead tasks, 0 keys blocked, 0 keys at a gap, 0 messages rejected in the last day",
    ),
  )
})

test("out of order counts versions that go down or repeat, not versions skipped", async () => {
  await using t = await createTestDatabase({ prefix: "keyway_status" })
  await sql`create table demo_effect (id bigint generated always as identity primary key,
              topic text not null, key text not null, ver bigint not null)`.execute(t.db)
  const handled = (key: string, vers: number[]) =>
    sql`insert into demo_effect (topic, key, ver)
        select 'demo.item', ${key}, v from unnest(${vers}::bigint[]) with ordinality as u(v, i)
        order by i`.execute(t.db)
  await handled("in-order", [1, 2, 3])
  await handled("skipped", [1, 2, 4, 5]) // v3 skipped by an operator: no row, no disorder
  await handled("swapped", [1, 3, 2]) // 2 after 3
  await handled("twice", [1, 2, 2]) // 2 handled twice
  const count = async () =>
    (await sql<{ n: number }>`select ${outOfOrderSql} as n`.execute(t.db)).rows[0]!.n
  assert.equal(await count(), 2)
})

test("status names a process the site should have and pm2 does not list", async () => {
  const status = await collectStatus(SITES.cloud, "postgres://postgres@127.0.0.1:5432/postgres", [])
  const proc = (name: string, state: "online" | "errored") => ({
    name,
    status: state,
    pid: state === "online" ? 100 : 0,
    restarts: 0,
    uptimeMs: 180_000,
    memoryBytes: 0,
    cpu: 0,
    digest: "",
    env: {},
  })
  const lines: string[] = []
  printStatus(
    {
      ...status,
      // The relay deleted from pm2 by hand; the worker given up on.
      processes: [
        proc("cloud-nats", "online"),
        proc("cloud-redis", "online"),
        proc("cloud-worker", "errored"),
        proc("cloud-demo", "online"),
      ],
    },
    (line) => lines.push(line),
  )
  assert.ok(
    lines.includes("  cloud-relay      missing  (npx just up cloud starts it)"),
    lines.join("\n"),
  )
  const worker = lines.find((l) => l.startsWith("  cloud-worker"))!
  assert.match(worker, /errored/)
  assert.doesNotMatch(worker, /up 3m/, "no uptime for a process that is not running")
  assert.match(lines.find((l) => l.startsWith("  cloud-nats"))!, /up 3m/)
})
