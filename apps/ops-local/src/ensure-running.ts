// `up`'s step that starts a site's processes: servers, then (after their databases and
// streams) apps.
import { connect } from "node:net"
import type { Pm2Client } from "./pm2-client.ts"
import { type ProcessSpec, specDigest } from "./site-plan.ts"

/**
 * Brings each of `specs` online under pm2, in order, and says what it did, one line each. A
 * process online with the plan's settings is left alone; one stopped, errored, or started
 * with other settings ({@link specDigest}) is started afresh.
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
    if (current?.status === "online" && !changed) {
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
    // A process an `up` before digests started has none: its settings are not known.
    const restarted =
      current?.digest === ""
        ? "restarted: started by an earlier up, which kept no record of its settings"
        : "restarted: its settings changed"
    say(`  ${spec.name.padEnd(16)} ${current?.status === "online" ? restarted : "started"}`)
  }
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
