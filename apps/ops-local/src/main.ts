// `just up [site]`, `just down [site]`, `just status`: the cloud and the factory side by side
// on one machine, each with its own NATS (JetStream domain), Redis and database, under the
// project's pm2 daemon. Every step is idempotent, so `just up` also repairs a half-up run.
import { existsSync } from "node:fs"
import { mkdir } from "node:fs/promises"
import { join } from "node:path"
import { describeError } from "@keyway/app-config"
import { createDb, ensureDatabase, migrateToLatest } from "@keyway/db"
import {
  applyStreams,
  connectNats,
  loadStreamDefinitions,
  type StreamDefinition,
} from "@keyway/nats"
import { jetstreamManager } from "@nats-io/jetstream"
import { binaries, type OpsConfig, parseOpsConfig, parsePostgresUrl } from "./config.ts"
import { ensureRunning } from "./ensure-running.ts"
import { findOrphans, stopOrphans } from "./orphans.ts"
import { connectPm2 } from "./pm2-client.ts"
import { ensureSecrets, legacySecretsFile, siteSecretsFile } from "./secrets.ts"
import {
  type LaunchContext,
  repositoryRoot,
  SITE_NAMES,
  SITES,
  type SiteName,
  siteAdminNats,
  siteDatabaseUrl,
  siteProcesses,
} from "./site-plan.ts"
import { collectStatus, printStatus } from "./status.ts"
import { waitForCrossing } from "./wait-for-crossing.ts"
import { waitUntil } from "./wait-until.ts"

const root = repositoryRoot()
const runDir = join(root, ".run")
const logDir = join(runDir, "logs")
const pm2Home = join(runDir, "pm2")

function say(line: string) {
  process.stdout.write(`${line}\n`)
}

// Apps before servers, so the relay and the worker drain against live servers.
const STOP_ORDER = ["demo", "worker", "relay", "redis", "nats"]

/**
 * Stops the sites' processes that a pm2 daemon which died left running (orphans.ts), apps
 * first. `managed` are the pids the running daemon has: those are its own.
 */
async function stopLeftovers(sites: SiteName[], managed: number[]): Promise<number> {
  const orphans = (await findOrphans(pm2Home, managed)).filter((o) =>
    sites.some((site) => o.name.startsWith(`${site}-`)),
  )
  const rank = (name: string) => {
    const n = STOP_ORDER.findIndex((role) => name.endsWith(`-${role}`))
    return n < 0 ? STOP_ORDER.length : n
  }
  for (let r = 0; r <= STOP_ORDER.length; r++) {
    const batch = orphans.filter((o) => rank(o.name) === r)
    if (batch.length === 0) continue
    await stopOrphans(batch, 15_000)
    for (const o of batch) {
      say(`  ${o.name.padEnd(16)} stopped (pid ${o.pid}, left running by a pm2 daemon that died)`)
    }
  }
  return orphans.length
}

function natsReady(site: SiteName) {
  // JetStream answers, not just the port: streams are applied right after.
  return async () => {
    // Bounded: a server that takes the connection and never answers held up (with the lock)
    // for undici's five minutes, past the 30 s waitUntil gives it.
    const res = await fetch(
      `http://127.0.0.1:${SITES[site].natsHttpPort}/healthz?js-enabled-only=1`,
      { signal: AbortSignal.timeout(2000) },
    ).catch(() => undefined)
    // No answer (refused, reset, timed out) is "not yet": the server pm2 just started is
    // still starting, or restarting; one that never comes up ends the wait with its log named.
    return res?.ok === true
  }
}

function redisReady(site: SiteName) {
  return async () => {
    const { Socket } = await import("node:net")
    return new Promise<boolean>((resolve) => {
      const s = new Socket()
      s.setTimeout(1000)
      s.once("data", (d) => {
        s.destroy()
        resolve(d.toString().startsWith("+PONG"))
      })
      s.once("error", () => resolve(false))
      s.once("timeout", () => {
        s.destroy()
        resolve(false)
      })
      s.connect(SITES[site].redisPort, "127.0.0.1", () => s.write("PING\r\n"))
    })
  }
}

