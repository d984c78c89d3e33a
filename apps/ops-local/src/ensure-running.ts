// `up`'s step that starts a site's processes: servers, then (after their databases and
// streams) apps.
import { connect } from "node:net"
import { CALLER_ENV_FILTER, DIGEST_VARIABLE, type Pm2Client } from "./pm2-client.ts"
import { type ProcessSpec, specDigest } from "./site-plan.ts"

/**
 * Brings each of `specs` online under pm2, in order, and says what it did, one line each. A
 * process online with the plan's settings is left alone; one stopped, errored, started with
 * other settings ({@link specDigest}), or whose environment was changed since ({@link envDrift})
 * is started afresh.
 */
export async function ensureRunning(
  pm2: Pm2Client,
  specs: readonly ProcessSpec[],
  logDir: string,
  say: (line: string) => void,
) {
  const running = new Map((await pm2.list()).map((p) => [p.name, p]))
  for (const spec of specs) {
    const current = running.get(spec.name)
    const changed = current !== undefined && current.digest !== specDigest(spec)
    const drifted = current === undefined ? [] : envDrift(spec, current.env)
    if (current?.status === "online" && !changed && drifted.length === 0) {
      say(`  ${spec.name.padEnd(16)} already online (pid ${current.pid})`)
      continue
    }
    // Stopped, errored, or running with settings other than the plan's (specDigest: a
    // password rotated, DEMO_RATE, an edited config): started afresh with this run's.
    if (current) await pm2.delete(spec.name)
    // Another program on a server's port would answer the readiness checks and the apps in
    // its place, and up would report success with the site's own server crash-looping.
    for (const port of spec.ports ?? []) {
      if (await listening(port)) {
        throw new Error(
          `port ${port} of ${spec.name} is taken by another program (\`ss -ltnp 'sport = :${port}'\` names it): stop it, then run up again`,
        )
      }
    }
    await pm2.start(spec, logDir)
    // A process an `up` before digests started has none: its settings are not known. Of an
    // environment changed since, the names only: the values may be passwords.
    const restarted =
      current?.digest === ""
        ? "restarted: started by an earlier up, which kept no record of its settings"
        : changed
          ? "restarted: its settings changed"
          : `restarted: its environment was changed outside up (${drifted.join(", ")})`
    say(`  ${spec.name.padEnd(16)} ${current?.status === "online" ? restarted : "started"}`)
  }
}

/**
 * The variables whose value pm2 holds for a process differs from the plan's, by name. The
 * digest alone missed this: `pm2 restart --update-env` copies the caller's environment over
 * the stored one (the shared servers' DATABASE_URL and NATS_URL that the justfile exports)
 * and leaves the digest variable as it was, so up said "already online" of a relay writing to
 * the wrong database. A variable the plan does not set counts if start would have filtered it
 * out of the caller's environment ({@link CALLER_ENV_FILTER}); PATH and the like may differ.
 */
export function envDrift(spec: ProcessSpec, held: Record<string, string>): string[] {
  const names = new Set<string>()
  for (const [name, value] of Object.entries(spec.env)) if (held[name] !== value) names.add(name)
  for (const name of Object.keys(held)) {
    if (name === DIGEST_VARIABLE || name in spec.env) continue
    if (CALLER_ENV_FILTER.some((part) => name.includes(part))) names.add(name)
  }
  return [...names].sort()
}

/** Whether something accepts connections on 127.0.0.1:port. */
async function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1")
    s.setTimeout(1000)
    s.once("connect", () => {
      s.destroy()
      resolve(true)
    })
    s.once("error", () => resolve(false))
    s.once("timeout", () => {
      s.destroy()
      resolve(false)
    })
  })
}
