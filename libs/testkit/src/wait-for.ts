import { setTimeout as sleep } from "node:timers/promises"

export interface WaitForOptions {
  timeoutMs: number
  /** Pause between checks; defaults to 50 ms. */
  intervalMs?: number
  /**
   * Says what was awaited; it becomes the error's message. A function is called at the
   * timeout, so the message can tell how far things got.
   */
  message: string | (() => string)
}

export class WaitForTimeoutError extends Error {
  override name = "WaitForTimeoutError"
}

/**
 * Polls `predicate` until it returns true. A predicate that throws counts as "not yet" (a
 * server that refuses connections while starting is the usual case); the last error becomes
 * the timeout error's `cause`.
 */
export async function waitFor(
  predicate: () => Promise<boolean> | boolean,
  options: WaitForOptions,
): Promise<void> {
  const interval = options.intervalMs ?? 50
  const deadline = Date.now() + options.timeoutMs
  let lastError: unknown
  for (;;) {
    try {
      if (await predicate()) return
      lastError = undefined
    } catch (err) {
      lastError = err
    }
    const left = deadline - Date.now()
    if (left <= 0) break
    await sleep(Math.min(interval, left))
  }
  const detail = lastError instanceof Error ? `; last error: ${lastError.message}` : ""
  throw new WaitForTimeoutError(
    `${typeof options.message === "function" ? options.message() : options.message} (gave up after ${options.timeoutMs} ms${detail})`,
    lastError === undefined ? undefined : { cause: lastError },
  )
}
