import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client"

/**
 * Label names with every value they may take. Prometheus keeps one series per label
 * combination for ever, so a label fed a MAC or an IMEI grows the server without bound
 * (DESIGN.md §7). Declaring the values up front makes that mistake an error at the call
 * site instead of an outage weeks later.
 */
export type BoundedLabels = Record<string, readonly string[]>

/** A metric without labels. */
export type NoLabels = Record<never, readonly string[]>

export interface MetricOptions<L extends BoundedLabels> {
  name: string
  help: string
  labels?: L
}

/**
 * A metric read from a value its owner already keeps (a running total, a queue length, a
 * database count), when Prometheus scrapes rather than on every change. Without labels.
 */
export interface CollectedOptions {
  name: string
  help: string
  /** For a counter, the running total since the process started; for a gauge, the value. */
  collect: () => number | undefined | Promise<number | undefined>
}

export interface HistogramOptions<L extends BoundedLabels> extends MetricOptions<L> {
  /** Upper bounds in the metric's unit (seconds for durations). */
  buckets?: number[]
}

type Values<L extends BoundedLabels> = { [K in keyof L]: L[K][number] }

export interface CounterMetric<L extends BoundedLabels> {
  inc(labels?: Partial<Values<L>>, by?: number): void
}
export interface GaugeMetric<L extends BoundedLabels> {
  set(value: number, labels?: Partial<Values<L>>): void
  inc(labels?: Partial<Values<L>>, by?: number): void
  dec(labels?: Partial<Values<L>>, by?: number): void
}
export interface HistogramMetric<L extends BoundedLabels> {
  observe(value: number, labels?: Partial<Values<L>>): void
}

export interface MetricsRegistryConfig {
  /** Added to every metric name, e.g. `keyway_`. */
  prefix?: string
  /** Process metrics (CPU, memory, event-loop lag, GC). Default true. */
  defaultMetrics?: boolean
}

export interface MetricsRegistry {
  counter<const L extends BoundedLabels = NoLabels>(options: MetricOptions<L>): CounterMetric<L>
  gauge<const L extends BoundedLabels = NoLabels>(options: MetricOptions<L>): GaugeMetric<L>
  histogram<const L extends BoundedLabels = NoLabels>(
    options: HistogramOptions<L>,
  ): HistogramMetric<L>
  /**
   * A counter fed by a running total; `collect` returning undefined leaves it as it was.
   * Returns what takes it off the registry: its owner's values must not outlive the owner, and
   * an owner made again after it (a consumer after stop()) registers the name anew. A name
   * that another owner still reports is refused.
   */
  collectedCounter(options: CollectedOptions): () => void
  /** A gauge set at each scrape; otherwise as {@link collectedCounter}. */
  collectedGauge(options: CollectedOptions): () => void
  /** The exposition text and its content type, for a `/metrics` response. */
  render(): Promise<{ contentType: string; body: string }>
}

export class MetricsError extends Error {
  override name = "MetricsError"
}

/**
 * Latency buckets in seconds, 1 ms to 4 h: a vendor call, and a whole pipeline through a leaf
 * link cut for hours or a task retried for two. Topped at 30 s, every such value fell in
 * +Inf, and histogram_quantile() reported 30 s for an outage's p99 of hours.
 */
export const LATENCY_BUCKETS = [
  0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600,
  14400,
]

