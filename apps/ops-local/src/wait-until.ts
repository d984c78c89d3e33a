// How `up` waits for what it started: servers to answer, demo traffic to cross.

/**
 * Polls `check` every `intervalMs` until it returns true, and fails after `timeoutMs`. What
 * counts as "not yet" is the check's to say, by returning false; an error it throws ends the
 * wait at once, as it is. Every error was once "not yet": a connection that failed for good
 * showed as "cross-site demo traffic not ready after 90 s", 90 s later and without its cause.
 */
export async function waitUntil(
  what: string,
  check: () => Promise<boolean>,
  timeoutMs: number,
  intervalMs = 250,
): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    if (await check()) return
    await new Promise((r) => setTimeout(r, intervalMs))
  }
  throw new Error(`${what} not ready after ${timeoutMs / 1000} s`)
}