/** Both sites' files, made or completed; a word on the file they replace, if it is still here. */
async function siteSecrets(): Promise<Record<string, string>> {
  const passwords = await ensureSecrets(runDir)
  const legacy = legacySecretsFile(runDir)
  if (existsSync(legacy)) {
    say(
      `${legacy} is no longer read: its passwords went on in ${SITE_NAMES.map((site) => siteSecretsFile(runDir, site)).join(" and ")}. Give each site's hosts their own file, then delete it here and there (it holds both sites' passwords).`,
    )
  }
  return passwords
}

async function up(sites: SiteName[], config: OpsConfig) {
  const passwords = await siteSecrets()
  const ctx: LaunchContext = {
    root,
    runDir,
    postgresUrl: config.postgresUrl,
    passwords,
    ...binaries,
    demoRate: config.demoRate,
  }
  const plans = sites.map((site) => ({ site, specs: siteProcesses(SITES[site], ctx) }))
  // Read before anything starts: a stray comma there failed `up` after the servers had
  // started and a database was migrated, with a JSON error that named no file.
  const streams = new Map<SiteName, StreamDefinition[]>()
  for (const site of sites) {
    const file = join(root, SITES[site].streamsFile)
    streams.set(
      site,
      await loadStreamDefinitions(file).catch((err) => {
        throw new Error(`cannot read ${file}: ${(err as Error).message}`)
      }),
    )
  }
  for (const site of sites) {
    await mkdir(join(runDir, site, "jetstream"), { recursive: true })
    await mkdir(join(runDir, site, "redis"), { recursive: true })
  }
  await mkdir(logDir, { recursive: true })
  const pm2 = (await connectPm2(pm2Home, true))!
  try {
    // Before anything starts: a second set beside them would find their ports taken.
    await stopLeftovers(
      sites,
      (await pm2.list()).map((p) => p.pid),
    )
    say("servers")
    await ensureRunning(
      pm2,
      plans.flatMap((p) => p.specs.filter((s) => s.tier === "server")),
      logDir,
      say,
    )
    for (const site of sites) {
      const log = `.run/logs/${site}-nats.log`
      await waitUntil(`${site} NATS (see ${log})`, natsReady(site), 30_000)
      await waitUntil(`${site} Redis (see .run/logs/${site}-redis.log)`, redisReady(site), 30_000)
    }

    say("databases and streams")
    for (const site of sites) {
      const plan = SITES[site]
      const url = siteDatabaseUrl(plan, config.postgresUrl)
      const created = await ensureDatabase(url)
      const db = createDb({ connectionString: url, max: 1, applicationName: "keyway-up" })
      try {
        const applied = await migrateToLatest(db, { log: (message) => say(`  ${message}`) })
        say(
          `  ${plan.database.padEnd(16)} ${created ? "created, " : ""}${applied.length ? `migrated: ${applied.join(", ")}` : "up to date"}`,
        )
      } finally {
        await db.destroy()
      }
      const nc = await connectNats({
        ...siteAdminNats(plan, passwords[plan.adminUser]!),
        name: `keyway-up:${site}`,
        // The server answers (waited for above): a refused password must fail here, with
        // its reason, not wait for ever (connectNats keeps trying through refusals).
        waitForServer: false,
      })
      try {
        const definitions = streams.get(site)!
        await applyStreams(await jetstreamManager(nc), definitions)
        say(`  ${`${site} streams`.padEnd(16)} ${definitions.map((d) => d.name).join(", ")}`)
      } finally {
        await nc.close()
      }
    }

    say("apps")
    await ensureRunning(
      pm2,
      plans.flatMap((p) => p.specs.filter((s) => s.tier === "app")),
      logDir,
      say,
    )
  } finally {
    pm2.disconnect()
  }

  if (sites.length === SITE_NAMES.length) await awaitCrossing(config)
  say("`npx just status` shows each site; `npx just pm2 logs <name>` follows a process's log.")
}

