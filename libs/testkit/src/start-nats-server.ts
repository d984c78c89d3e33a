import { execFile } from "node:child_process"
import { randomBytes } from "node:crypto"
import { mkdir, writeFile } from "node:fs/promises"
import { join } from "node:path"
import { freePort } from "./free-port.ts"
import { natsServerBinary } from "./internal/binaries.ts"
import {
  isAddressInUse,
  lifecycleOf,
  ManagedServer,
  type ServerLifecycle,
} from "./internal/managed-server.ts"
import { natsReady } from "./internal/nats-probe.ts"
import { createTempDir } from "./internal/temp-dir.ts"

export interface NatsServerOptions {
  /** Defaults to true. */
  jetstream?: boolean
  /** JetStream domain (reference/nats-2.9.md rule 4: one per site). */
  domain?: string
  /**
   * Appended to the generated config: leafnodes, accounts, cluster and so on. Not the log's
   * destination (`log_file`, `syslog`): readiness reads the server's ID from its output.
   */
  config?: string
  /** `server_name`; defaults to a random one. */
  name?: string
  /** Defaults to 10 s. */
  readyTimeoutMs?: number
}

export interface NatsServerHandle extends ServerLifecycle {
  readonly name: string
  /** `nats://127.0.0.1:<port>` */
  readonly url: string
  readonly port: number
  /** Monitoring port: /varz, /jsz, /leafz, /healthz. */
  readonly httpPort: number
  /** The temp directory holding config, log and store; removed on dispose. */
  readonly dir: string
  /** The configured `store_dir`; the server keeps its files in `<storeDir>/jetstream`. */
  readonly storeDir: string
  readonly configPath: string
  readonly logPath: string
}

const startAttempts = 3

/** Starts a private nats-server on free ports and resolves once it accepts clients. */
export async function startNatsServer(options: NatsServerOptions = {}): Promise<NatsServerHandle> {
  const jetstream = options.jetstream ?? true
  const name = options.name ?? `testkit_${randomBytes(4).toString("hex")}`
  const temp = await createTempDir("nats")
  const dir = temp.path
  const storeDir = join(dir, "store")
  const configPath = join(dir, "nats.conf")
  const logPath = join(dir, "nats.log")
  try {
    await mkdir(storeDir)
    for (let attempt = 1; ; attempt++) {
      const [port, httpPort] = await distinctFreePorts()
      await writeFile(
        configPath,
        renderConfig({ name, port, httpPort, jetstream, storeDir, options }),
        "utf8",
      )
      const server = new ManagedServer({
        label: `nats-server ${name}`,
        command: natsServerBinary,
        args: ["-c", configPath],
        logPath,
        cwd: dir,
        readyTimeoutMs: options.readyTimeoutMs ?? 10_000,
        probe: (pid, logStart) => natsReady({ port, httpPort, jetstream, logPath }, pid, logStart),
      })
      try {
        await server.start()
      } catch (err) {
        if (attempt < startAttempts && isAddressInUse(err)) continue
        throw err
      }
      return Object.assign(
        lifecycleOf(server, () => temp.remove()),
        {
          name,
          url: `nats://127.0.0.1:${port}`,
          port,
          httpPort,
          dir,
          storeDir,
          configPath,
          logPath,
        },
      )
    }
  } catch (err) {
    // A ServerStartError already carries the log's tail, so the directory can go.
    await temp.remove()
    throw err
  }
}

async function distinctFreePorts(): Promise<[number, number]> {
  const a = await freePort()
  for (;;) {
    const b = await freePort()
    if (b !== a) return [a, b]
  }
}

function renderConfig(c: {
  name: string
  port: number
  httpPort: number
  jetstream: boolean
  storeDir: string
  options: NatsServerOptions
}): string {
  const lines = [
    `server_name: ${JSON.stringify(c.name)}`,
    `listen: "127.0.0.1:${c.port}"`,
    `http: "127.0.0.1:${c.httpPort}"`,
  ]
  if (c.jetstream) {
    const domain = c.options.domain ? `, domain: ${JSON.stringify(c.options.domain)}` : ""
    lines.push(`jetstream { store_dir: ${JSON.stringify(c.storeDir)}${domain} }`)
  }
  if (c.options.config) lines.push("", c.options.config)
  return `${lines.join("\n")}\n`
}

/**
 * Runs `nats-server -t -c path`. 2.9.10 rejects unknown keys, including the 2.10+ ones
 * listed in reference/nats-2.9.md rule 8, so this is how a config is checked against the
 * server that will run it.
 */
export function checkNatsConfig(path: string): Promise<{ ok: boolean; output: string }> {
  return new Promise((resolve) => {
    execFile(natsServerBinary, ["-t", "-c", path], (err, stdout, stderr) => {
      resolve({ ok: err === null, output: `${stdout}${stderr}`.trim() })
    })
  })
}
