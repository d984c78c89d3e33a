/** The message of whatever was thrown, for logs and reasons. */
export const errorMessage = (err: unknown) => (err instanceof Error ? err.message : String(err))
