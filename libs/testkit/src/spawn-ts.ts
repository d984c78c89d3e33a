import { type ChildProcess, spawn } from "node:child_process"
import { fileURLToPath } from "node:url"
import { killOnExit } from "./internal/exit-cleanup.ts"

const repoRoot = fileURLToPath(new URL("../../../", import.meta.url))

export interface TsChild extends ChildProcess {
  /** Every line the child printed on stdout so far. */
  readonly lines: string[]
  /** Lines that parse as JSON objects, parsed. */
  json(): Record<string, any>[]
  /** Resolves when the child has exited and its output has been read (at once if so). */
  exited(): Promise<{ code: number | null; signal: NodeJS.Signals | null }>
}

export interface SpawnTsOptions {
  /** More node flags for this child (e.g. `--expose-gc`, `--import` of a .ts module). */
  nodeArgs?: string[]
}

/**
 * Runs a TypeScript entry point in a child process: `node --import tsx`, not the tsx
 * wrapper, so that a signal sent to the child (SIGKILL, SIGSTOP) reaches the program itself.
 * stderr is passed through; stdout is collected line by line. The child is SIGKILLed when
 * the test process exits. `KEYWAY_CHILD_NODE_ARGS` adds node flags to every child, e.g.
 * `--cpu-prof --cpu-prof-dir=/tmp/prof` to profile a benchmark's processes (node refuses
 * --cpu-prof in NODE_OPTIONS).
 */
export function spawnTs(
  entry: string,
  env: Record<string, string> = {},
  options: SpawnTsOptions = {},
): TsChild {
  const extra = process.env.KEYWAY_CHILD_NODE_ARGS?.split(" ").filter(Boolean) ?? []
  // After tsx's own --import, so that an --import of a .ts module works.
  const nodeArgs = [...extra, "--import", "tsx", ...(options.nodeArgs ?? [])]
  const child = spawn(process.execPath, [...nodeArgs, entry], {
    cwd: repoRoot,
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "inherit"],
  }) as ChildProcess & { lines: string[] }
  const lines: string[] = []
  let partial = ""
  // Decoded by the stream, which keeps a character that a read cut in two for the next chunk;
  // each chunk decoded alone turned both halves into U+FFFD and broke that JSON line.
  child.stdout!.setEncoding("utf8")
  child.stdout!.on("data", (chunk: string) => {
    const parts = (partial + chunk).split("\n")
    partial = parts.pop() ?? ""
    lines.push(...parts)
  })
  // A last line without its newline is a line too.
  const drained = new Promise<void>((resolve) =>
    child.stdout!.once("close", () => {
      if (partial) lines.push(partial)
      partial = ""
      resolve()
    }),
  )
  // Killed with the test process however it ends, a signal included: a child left behind
  // (a relay, a worker) would go on using the shared NATS and Postgres.
  const forget = killOnExit(child)
  // 'exit' can come before the child's last output has been read: exited() waits for its
  // stdout to close too, so lines and json() hold everything it printed. Not for ever: a
  // process the child started may hold the pipe open after the child is gone.
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("exit", (code, signal) => {
      forget()
      let timer: NodeJS.Timeout | undefined
      void Promise.race([drained, new Promise((r) => (timer = setTimeout(r, 2000)))]).then(() => {
        clearTimeout(timer)
        resolve({ code, signal })
      })
    }),
  )
  return Object.assign(child, {
    lines,
    json: () =>
      lines.flatMap((l) => {
        if (!l.startsWith("{")) return []
        try {
          return [JSON.parse(l) as Record<string, any>]
        } catch {
          return []
        }
      }),
    exited: () => exit,
  })
}
