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
}

export interface PublishedRow {
  seq: number
  streamSeq: number
  duplicate: boolean
}
