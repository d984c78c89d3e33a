import type { NatsConnection } from "@nats-io/transport-node"

/**
 * Ends a connection at shutdown. Drain first: it lets the subscriptions' messages in hand be
 * processed and flushes what was published. With the server away, drain() rejects
 * ("connection disconnected") or waits on a flush that cannot happen; either way a process
 * on its way out would crash or hang there, so the connection is then closed instead. What a
 * drain would have flushed is not lost: nothing Keyway publishes counts as sent before its
 * acknowledgement. The default 2 s keeps a worker's whole shutdown (its handlers' grace,
 * then this) within pm2's kill timeout.
 */
export async function closeNats(nc: NatsConnection, timeoutMs = 2000): Promise<void> {
  if (nc.isClosed()) return
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), timeoutMs)
  })
  const drained = await Promise.race([
    nc.drain().then(
      () => true,
      () => false,
    ),
    timeout,
  ])
  clearTimeout(timer)
  if (!drained && !nc.isClosed()) await nc.close()
}
