// What a benchmark run must give back however it ends: its database, its stream on the shared
// NATS, the processes it started. Each is registered the moment it exists, so that a failure
// between two creations still releases the first (a `try` opened after all of them did not).
import type { TsChild } from "@keyway/testkit"

/**
 * Cleanups run last-registered first by `await using`, each even if an earlier one failed: a
 * relay that would not stop must not keep the stream and the database on the shared servers.
 * The first failure is thrown once all have run; if the run itself failed too, `await using`
 * throws a SuppressedError that carries both.
 */
export class Cleanups implements AsyncDisposable {
  readonly #steps: { what: string; run: () => Promise<unknown> }[] = []

  /** Registers `run` to release `what` (named in the error if it fails). */
  defer(what: string, run: () => Promise<unknown>): void {
    this.#steps.push({ what, run })
  }

  async [Symbol.asyncDispose](): Promise<void> {
    let first: unknown
    for (const step of this.#steps.splice(0).reverse()) {
      try {
        await step.run()
      } catch (err) {
        first ??= new Error(`cleanup failed: ${step.what}`, { cause: err })
      }
    }
    if (first !== undefined) throw first
  }
}

/**
 * Whether `child` has exited. exitCode alone stays null for a process ended by a signal (the
 * OOM killer's SIGKILL), which a wait on its work then sat out to its deadline.
 */
export const hasExited = (child: TsChild) => child.exitCode !== null || child.signalCode !== null

// Generous: a relay or worker stops in well under a second here (it finishes its current
// batch and closes its connections); one that takes this long is stuck, and waiting longer
// only held the benchmark, and what it had created, for ever.
const STOP_TIMEOUT_MS = 60_000

/**
 * Sends SIGTERM to `child` and waits for it to exit; SIGKILL if it has not within
 * STOP_TIMEOUT_MS, and then throws, naming `what`: a stop that hung is a bug to see, even
 * though the child is gone.
 */
export async function stopChild(child: TsChild, what: string): Promise<void> {
  child.kill("SIGTERM")
  let timer: NodeJS.Timeout | undefined
  const timedOut = new Promise<"timeout">((r) => {
    timer = setTimeout(() => r("timeout"), STOP_TIMEOUT_MS)
  })
  const how = await Promise.race([child.exited(), timedOut])
  clearTimeout(timer)
  if (how !== "timeout") return
  child.kill("SIGKILL")
  // Bounded: exited() waits at most 2 s for the output once the process is gone, and a
  // SIGKILL cannot be ignored.
  await child.exited()
  throw new Error(`${what} did not stop within ${STOP_TIMEOUT_MS / 1000} s of SIGTERM: killed`)
}
