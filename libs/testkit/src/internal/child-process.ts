import { spawn } from "node:child_process"
import { closeSync, openSync, writeSync } from "node:fs"
import { open } from "node:fs/promises"
import { killOnExit } from "./exit-cleanup.ts"

export interface ChildSpec {
  command: string
  args: string[]
  /** stdout and stderr are appended here, so a failing test can show what the server said. */
  logPath: string
  cwd?: string
  /** The child's whole environment; defaults to this process's. */
  env?: Record<string, string>
  /**
   * What the log's header line says was started; defaults to the command line. Say it when
   * the arguments or the environment hold secrets: the log is searched for them in tests.
   */
  describe?: string
}

export interface RunningChild {
  readonly pid: number
  /** Resolves with the exit code (or the signal's name) once the process is gone. */
  readonly exited: Promise<number | string>
  readonly hasExited: () => boolean
  readonly signal: (signal: NodeJS.Signals) => void
}

export function spawnChild(spec: ChildSpec): Promise<RunningChild> {
  const fd = openSync(spec.logPath, "a")
  try {
    const what = spec.describe ?? `${spec.command} ${spec.args.join(" ")}`
    writeSync(fd, `\n--- testkit: ${new Date().toISOString()} ${what}\n`)
    const child = spawn(spec.command, spec.args, {
      cwd: spec.cwd,
      env: spec.env ?? process.env,
      stdio: ["ignore", fd, fd],
      detached: false,
    })
    const forget = killOnExit(child)
    let done = false
    const exited = new Promise<number | string>((resolve) => {
      child.once("exit", (code, signal) => {
        done = true
        forget()
        resolve(code ?? signal ?? "unknown")
      })
    })
    return new Promise((resolve, reject) => {
      child.once("error", (err) => {
        done = true
        forget()
        reject(new Error(`cannot spawn ${spec.command}: ${err.message}`, { cause: err }))
      })
      child.once("spawn", () => {
        resolve({
          pid: child.pid!,
          exited,
          hasExited: () => done,
          signal: (s) => {
            if (!done) child.kill(s)
          },
        })
      })
    })
  } finally {
    // The child holds its own copy of the descriptor.
    closeSync(fd)
  }
}

/** Sends `signal`, then SIGKILL if the process has not exited after `graceMs`. */
export async function terminate(
  child: RunningChild,
  signal: NodeJS.Signals,
  graceMs = 10_000,
): Promise<void> {
  if (child.hasExited()) return
  child.signal(signal)
  if (signal === "SIGKILL") {
    await child.exited
    return
  }
  let timer: NodeJS.Timeout | undefined
  const timedOut = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), graceMs)
  })
  const result = await Promise.race([child.exited, timedOut])
  clearTimeout(timer)
  if (result === "timeout") {
    child.signal("SIGKILL")
    await child.exited
  }
}

/** At most the last `bytes` of a log file from offset `from` on, for error messages. */
export async function readLogTail(path: string, bytes = 4000, from = 0): Promise<string> {
  try {
    const file = await open(path, "r")
    try {
      const { size } = await file.stat()
      const start = Math.min(size, Math.max(from, size - bytes))
      const buf = Buffer.alloc(size - start)
      await file.read(buf, 0, buf.length, start)
      return buf.toString("utf8")
    } finally {
      await file.close()
    }
  } catch (err) {
    return `(no log: ${(err as Error).message})`
  }
}
