/**
 * The value of KEYWAY_LEAF_REMOTE_URL for nats/leaf.conf: the hub's leafnode URL with the
 * link user's credentials in it.
 *
 * nats-server 2.9.10 takes a leaf remote's user and password only from the URL's user info
 * (no `user`/`password` keys on a remote, no remote nkey) and substitutes a config variable
 * only as a whole value, so the config cannot join KEYWAY_HUB_LEAF_URL and
 * KEYWAY_PASS_LEAF_FACTORY itself: whoever starts the leaf does it with this function. The
 * server shows only the host of a remote (logs, /varz), so the password stays out of sight
 * as long as the launcher does not print its environment.
 */
export function leafRemoteUrl(hubLeafUrl: string, user: string, password: string): string {
  const url = new URL(hubLeafUrl)
  if (url.protocol !== "nats-leaf:" && url.protocol !== "tls:" && url.protocol !== "nats:") {
    throw new Error(`${hubLeafUrl}: expected a nats-leaf:// URL`)
  }
  if (url.username || url.password) {
    throw new Error("the hub's leaf URL must not carry credentials; pass them separately")
  }
  url.username = encodeURIComponent(user)
  url.password = encodeURIComponent(password)
  return url.toString()
}
