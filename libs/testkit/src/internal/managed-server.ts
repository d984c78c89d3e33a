import { stat } from "node:fs/promises"
import { setTimeout as sleep } from "node:timers/promises"
import { ServerStartError } from "../server-start-error.ts"
import { type RunningChild, readLogTail, spawnChild, terminate } from "./child-process.ts"

export interface ManagedServerSpec {
  /** For messages: "nats-server", "redis-server". */
  label: string
  command: string
  args: string[]
  logPath: string
  cwd?: string
  /**
   * One readiness check; must not throw. Whether the server answers, and is this process
   * (`pid`) where the server can tell: a server of another test that took the port while this
   * one was down answered a probe as well, and a restart took it for its own, while its own
   * exited on the port in use. `logStart` is where this start's part of the log begins.
   */
  probe: (pid: number, logStart: number) => Promise<boolean>
  readyTimeoutMs: number
}

/**
 * One server process that can be stopped and started again with the same command line, so
 * that a restarted server comes back on the same ports and data directory.
 */
export class ManagedServer {
  private child: RunningChild | undefined

  constructor(private readonly spec: ManagedServerSpec) {}

  get running(): boolean {
    return this.child !== undefined && !this.child.hasExited()
  }

  /** The running process's id; undefined once it has exited. */
  get pid(): number | undefined {
    return this.running ? this.child!.pid : undefined
  }

  async start(): Promise<void> {
    const { spec } = this
    if (this.running) throw new Error(`${spec.label} is already running (pid ${this.child!.pid})`)
    const logStart = await stat(spec.logPath).then(
      (s) => s.size,
      () => 0,
    )
    const child = await spawnChild(spec)
    this.child = child
    const deadline = Date.now() + spec.readyTimeoutMs
    for (;;) {
      if (child.hasExited()) {
        const how = await child.exited
        throw await this.startError(`${spec.label} exited during startup (${how})`, logStart)
      }
      if (await spec.probe(child.pid, logStart)) return
      if (Date.now() >= deadline) {
        await terminate(child, "SIGKILL")
        throw await this.startError(
          `${spec.label} (pid ${child.pid}) not ready after ${spec.readyTimeoutMs} ms`,
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
    // The log is appended to across restarts; only this attempt's part explains the failure.
    const tail = await readLogTail(this.spec.logPath, 4000, logStart)
    return new ServerStartError(message, this.spec.logPath, tail)
  }
}

/** A port chosen by freePort() was taken before the server could bind it. */
export function isAddressInUse(err: unknown): boolean {
  return err instanceof ServerStartError && /address already in use/i.test(err.message)
}

/** What every server handle testkit returns can do to its process. */
export interface ServerLifecycle {
  /** The server's process id while it runs (to SIGSTOP it, say); undefined when stopped. */
  readonly pid: number | undefined
  /** Starts the server again with the same ports and data, after stop() or kill(). */
  start(): Promise<void>
  /** SIGTERM: a clean shutdown. */
  stop(): Promise<void>
  /** SIGKILL: a crash. */
  kill(): Promise<void>
  restart(): Promise<void>
  /** Kills the server and removes its directory. */
  [Symbol.asyncDispose](): Promise<void>
}

/**
 * The lifecycle half of every server handle testkit returns (pid, start, stop, kill, restart,
 * dispose); each launcher adds its own addresses with Object.assign, which keeps `pid` a
 * live getter.
 */
export function lifecycleOf(
  server: {
    readonly pid: number | undefined
    start(): Promise<void>
    stop(): Promise<void>
    kill(): Promise<void>
  },
  removeDir: () => Promise<void>,
): ServerLifecycle {
  return {
    get pid() {
      return server.pid
    },
    start: () => server.start(),
    stop: () => server.stop(),
    kill: () => server.kill(),
    restart: async () => {
      await server.stop()
      await server.start()
    },
    [Symbol.asyncDispose]: async () => {
      await server.kill()
      await removeDir()
    },
  }
}
