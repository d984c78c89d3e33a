import assert from "node:assert/strict"
import { randomBytes } from "node:crypto"
import { type AddressInfo, connect, createServer } from "node:net"
import { test } from "node:test"
import pg from "pg"
import { ensureDatabase } from "../src/index.ts"

const server = process.env.KEYWAY_TEST_PG_URL ?? "postgres://postgres@127.0.0.1:5432/postgres"

test("processes creating one database at once: one creates it, the others find it", async () => {
  const name = `keyway_ensure_${randomBytes(4).toString("hex")}`
  const url = new URL(server)
  url.pathname = `/${name}`
  const admin = new pg.Client({ connectionString: server })
  await admin.connect()
  try {
    // Rounds, because which attempt loses, and how, depends on timing.
    for (let round = 0; round < 5; round++) {
      const created = await Promise.all(
        Array.from({ length: 6 }, () => ensureDatabase(url.toString())),
      )
      assert.equal(created.filter(Boolean).length, 1, `round ${round}: ${JSON.stringify(created)}`)
      assert.equal(await ensureDatabase(url.toString()), false, "there now")
      await admin.query(`drop database ${name}`)
    }
  } finally {
    await admin.query(`drop database if exists ${name}`)
    await admin.end()
  }
})

test("a database whose name pg leaves escaped (%23) is created as its clients open it", async () => {
  const name = `keyway_ensure_${randomBytes(4).toString("hex")}`
  const url = new URL(server)
  url.pathname = `/${name}%23x`
  const admin = new pg.Client({ connectionString: server })
  await admin.connect()
  try {
    assert.equal(await ensureDatabase(url.toString()), true)
    // pg decodes the path with decodeURI, which leaves %23 as it is.
    const client = new pg.Client({ connectionString: url.toString() })
    await client.connect()
    const r = await client.query<{ db: string }>("select current_database() as db")
    await client.end()
    assert.equal(r.rows[0]!.db, `${name}%23x`)
  } finally {
    await admin.query(`drop database if exists "${name}%23x"`)
    await admin.query(`drop database if exists "${name}#x"`)
    await admin.end()
  }
})

test("an existing database is found without opening `postgres`, which a role may not open", async () => {
  // A proxy to the server that turns away connections to the `postgres` database, as pg_hba
  // or REVOKE CONNECT do for a role that may open only its own.
  const upstream = new URL(server)
  const proxy = createServer((socket) => {
    socket.once("data", (startup) => {
      // The startup packet: length, protocol, then NUL-separated names and values.
      const fields = startup.subarray(8).toString("utf8").split("\u0000")
      const database = fields[fields.indexOf("database") + 1]
      if (database === "postgres") return socket.destroy()
      const to = connect(Number(upstream.port || 5432), upstream.hostname, () => {
        to.write(startup)
        socket.pipe(to).pipe(socket)
      })
      to.on("error", () => socket.destroy())
      socket.on("error", () => to.destroy())
    })
  })
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r))
  const name = `keyway_ensure_${randomBytes(4).toString("hex")}`
  const admin = new pg.Client({ connectionString: server })
  await admin.connect()
  try {
    await admin.query(`create database ${name}`)
    const url = new URL(server)
    url.host = `127.0.0.1:${(proxy.address() as AddressInfo).port}`
    url.pathname = `/${name}`
    assert.equal(await ensureDatabase(url.toString()), false)
  } finally {
    proxy.close()
    await admin.query(`drop database if exists ${name} with (force)`)
    await admin.end()
  }
})
