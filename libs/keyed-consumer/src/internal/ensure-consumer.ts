import {
  AckPolicy,
  type ConsumerConfig,
  DeliverPolicy,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
} from "@nats-io/jetstream"

export interface DurableOptions {
  stream: string
  group: string
  filterSubject?: string
  startPosition: "all" | "new"
  ackWaitMs: number
  maxAckPending: number
  /** The most messages one pull asks for: consume()'s max_messages. */
  pullBatch: number
}

/**
 * A group's durable that exists already and that the group cannot work with, made by hand or
 * by another tool. Permanent: waiting does not mend it.
 */
export class DurableRefusedError extends Error {
  override name = "DurableRefusedError"
  readonly permanent = true
}

/** What in an existing durable's config keeps the group from ingesting right, one line each. */
export function unusableDurable(config: ConsumerConfig, o: DurableOptions): string[] {
  const out: string[] = []
  // With `all`, one worker's ack would cover what another has not stored yet; with `none`
  // nothing is redelivered after a crash.
  if (config.ack_policy !== AckPolicy.Explicit) {
    out.push(`its ack policy is ${config.ack_policy}, not explicit`)
  }
  if (config.deliver_subject) out.push("it is a push consumer, not a pull one")
  // nats-server answers every larger pull with 409 Exceeded MaxRequestBatch, and nats.js
  // waits on: nothing is ingested, and no error says why.
  if ((config.max_batch ?? 0) > 0 && config.max_batch! < o.pullBatch) {
    out.push(`its max_batch ${config.max_batch} is below the ${o.pullBatch} a pull asks for`)
  }
  // A message delivered that often without an ack (Postgres away, workers crashing) is never
  // delivered again: never stored, its version is a gap its key waits on for good.
  if ((config.max_deliver ?? -1) > 0) {
    out.push(
      `its max_deliver ${config.max_deliver} gives up on a message the group has not stored yet: its key would wait on it for ever`,
    )
  }
  // A worker takes what it is given into its buffer while Postgres is away: the durable's
  // bound on unacked messages is the bound on that buffer.
  if ((config.max_ack_pending ?? 1) <= 0) {
    out.push(
      "its max_ack_pending is unlimited: a worker would buffer everything the stream holds while Postgres is away",
    )
  }
  // Kept as it is, another filter would have the group take what this worker was told not to
  // (the generic worker refuses a group without one for that reason), or miss what it wants.
  if (o.filterSubject !== undefined && (config.filter_subject ?? "") !== o.filterSubject) {
    out.push(
      `its filter is ${JSON.stringify(config.filter_subject ?? "")}, not the ${JSON.stringify(o.filterSubject)} asked for`,
    )
  }
  return out
}

/**
 * Creates the group's durable pull consumer if it does not exist, and says whether it did, and
 * the durable's ack_wait. An
 * existing one is left as it is: its deliver policy only means something at creation, and
 * changing its filter would silently change what the group sees. One the group cannot work
 * with (unusableDurable) is refused, by name.
 */
export async function ensureDurable(
  jsm: JetStreamManager,
  o: DurableOptions,
): Promise<{ created: boolean; ackWaitMs: number }> {
  try {
    const info = await jsm.consumers.info(o.stream, o.group)
    const unusable = unusableDurable(info.config, o)
    if (unusable.length > 0) {
      throw new DurableRefusedError(
        `the group's durable consumer ${o.group} on stream ${o.stream} exists, but ${unusable.join("; ")}: delete it (nats consumer rm) so the worker makes it afresh, or fix it by hand`,
      )
    }
    // Its own, which may not be the one this worker would have made it with.
    return { created: false, ackWaitMs: (info.config.ack_wait ?? 0) / 1e6 || o.ackWaitMs }
  } catch (err) {
    if (err instanceof DurableRefusedError) throw err
    if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.ConsumerNotFound)) {
      throw err
    }
  }
  const config: Partial<ConsumerConfig> = {
    durable_name: o.group,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: o.startPosition === "all" ? DeliverPolicy.All : DeliverPolicy.New,
    ack_wait: o.ackWaitMs * 1e6,
    // The server stops delivering past this many unacked messages: the ingest buffer's bound.
    max_ack_pending: o.maxAckPending,
  }
  if (o.filterSubject) config.filter_subject = o.filterSubject
  await jsm.consumers.add(o.stream, config)
  return { created: true, ackWaitMs: o.ackWaitMs }
}