/** Both directions handled something new since this `up` (wait-for-crossing.ts). */
async function awaitCrossing(config: OpsConfig) {
  say("waiting for events to cross (factory → cloud, cloud → factory)…")
  const started = Date.now()
  const sites = SITE_NAMES.map((site) => ({
    name: SITES[site].database,
    db: createDb({
      connectionString: siteDatabaseUrl(SITES[site], config.postgresUrl),
      max: 1,
      applicationName: "keyway-up",
    }),
  }))
  try {
    const [cloud, factory] = await waitForCrossing(sites, 90_000)
    say(
      `  crossing after ${((Date.now() - started) / 1000).toFixed(1)} s: ` +
        `cloud handled ${cloud} new factory events, factory handled ${factory} new cloud commands`,
    )
  } catch (err) {
    say(`  ${describeError(err)}: see \`npx just status\` and .run/logs/`)
    process.exitCode = 1
  } finally {
    await Promise.all(sites.map(({ db }) => db.destroy()))
  }
}

async function down(sites: SiteName[]) {
  const pm2 = await connectPm2(pm2Home, false)
  if (!pm2) {
    if ((await stopLeftovers(sites, [])) === 0) say("nothing running")
    return
  }
  try {
    const present = new Set((await pm2.list()).map((p) => p.name))
    for (const role of STOP_ORDER) {
      for (const site of sites) {
        const name = `${site}-${role}`
        if (!present.has(name)) continue
        await pm2.delete(name)
        say(`  ${name.padEnd(16)} stopped`)
      }
    }
    await stopLeftovers(
      sites,
      (await pm2.list()).map((p) => p.pid),
    )
    if ((await pm2.list()).length === 0) {
      await pm2.kill()
      say("pm2 daemon stopped; data stays in .run/ for the next `just up`")
    }
  } finally {
    pm2.disconnect()
  }
}

async function status(postgresUrl: string) {
  const pm2 = await connectPm2(pm2Home, false)
  try {
    const processes = pm2 ? await pm2.list() : []
    // Left running by a daemon that died: "processes none" alone read as nothing running.
    const orphans = await findOrphans(
      pm2Home,
      processes.map((p) => p.pid),
    )
    if (orphans.length > 0) {
      say(
        `${orphans.length} processes left running by a pm2 daemon that died: ${orphans.map((o) => `${o.name} (pid ${o.pid})`).join(", ")}; \`npx just down\` stops them`,
      )
    }
    for (const site of SITE_NAMES) {
      printStatus(await collectStatus(SITES[site], postgresUrl, processes), say)
    }
  } finally {
    pm2?.disconnect()
  }
}

function parseSites(arg: string | undefined): SiteName[] {
  if (!arg) return [...SITE_NAMES]
  if ((SITE_NAMES as readonly string[]).includes(arg)) return [arg as SiteName]
  throw new Error(`unknown site ${JSON.stringify(arg)}: use ${SITE_NAMES.join(" or ")}, or none`)
}

const [command, siteArg] = process.argv.slice(2)
try {
  // Read by the commands that use it only: a bad DEMO_RATE in the environment must not keep
  // `down` from stopping the sites.
  const config = () => parseOpsConfig(process.env)
  switch (command) {
    case "up":
      await up(parseSites(siteArg), config())
      break
    case "down":
      await down(parseSites(siteArg))
      break
    case "status":
      await status(parsePostgresUrl(process.env))
      break
    case "secrets":
      await siteSecrets()
      for (const site of SITE_NAMES) say(`${siteSecretsFile(runDir, site)} (mode 600)`)
      break
    default:
      throw new Error("usage: ops-local up|down [cloud|factory] | status | secrets")
  }
} catch (err) {
  // describeError: Postgres refusing on `localhost` is an AggregateError of no message.
  console.error(`just ${command ?? ""}: ${describeError(err)}`)
  process.exitCode = 1
}
// pm2's client keeps sockets (and after killDaemon, a reconnect timer) that would hold the
// process open; everything this command does is finished here.
process.exit()
