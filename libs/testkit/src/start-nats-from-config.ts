import { execFile } from "node:child_process"
import { mkdir, stat } from "node:fs/promises"
import { join } from "node:path"
import { setTimeout as sleep } from "node:timers/promises"
import { freePort } from "./free-port.ts"
import { natsServerBinary } from "./internal/binaries.ts"
import { type RunningChild, readLogTail, spawnChild, terminate } from "./internal/child-process.ts"
import { isAddressInUse, lifecycleOf, type ServerLifecycle } from "./internal/managed-server.ts"
import { natsReady } from "./internal/nats-probe.ts"
import { createTempDir } from "./internal/temp-dir.ts"
import { ServerStartError } from "./server-start-error.ts"

export interface ConfigNatsServerOptions {
  /**
   * A config file of the repository (nats/hub.conf, say), used as it is. It must leave the
   * log on stderr (no `log_file`): readiness reads the server's ID there.
   */
  configPath: string
  /**
   * The variables the config reads: passwords, KEYWAY_LEAF_REMOTE_URL, routes. Values given
   * here win; KEYWAY_NATS_PORT, KEYWAY_NATS_HTTP_PORT, KEYWAY_NATS_STORE_DIR and every name
   * in `freePorts` are filled in when missing.
   */
  env?: Record<string, string>
  /** More variables to fill with free ports: ["KEYWAY_LEAF_PORT"], say. */
  freePorts?: readonly string[]
  /** Readiness waits for JetStream too. Defaults to true. */
  jetstream?: boolean
  /** Defaults to 15 s. */
  readyTimeoutMs?: number
}

export interface ConfigNatsServerHandle extends ServerLifecycle {
  /** `nats://127.0.0.1:<port>` */
  readonly url: string
  readonly port: number
  readonly httpPort: number
  /** Every variable the server was started with (ports, store dir, the caller's own). */
  readonly env: Readonly<Record<string, string>>
  /** The temp directory holding the store and the log; removed on dispose. */
  readonly dir: string
  readonly storeDir: string
  readonly logPath: string
}

const startAttempts = 3

/**
 * Starts a private nats-server from one of the repository's config files, the way a
 * deployment does: the file untouched, everything host-specific passed as environment
 * variables. The server's environment holds only those variables (and PATH), so a test
 * shows what the config needs, and secrets are not handed to it twice.
 */
export async function startNatsFromConfig(
  options: ConfigNatsServerOptions,
): Promise<ConfigNatsServerHandle> {
  const temp = await createTempDir("natsconf")
  const dir = temp.path
  const storeDir = join(dir, "store")
  const logPath = join(dir, "nats.log")
  const given = options.env ?? {}
  const portNames = ["KEYWAY_NATS_PORT", "KEYWAY_NATS_HTTP_PORT", ...(options.freePorts ?? [])]
  try {
    await mkdir(storeDir)
    for (let attempt = 1; ; attempt++) {
      const env: Record<string, string> = {
        // Quoted: nats-server parses the value as a config value (a space in TMPDIR).
        KEYWAY_NATS_STORE_DIR: JSON.stringify(storeDir),
        KEYWAY_NATS_HOST: "127.0.0.1",
        ...given,
      }
      const taken = new Set<number>()
      for (const name of portNames) {
        if (env[name] !== undefined) continue
        let port = await freePort()
        while (taken.has(port)) port = await freePort()
        taken.add(port)
        env[name] = String(port)
      }
      const port = Number(env.KEYWAY_NATS_PORT)
      const httpPort = Number(env.KEYWAY_NATS_HTTP_PORT)
      const server = new EnvServer({
        configPath: options.configPath,
        env,
        logPath,
        cwd: dir,
        port,
        httpPort,
        jetstream: options.jetstream ?? true,
        readyTimeoutMs: options.readyTimeoutMs ?? 15_000,
      })
      try {
        await server.start()
      } catch (err) {
        // Only ports this function chose can be chosen again.
        const ours = portNames.some((n) => given[n] === undefined)
        if (attempt < startAttempts && ours && isAddressInUse(err)) continue
        throw err
      }
      return Object.assign(
        lifecycleOf(server, () => temp.remove()),
        {
          url: `nats://127.0.0.1:${port}`,
          port,
          httpPort,
          env,
          dir,
          storeDir,
          logPath,
        },
      )
    }
  } catch (err) {
    await temp.remove()
    throw err
  }
}

/**
 * `nats-server -t -c path` with these variables and no others (plus PATH): a config that
 * reads a variable nobody sets fails here as it would at start.
 */
export function checkNatsConfigWith(
  path: string,
  env: Record<string, string>,
): Promise<{ ok: boolean; output: string }> {
  return new Promise((resolve) => {
    execFile(
      natsServerBinary,
      ["-t", "-c", path],
      { env: serverEnv(env) },
      (err, stdout, stderr) => {
        resolve({ ok: err === null, output: `${stdout}${stderr}`.trim() })
      },
    )
  })
}

function serverEnv(env: Record<string, string>): Record<string, string> {
  return { PATH: process.env.PATH ?? "/usr/bin:/bin", ...env }
}

interface EnvServerSpec {
  configPath: string
  env: Record<string, string>
  logPath: string
  cwd: string
  port: number
  httpPort: number
  jetstream: boolean
  readyTimeoutMs: number
}

/**
 * testkit's ManagedServer cannot pass an environment to its child, and this one must: the
 * variables are the config's only parameters.
 */
class EnvServer {
  private child: RunningChild | undefined

  constructor(private readonly spec: EnvServerSpec) {}

  get pid(): number | undefined {
    return this.child && !this.child.hasExited() ? this.child.pid : undefined
  }

  async start(): Promise<void> {
    const { spec } = this
    if (this.pid !== undefined) throw new Error(`nats-server is already running (pid ${this.pid})`)
    const logStart = await stat(spec.logPath).then(
      (s) => s.size,
      () => 0,
    )
    const child = await spawnWithEnv(spec)
    this.child = child
    const label = `nats-server -c ${spec.configPath}`
    const deadline = Date.now() + spec.readyTimeoutMs
    for (;;) {
      if (child.hasExited()) {
        const how = await child.exited
        throw await this.startError(`${label} exited during startup (${how})`, logStart)
      }
      if (await natsReady(spec, child.pid, logStart)) return
      if (Date.now() >= deadline) {
        await terminate(child, "SIGKILL")
        throw await this.startError(
          `${label} (pid ${child.pid}) not ready after ${spec.readyTimeoutMs} ms`,
          logStart,
        )
      }
      await sleep(25)
    }
  }

  async stop(): Promise<void> {
    if (this.child) await terminate(this.child, "SIGTERM")
  }

  async kill(): Promise<void> {
    if (this.child) await terminate(this.child, "SIGKILL")
  }

  private async startError(message: string, logStart: number): Promise<ServerStartError> {
    const tail = await readLogTail(this.spec.logPath, 4000, logStart)
    return new ServerStartError(message, this.spec.logPath, tail)
  }
}

function spawnWithEnv(spec: EnvServerSpec): Promise<RunningChild> {
  return spawnChild({
    command: natsServerBinary,
    args: ["-c", spec.configPath],
    logPath: spec.logPath,
    cwd: spec.cwd,
    env: serverEnv(spec.env),
    // Variable names only: their values include passwords, and this log is what the
    // credentials test searches for them.
    describe: `${natsServerBinary} -c ${spec.configPath} (variables: ${Object.keys(spec.env).sort().join(" ")})`,
  })
}
