/** A server process did not become ready; the message ends with the tail of its log. */
export class ServerStartError extends Error {
  override name = "ServerStartError"

  constructor(message: string, logPath: string, logTail: string, options?: ErrorOptions) {
    super(`${message}\n--- ${logPath} (tail) ---\n${logTail.trimEnd()}`, options)
  }
}
