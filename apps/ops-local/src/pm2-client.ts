// The project's own pm2 daemon, through pm2's programmatic API: PM2_HOME under .run/ so
// `just up` never touches a pm2 that the machine's user runs for other things.
import type { ProcessDescription, StartOptions } from "pm2"
import { type ProcessSpec, specDigest } from "./site-plan.ts"

/** The variable that carries a process's {@link specDigest}, so a later `up` can compare. */
export const DIGEST_VARIABLE = "KEYWAY_SPEC_DIGEST"

/**
 * Whatever the caller's shell exported (the justfile's DATABASE_URL and NATS_URL for the
 * shared servers, say) must not leak into a site's process; pm2 drops every variable whose
 * name contains one of these. METRICS_PORT exported once would have every relay and worker
 * bind the same port, and all but one crash-loop. The plan's own env is applied after the
 * filter. OTEL_EXPORTER_OTLP_ENDPOINT passes: exported, it sends every site's spans to that
 * Jaeger, each process under the name the plan gives it.
 */
export const CALLER_ENV_FILTER: readonly string[] = [
  "DATABASE_URL",
  "NATS_",
  "REDIS_URL",
  "KEYWAY_",
  "DEMO_",
  "RELAY_",
  "WORKER_",
  "METRICS_PORT",
  "OTEL_SERVICE_NAME",
]

export interface Pm2Process {
  name: string
  status: string
  pid: number
  restarts: number
  uptimeMs: number
  memoryBytes: number
  cpu: number
  /** The {@link specDigest} it was started with; "" for one started without. */
  digest: string
  /**
   * The environment pm2 holds for it and hands it at each (re)start. Not always the one it
   * was started with: `pm2 restart --update-env` copies the caller's environment over it.
   */
  env: Record<string, string>
}

export interface Pm2Client {
  list(): Promise<Pm2Process[]>
  start(spec: ProcessSpec, logDir: string): Promise<void>
  delete(name: string): Promise<void>
  /** Stops the daemon itself (after the last process is gone). */
  kill(): Promise<void>
  disconnect(): void
}

type Pm2 = typeof import("pm2")

/**
 * pm2's status, except where pm2 has given up on a process: with a restart delay it then
 * reports "waiting restart" over the "errored" it set (pm2 7 God.js handleExit), and clears
 * created_at, which a process waiting for a restart it will get always has.
 */
function statusOf(env: ProcessDescription["pm2_env"]): string {
  const status: string = env?.status ?? "unknown"
  const createdAt = (env as { created_at?: number | null } | undefined)?.created_at
  return status === "waiting restart" && createdAt == null ? "errored" : status
}

const call = <T>(fn: (cb: (err: Error | null, value: T) => void) => void) =>
  new Promise<T>((resolve, reject) => fn((err, value) => (err ? reject(err) : resolve(value))))

/**
 * Connects to (or spawns) the daemon under `pm2Home`. pm2 reads PM2_HOME and the kill
 * signal once, when its modules load and when the daemon starts, so both are set before the
 * import. SIGTERM rather than pm2's default SIGINT: every Keyway process drains on SIGTERM,
 * and redis-server and nats-server shut down cleanly on it.
 */
export async function connectPm2(
  pm2Home: string,
  spawnDaemon: boolean,
): Promise<Pm2Client | undefined> {
  process.env.PM2_HOME = pm2Home
  // The daemon writes every process's environment, NATS passwords included, to dump.pm2
  // when it is stopped by a signal (a reboot) or `pm2 save`, with the default mode: 0644.
  // Its home is kept to its owner, whatever mode the files in it get.
  if (spawnDaemon) {
    const { chmod, mkdir } = await import("node:fs/promises")
    await mkdir(pm2Home, { recursive: true, mode: 0o700 })
    await chmod(pm2Home, 0o700)
  }
  process.env.PM2_KILL_SIGNAL = "SIGTERM"
  process.env.PM2_DISCRETE_MODE = "true"
  // CommonJS: the namespace object of a dynamic import is under `default`.
  const pm2 = ((await import("pm2")) as unknown as { default: Pm2 }).default
  if (!spawnDaemon) {
    const { existsSync, readFileSync } = await import("node:fs")
    // No socket: no daemon, nothing running; don't start one just to say so. A socket left by
    // a daemon that was killed (-9, the OOM killer) is no daemon either: connecting then
    // started one, outside up's lock, which nothing stopped.
    if (!existsSync(`${pm2Home}/rpc.sock`)) return undefined
    let pid = 0
    try {
      pid = Number(readFileSync(`${pm2Home}/pm2.pid`, "utf8"))
    } catch {
      // No pid file: no daemon.
    }
    if (!Number.isInteger(pid) || pid <= 0 || !isAlive(pid)) return undefined
  }
  await call<void>((cb) => pm2.connect((err: Error | null) => cb(err, undefined)))
  return {
    async list() {
      const all = await call<ProcessDescription[]>((cb) => pm2.list(cb))
      return all.map((p) => {
        const env = heldEnv(p.pm2_env)
        return {
          name: p.name ?? "?",
          status: statusOf(p.pm2_env),
          pid: p.pid ?? 0,
          restarts: p.pm2_env?.restart_time ?? 0,
          uptimeMs: p.pm2_env?.pm_uptime ? Date.now() - p.pm2_env.pm_uptime : 0,
          memoryBytes: p.monit?.memory ?? 0,
          cpu: p.monit?.cpu ?? 0,
          digest: env[DIGEST_VARIABLE] ?? "",
          env,
        }
      })
    },
    async start(spec, logDir) {
      const options: StartOptions & { filter_env: string[] } = {
        name: spec.name,
        script: spec.script,
        args: spec.args,
        interpreter: "none",
        env: { ...spec.env, [DIGEST_VARIABLE]: specDigest(spec) },
        filter_env: [...CALLER_ENV_FILTER],
        autorestart: true,
        // A process that keeps dying (a port taken, a bad config) stops being restarted
        // and shows as errored in `just status`; `just up` starts it afresh. pm2 counts a
        // restart against max_restarts only within min_uptime x max_restarts (100 s) of the
        // first start, so later crashes are restarted for ever: the fixed delay paces those
        // at one a second. (exp_backoff_restart_delay outran that window within the first
        // 100 s too, so nothing was ever errored.)
        max_restarts: 10,
        min_uptime: 10_000,
        restart_delay: 1000,
        kill_timeout: 15_000,
        merge_logs: true,
        time: true,
        output: `${logDir}/${spec.name}.log`,
        error: `${logDir}/${spec.name}.log`,
      }
      await call<unknown>((cb) => pm2.start(options, cb))
    },
    async delete(name) {
      await call<unknown>((cb) => pm2.delete(name, cb))
    },
    async kill() {
      await call<unknown>((cb) => pm2.killDaemon(cb))
    },
    disconnect: () => pm2.disconnect(),
  }
}

/**
 * pm2_env.env's plain values, as strings: what pm2 hands the process. `pm2 restart
 * --update-env` from the command line also merges its own options in (an object under
 * current_conf), which pm2 does not pass on.
 */
function heldEnv(pm2Env: ProcessDescription["pm2_env"]): Record<string, string> {
  const env = (pm2Env as { env?: Record<string, unknown> } | undefined)?.env ?? {}
  const out: Record<string, string> = {}
  for (const [name, value] of Object.entries(env)) {
    if (value !== null && value !== undefined && typeof value !== "object")
      out[name] = String(value)
  }
  return out
}

/** Whether `pid` is a live process of this user (EPERM: another user's, reusing the pid). */
function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}
