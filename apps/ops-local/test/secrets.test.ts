// The secrets files of `just secrets` and `just up`: one per site, each with its own users'
// passwords and the leaf link's, so that the file a factory host is given opens nothing of the
// cloud's but the link.
import assert from "node:assert/strict"
import { mkdir, mkdtemp, readFile, rm, stat, unlink, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { after, before, test } from "node:test"
import {
  ensureSecrets,
  legacySecretsFile,
  readSiteSecrets,
  siteSecretsFile,
} from "../src/secrets.ts"
import { LEAF_USER, NATS_USERS, passwordVariable, SITES, siteUsers } from "../src/site-plan.ts"

let dir: string
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "keyway-secrets-"))
})
after(async () => {
  await rm(dir, { recursive: true, force: true })
})

const variablesOf = async (runDir: string, site: "cloud" | "factory") =>
  Object.keys((await readSiteSecrets(runDir, site)) ?? {}).sort()

test("each site's file holds its own users' passwords and the leaf link's, and no other", async () => {
  const runDir = join(dir, "fresh")
  const passwords = await ensureSecrets(runDir)
  assert.deepEqual(Object.keys(passwords).sort(), [...NATS_USERS].sort())
  for (const site of ["cloud", "factory"] as const) {
    const users = siteUsers(SITES[site])
    assert.deepEqual(await variablesOf(runDir, site), users.map(passwordVariable).sort())
    const vars = (await readSiteSecrets(runDir, site))!
    for (const user of users) assert.equal(vars[passwordVariable(user)], passwords[user])
    assert.equal((await stat(siteSecretsFile(runDir, site))).mode & 0o777, 0o600)
  }
  // The two admins are two users with two passwords.
  assert.notEqual(passwords["cloud-admin"], passwords["factory-admin"])
  assert.ok(!(await variablesOf(runDir, "factory")).includes(passwordVariable("cloud-admin")))
})

test("a second run keeps every password; a site's file deleted is made again with the link's", async () => {
  const runDir = join(dir, "again")
  const first = await ensureSecrets(runDir)
  assert.deepEqual(await ensureSecrets(runDir), first)
  await unlink(siteSecretsFile(runDir, "factory"))
  const second = await ensureSecrets(runDir)
  // The cloud's hold; the factory's own are new; the link's is the one the cloud checks.
  assert.equal(second["cloud-admin"], first["cloud-admin"])
  assert.notEqual(second["factory-admin"], first["factory-admin"])
  assert.equal(second[LEAF_USER], first[LEAF_USER])
  assert.equal(
    (await readSiteSecrets(runDir, "factory"))![passwordVariable(LEAF_USER)],
    first[LEAF_USER],
  )
})

test("what an operator added to a file stays; a password a server would misread is refused", async () => {
  const runDir = join(dir, "edited")
  await ensureSecrets(runDir)
  const cloud = siteSecretsFile(runDir, "cloud")
  const admin = passwordVariable("cloud-admin")
  const text = await readFile(cloud, "utf8")
  // An operator's own line, and a user of this site deleted: the next run adds the user back.
  await writeFile(
    cloud,
    `${text.replace(new RegExp(`^${admin}=.*\\n`, "m"), "")}KEYWAY_PG_PASSWORD=pg0secret\n`,
  )
  await ensureSecrets(runDir)
  const vars = (await readSiteSecrets(runDir, "cloud"))!
  assert.equal(vars.KEYWAY_PG_PASSWORD, "pg0secret")
  assert.match(vars[admin]!, /^k[0-9a-f]{32}$/)
  await writeFile(
    cloud,
    `${await readFile(cloud, "utf8")}`.replace(/^(KEYWAY_PASS_CLOUD_RELAY)=.*$/m, "$1=1e5"),
  )
  await assert.rejects(ensureSecrets(runDir), /KEYWAY_PASS_CLOUD_RELAY must be a letter/)
})

