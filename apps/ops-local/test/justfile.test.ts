// The justfile's recipes for the local sites, run by `just` itself with a stand-in for npx, so
// what a recipe hands on is seen without touching the checkout's pm2.
import assert from "node:assert/strict"
import { spawnSync } from "node:child_process"
import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { test } from "node:test"
import { repositoryRoot } from "../src/site-plan.ts"

const root = repositoryRoot()

test("`just pm2` hands pm2 none of the shared servers' URLs the justfile exports, nor a shell's settings", async () => {
  const bin = await mkdtemp(join(tmpdir(), "keyway-justfile-"))
  try {
    const npx = join(bin, "npx")
    await writeFile(
      npx,
      `#!${process.execPath}\nconsole.log(JSON.stringify({ args: process.argv.slice(2), env: process.env }))\n`,
    )
    await chmod(npx, 0o755)
    // As from a shell that set neither: the justfile's defaults, the shared servers, apply.
    const { DATABASE_URL: _d, NATS_URL: _n, ...env } = process.env
    // A shell's own settings: one port for every relay and worker, another Redis.
    const shell = { METRICS_PORT: "9464", REDIS_URL: "redis://elsewhere:6379", KEYWAY_SITE: "x" }
    const run = spawnSync(
      join(root, "node_modules/.bin/just"),
      ["--justfile", join(root, "justfile"), "pm2", "restart", "cloud-relay", "--update-env"],
      { cwd: root, env: { ...env, ...shell, PATH: `${bin}:${env.PATH}` }, encoding: "utf8" },
    )
    assert.equal(run.status, 0, run.stderr)
    const seen = JSON.parse(run.stdout) as { args: string[]; env: Record<string, string> }
    assert.deepEqual(seen.args, ["pm2", "restart", "cloud-relay", "--update-env"])
    assert.equal(seen.env.PM2_HOME, join(root, ".run/pm2"))
    for (const name of ["DATABASE_URL", "NATS_URL", ...Object.keys(shell)]) {
      assert.equal(seen.env[name], undefined, name)
    }
  } finally {
    await rm(bin, { recursive: true, force: true })
  }
})
