/** What JetStream's stream info says of one source (`StreamSourceInfo`, the fields used). */
export interface SourceState {
  /** Messages the source holds that this stream has not copied yet, as far as it can see. */
  lag: number
  /** Nanoseconds since this stream last heard from the source; -1 if it never has. */
  active: number
}

/**
 * The worst of a stream's sources, for the leaf-link gauges: the longest silence (+Inf for a
 * source never heard from, which is the state of a link that never came up) and the lag of
 * all of them together. A stream without sources reports 0 and 0: nothing to wait for.
 */
export function summariseSources(sources: readonly SourceState[]): {
  idleSeconds: number
  lag: number
} {
  let idleSeconds = 0
  let lag = 0
  for (const s of sources) {
    idleSeconds = Math.max(idleSeconds, s.active < 0 ? Number.POSITIVE_INFINITY : s.active / 1e9)
    lag += s.lag
  }
  return { idleSeconds, lag }
}
