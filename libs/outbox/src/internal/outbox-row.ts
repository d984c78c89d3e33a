/** An outbox row as the relay claims it. */
export interface OutboxRow {
  seq: number
  topic: string
  key: string
  ver: number
  type: string
  payload: unknown
  trace: Record<string, string> | null
  created_at: Date
  /** Where an earlier publish put it: set on rows marked unpublished again to be re-sent. */
  stream_seq: number | null
}

export interface PublishedRow {
  seq: number
  streamSeq: number
  duplicate: boolean
}
