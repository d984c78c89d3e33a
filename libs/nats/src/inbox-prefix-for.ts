/**
 * The inbox prefix a Keyway NATS user must connect with (`connectNats({ inboxPrefix })`):
 * the server configs in nats/ let each user subscribe only under its own prefix, so a
 * client using the default `_INBOX` gets a permission error on its first request.
 */
export function inboxPrefixFor(user: string): string {
  return `_INBOX_${user}`
}