/** A Prometheus registry of its own (never prom-client's global one) with bounded labels. */
export function createMetricsRegistry(config: MetricsRegistryConfig = {}): MetricsRegistry {
  const registry = new Registry()
  const prefix = config.prefix ?? ""
  if (config.defaultMetrics ?? true) collectDefaultMetrics({ register: registry, prefix })

  const checker = (metric: string, allowed: BoundedLabels | undefined) => {
    const sets = new Map(Object.entries(allowed ?? {}).map(([k, v]) => [k, new Set(v)]))
    return (labels: Record<string, string> | undefined) => {
      if (!labels) return {}
      for (const [name, value] of Object.entries(labels)) {
        const set = sets.get(name)
        if (!set) throw new MetricsError(`${metric}: undeclared label ${name}`)
        if (!set.has(value)) {
          throw new MetricsError(
            `${metric}: label ${name}=${JSON.stringify(value)} is not one of its declared values`,
          )
        }
      }
      return labels
    }
  }

  // Metrics updated as things happen are shared by name: a second owner of the same kind (a
  // consumer made again after stop(), two in one process) adds to the series the first began.
  // Made anew, the name was refused as registered already.
  const shared = new Map<string, { kind: string; labels: string; metric: unknown }>()
  const sharedMetric = <M>(
    Kind: new (config: any) => M,
    options: MetricOptions<BoundedLabels>,
    extra: Record<string, unknown> = {},
  ): M => {
    const name = prefix + options.name
    const kind = Kind.name.toLowerCase()
    const labelNames = Object.keys(options.labels ?? {})
    const labels = JSON.stringify([...labelNames].sort())
    const known = shared.get(name)
    if (known) {
      if (known.kind !== kind || known.labels !== labels) {
        throw new MetricsError(
          `${name} is registered already as a ${known.kind} with labels ${known.labels}; asked for a ${kind} with ${labels}`,
        )
      }
      return known.metric as M
    }
    const metric = new Kind({
      name,
      help: options.help,
      labelNames,
      registers: [registry],
      ...extra,
    })
    shared.set(name, { kind, labels, metric })
    return metric
  }
  const collected = (name: string, make: () => void) => {
    if (registry.getSingleMetric(name)) {
      throw new MetricsError(
        `${name} is reported by another owner on this registry: stop that one first, or give each a registry (or prefix) of its own`,
      )
    }
    make()
    return () => registry.removeSingleMetric(name)
  }

  return {
    counter(options) {
      const check = checker(prefix + options.name, options.labels)
      const c = sharedMetric(Counter, options)
      return { inc: (labels, by = 1) => c.inc(check(labels as any), by) }
    },
    gauge(options) {
      const check = checker(prefix + options.name, options.labels)
      const g = sharedMetric(Gauge, options)
      return {
        set: (value, labels) => g.set(check(labels as any), value),
        inc: (labels, by = 1) => g.inc(check(labels as any), by),
        dec: (labels, by = 1) => g.dec(check(labels as any), by),
      }
    },
    histogram(options) {
      const check = checker(prefix + options.name, options.labels)
      const h = sharedMetric(Histogram, options, { buckets: options.buckets ?? LATENCY_BUCKETS })
      return { observe: (value, labels) => h.observe(check(labels as any), value) }
    },
    collectedCounter(options) {
      const name = prefix + options.name
      let last = 0
      return collected(name, () => {
        new Counter({
          name,
          help: options.help,
          registers: [registry],
          async collect() {
            const total = await options.collect()
            // A total that went down belongs to an owner that started again: count it afresh.
            if (total === undefined) return
            this.inc(total >= last ? total - last : total)
            last = total
          },
        })
      })
    },
    collectedGauge(options) {
      const name = prefix + options.name
      return collected(name, () => {
        new Gauge({
          name,
          help: options.help,
          registers: [registry],
          async collect() {
            const value = await options.collect()
            if (value !== undefined) this.set(value)
          },
        })
      })
    },
    async render() {
      return { contentType: registry.contentType, body: await registry.metrics() }
    },
  }
}

/** How long a scrape waits for a read by default: well inside Prometheus' 10 s timeout. */
export const SCRAPE_READ_TIMEOUT_MS = 2000

/** A read for collected metrics: see {@link perScrape}. */
export interface ScrapeRead<T> {
  (): Promise<T | undefined>
  /**
   * Seconds since a read last answered (since the read was made, before any has). A failed
   * read leaves the gauges fed by it as they were, with no sign of it on /metrics: the alerts
   * on them were blind through an outage of the database or NATS they read, while the
   * process still answered scrapes. Reported as a gauge of its own, it can be alerted on.
   */
  secondsSinceAnswer(): number
}

/**
 * One read shared by the collected metrics of a scrape: several gauges that come from one
 * query ask `read` once while a call is in flight, and a later scrape reads afresh. A failed
 * read gives undefined, which leaves each gauge as it was.
 *
 * A scrape waits for the read at most `timeoutMs`, then gives what the last read to finish
 * gave (undefined if none has, or it failed). A read that waits on a busy database (a
 * worker's pool taken by its drains, a locked table) otherwise held the whole /metrics
 * answer, counters included, until Prometheus gave up and reported the process down. The read
 * goes on, and the next scrape joins it rather than start another. Its answer, however late,
 * is what the next scrape that times out shows: a read that always takes longer than the
 * timeout (a count over an outbox of millions after an outage) was otherwise never shown,
 * and its gauge read 0 while the backlog grew.
 */
export function perScrape<T>(
  read: () => Promise<T>,
  timeoutMs = SCRAPE_READ_TIMEOUT_MS,
): ScrapeRead<T> {
  let current: Promise<T | undefined> | undefined
  let finished: T | undefined
  let answeredAt = performance.now()
  const scrapeRead = () => {
    current ??= read()
      .then((value) => {
        answeredAt = performance.now()
        return value
      })
      .catch(() => undefined)
      .then((value) => {
        finished = value
        return value
      })
      .finally(() => {
        current = undefined
      })
    let timer: NodeJS.Timeout | undefined
    const late = new Promise<T | undefined>((resolve) => {
      timer = setTimeout(() => resolve(finished), timeoutMs)
    })
    return Promise.race([current, late]).finally(() => clearTimeout(timer))
  }
  return Object.assign(scrapeRead, {
    secondsSinceAnswer: () => (performance.now() - answeredAt) / 1000,
  })
}

/**
 * Collects the age of the oldest answer among `reads` (see
 * {@link ScrapeRead.secondsSinceAnswer}), after asking each for this scrape: they are
 * shared, so the gauges fed by them read nothing twice.
 */
export async function oldestAnswerSeconds(reads: readonly ScrapeRead<unknown>[]): Promise<number> {
  await Promise.all(reads.map((r) => r()))
  return Math.max(...reads.map((r) => r.secondsSinceAnswer()))
}