test("two different passwords of the leaf link are refused, naming both files", async () => {
  const runDir = join(dir, "leaf")
  await ensureSecrets(runDir)
  const factory = siteSecretsFile(runDir, "factory")
  const leaf = passwordVariable(LEAF_USER)
  await writeFile(
    factory,
    (await readFile(factory, "utf8")).replace(
      new RegExp(`^${leaf}=.*$`, "m"),
      `${leaf}=kother0password00`,
    ),
  )
  await assert.rejects(
    ensureSecrets(runDir),
    (err: Error) =>
      err.message.includes(siteSecretsFile(runDir, "cloud")) &&
      err.message.includes(factory) &&
      err.message.includes(leaf),
  )
})

test("the passwords of the one file both sites shared before are carried over, so a host updated alone still matches", async () => {
  const runDir = join(dir, "legacy")
  await mkdir(runDir)
  const old = {
    KEYWAY_PASS_CLOUD_RELAY: "kold0cloud0relay00",
    KEYWAY_PASS_FACTORY_WORKER: "kold0factory0worker",
    KEYWAY_PASS_LEAF_FACTORY: "kold0leaf0factory00",
    KEYWAY_PASS_ADMIN: "kold0admin0both0000",
  }
  await writeFile(
    legacySecretsFile(runDir),
    Object.entries(old)
      .map(([k, v]) => `${k}=${v}`)
      .join("\n"),
  )
  const passwords = await ensureSecrets(runDir)
  assert.equal(passwords["cloud-relay"], old.KEYWAY_PASS_CLOUD_RELAY)
  assert.equal(passwords["factory-worker"], old.KEYWAY_PASS_FACTORY_WORKER)
  for (const site of ["cloud", "factory"] as const) {
    const vars = (await readSiteSecrets(runDir, site))!
    assert.equal(vars.KEYWAY_PASS_LEAF_FACTORY, old.KEYWAY_PASS_LEAF_FACTORY, site)
  }
  // The one admin becomes two users, each with a password of its own.
  assert.notEqual(passwords["cloud-admin"], old.KEYWAY_PASS_ADMIN)
  assert.notEqual(passwords["cloud-admin"], passwords["factory-admin"])
})

test("a line that is not NAME=value is refused by its file and number, never read as a password missing", async () => {
  const runDir = join(dir, "export")
  const first = await ensureSecrets(runDir)
  const cloud = siteSecretsFile(runDir, "cloud")
  const relay = passwordVariable("cloud-relay")
  // Made sourceable by hand: the password is still the one the site's servers hold.
  const edited = (await readFile(cloud, "utf8")).replace(
    new RegExp(`^${relay}=`, "m"),
    `export ${relay}=`,
  )
  await writeFile(cloud, edited)
  const line = edited.split("\n").findIndex((l) => l.startsWith("export ")) + 1
  for (const attempt of [ensureSecrets(runDir), readSiteSecrets(runDir, "cloud")]) {
    await assert.rejects(attempt, (err: Error) => {
      assert.ok(err.message.startsWith(`${cloud}:${line}: not NAME=value`), err.message)
      assert.ok(!err.message.includes(first["cloud-relay"]!), "the password is not shown")
      return true
    })
  }
  assert.equal(await readFile(cloud, "utf8"), edited, "the file left as it was")
})

test("a user added back keeps the file's comments and lines as they were; an empty NAME= is filled in place", async () => {
  const runDir = join(dir, "comments")
  await ensureSecrets(runDir)
  const cloud = siteSecretsFile(runDir, "cloud")
  const admin = passwordVariable("cloud-admin")
  const worker = passwordVariable("cloud-worker")
  const kept = (await readFile(cloud, "utf8"))
    .replace(new RegExp(`^${admin}=.*\\n`, "m"), "")
    .replace(new RegExp(`^${worker}=.*$`, "m"), `# rotated on the 3rd\n${worker}=`)
  await writeFile(cloud, `${kept}# the operator's own\nKEYWAY_PG_PASSWORD=pg0secret\n`)
  const passwords = await ensureSecrets(runDir)
  const after = await readFile(cloud, "utf8")
  assert.equal(
    after,
    `${kept.replace(new RegExp(`^${worker}=$`, "m"), `${worker}=${passwords["cloud-worker"]}`)}# the operator's own\nKEYWAY_PG_PASSWORD=pg0secret\n${admin}=${passwords["cloud-admin"]}\n`,
  )
  assert.match(passwords["cloud-worker"]!, /^k[0-9a-f]{32}$/)
})
