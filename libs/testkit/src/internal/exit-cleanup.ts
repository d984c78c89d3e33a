import type { ChildProcess } from "node:child_process"
import { rmSync } from "node:fs"

// What testkit must not leave behind when a test file dies without disposing its handles:
// servers spawned attached (detached: false) are not killed with their parent, and would
// keep their ports and temp dirs; their stores would pile up in /tmp, and test databases
// in Postgres.
const children = new Set<ChildProcess>()
const dirs = new Set<string>()
const callbacks = new Set<() => void>()
let installed = false

export function killOnExit(child: ChildProcess): () => void {
  install()
  children.add(child)
  return () => children.delete(child)
}

export function removeOnExit(dir: string): () => void {
  install()
  dirs.add(dir)
  return () => dirs.delete(dir)
}

/** `fn` must be synchronous: it runs from the 'exit' event. */
export function runOnExit(fn: () => void): () => void {
  install()
  callbacks.add(fn)
  return () => callbacks.delete(fn)
}

function cleanUpSync(): void {
  for (const child of children) {
    try {
      child.kill("SIGKILL")
    } catch {
      // Already gone; nothing else can be done from an exit hook.
    }
  }
  children.clear()
  for (const dir of dirs) {
    try {
      rmSync(dir, { recursive: true, force: true, maxRetries: 3 })
    } catch {
      // Best effort: a leftover temp dir is untidy, not wrong.
    }
  }
  dirs.clear()
  for (const fn of callbacks) {
    try {
      fn()
    } catch {
      // Best effort, like the rest.
    }
  }
  callbacks.clear()
}

function install(): void {
  if (installed) return
  installed = true
  // 'exit' handlers must be synchronous; kill() and rmSync() are. It runs on a normal end,
  // process.exit() and an uncaught exception.
  process.on("exit", cleanUpSync)
  // A signal ends the process without 'exit'. When no one else listens, re-raise it after
  // cleaning up so the process still dies the way the sender meant; when someone does
  // (an app under test draining on SIGTERM), leave the decision to them.
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    const onSignal = () => {
      cleanUpSync()
      if (process.listenerCount(sig) === 1) {
        process.off(sig, onSignal)
        process.kill(process.pid, sig)
      }
    }
    process.on(sig, onSignal)
  }
}
