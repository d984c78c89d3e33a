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
}

/**
 * Creates the group's durable pull consumer if it does not exist, and says whether it did. An
 * existing one is left as it is: its deliver policy only means something at creation, and
 * changing its filter would silently change what the group sees.
 */
export async function ensureDurable(jsm: JetStreamManager, o: DurableOptions): Promise<boolean> {
  try {
    await jsm.consumers.info(o.stream, o.group)
    return false
  } catch (err) {
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
  return true
}
