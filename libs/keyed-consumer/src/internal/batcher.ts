/**
 * Gathers the requests that arrive while a batch is in flight into the next batch. The first
 * request after a quiet spell goes out alone and at once; under load one round trip serves
 * many. There is no timer, so batching adds no latency of its own: a request waits at most
 * for the batches ahead of it, as in a database's group commit.
 *
 * Why the consumer needs it: a worker drains up to `concurrency` keys at once, and with one
 * claim, one completion transaction and one re-check per key it spent a third of its CPU in
 * socket writes, on the same two cores as Postgres (`just bench pipeline`, profiled).
 */
export class Batcher<In, Out> {
  private waiting: {
    item: In
    resolve: (value: Out) => void
    reject: (reason: unknown) => void
  }[] = []
  private inFlight = 0

  /**
   * @param run one round trip for a batch: a result per item, in order. A rejected item
   *   fails alone; a thrown error fails the whole batch.
   */
  constructor(
    private readonly run: (items: In[]) => Promise<PromiseSettledResult<Out>[]>,
    private readonly maxBatch: number,
    private readonly maxInFlight = 1,
  ) {}

  submit(item: In): Promise<Out> {
    return new Promise<Out>((resolve, reject) => {
      this.waiting.push({ item, resolve, reject })
      this.pump()
    })
  }

  private pump(): void {
    while (this.inFlight < this.maxInFlight && this.waiting.length > 0) {
      const batch = this.waiting.splice(0, this.maxBatch)
      this.inFlight++
      this.run(batch.map((b) => b.item))
        .then(
          (results) =>
            batch.forEach((b, n) => {
              const r = results[n]
              if (r?.status === "fulfilled") b.resolve(r.value)
              else b.reject(r ? r.reason : new Error("batch returned no result for this item"))
            }),
          (err) => {
            for (const b of batch) b.reject(err)
          },
        )
        .finally(() => {
          this.inFlight--
          this.pump()
        })
    }
  }
}
