import { readdirSync, readFileSync } from "node:fs"

/** Nearest-rank percentile of an unsorted sample. */
export function percentile(sample: readonly number[], p: number): number {
  if (sample.length === 0) return Number.NaN
  const sorted = [...sample].sort((a, b) => a - b)
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))
  return sorted[rank]!
}

/** Wall-clock ms at performance.now() 0, read on a tick of Date.now() (to a few µs). */
export function wallClockOffset(): number {
  const last = Date.now()
  let now = last
  while (now === last) now = Date.now()
  return now - performance.now()
}

/**
 * Wall-clock ms, for times that two processes compare (a commit in one, its handling in
 * another). performance.timeOrigin places the monotonic clock on the wall clock to a ms or two
 * only, differently in each process (measured: 1.0-1.6 ms off), against latencies of a few ms.
 */
export function wallClock(): () => number {
  const offset = wallClockOffset()
  return () => offset + performance.now()
}

/**
 * A benchmark's knob from the environment, or its default. A value that is not a positive
 * whole number is refused by name: read with Number(), BENCH_EVENTS=abc wrote nothing, found its
 * NaN effects at once, and printed a table of nulls.
 */
export function benchKnob(name: string, fallback: number): number {
  const raw = process.env[name]
  if (raw === undefined || raw === "") return fallback
  // Every knob is a count or milliseconds: whole numbers, in decimal digits.
  const value = /^[0-9]+$/.test(raw) ? Number(raw) : Number.NaN
  if (!Number.isSafeInteger(value) || value <= 0) {
    throw new Error(`${name}=${JSON.stringify(raw)}: expected a positive whole number`)
  }
  return value
}

/**
 * A note for a latency measured at a steady rate: the rate the writers reached, and a
 * warning when they fell short of it (each waits for its own commit, so a slow one delays
 * the next), since a tail measured at a lower rate than asked is not the one asked for.
 */
export function offeredNote(asked: number, offered: readonly number[]): string {
  const short = offered.some((o) => o < 0.97 * asked)
  return `${asked} events/s asked, ${offered.map((o) => Math.round(o)).join(" / ")} offered${short ? " (SHORT of the rate asked: that tail is at the rate offered)" : ""}`
}

export const round = (n: number, digits = 1) => Math.round(n * 10 ** digits) / 10 ** digits

/** "1 worker process", "2 worker processes": for the tables' notes. */
export const workerProcessCount = (n: number) => `${n} worker process${n === 1 ? "" : "es"}`

/** Prints rows as an aligned table. */
export function printTable(rows: readonly (readonly (string | number)[])[]): void {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => String(r[c]).length)))
  for (const row of rows) {
    console.log(row.map((cell, c) => String(cell).padEnd(widths[c]!)).join("  "))
  }
}

/** Runs `workers` loops of `body` until `ms` elapse; returns completed iterations per second. */
export async function rate(workers: number, ms: number, body: (worker: number) => Promise<void>) {
  const end = performance.now() + ms
  let done = 0
  const started = performance.now()
  await Promise.all(
    Array.from({ length: workers }, async (_, w) => {
      while (performance.now() < end) {
        await body(w)
        done++
      }
    }),
  )
  return done / ((performance.now() - started) / 1000)
}

/**
 * CPU time the whole machine spent busy so far, in ms (user, system, irq; not idle, iowait or
 * steal), from /proc/stat. Benchmarks here run every part on the same two cores, so the
 * cost of one event is best read as the machine's CPU per event.
 */
export function machineBusyMs(): number {
  // The first line: "cpu  user nice system idle iowait irq softirq steal …".
  const cpu = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!
  const [user, nice, system, , , irq, softirq] = cpu.trim().split(/\s+/).slice(1).map(Number)
  // USER_HZ is 100 on Linux: ticks of 10 ms.
  return (user! + nice! + system! + irq! + softirq!) * 10
}

/** One labelled Prometheus histogram's series: cumulative bucket counts, sum and count. */
export interface HistogramSeries {
  /** [upper bound, cumulative count], in increasing bound order, ending with +Inf. */
  buckets: [number, number][]
  sum: number
  count: number
}

/**
 * The series of histogram `name` in a Prometheus text exposition, by the value of `label`:
 * what a process's registry renders, read back without a Prometheus server.
 */
export function readHistogram(
  exposition: string,
  name: string,
  label: string,
): Record<string, HistogramSeries> {
  const series: Record<string, HistogramSeries> = {}
  const of = (value: string) => {
    series[value] ??= { buckets: [], sum: 0, count: 0 }
    return series[value]
  }
  for (const line of exposition.split("\n")) {
    const m = /^(\w+)\{([^}]*)\} (\S+)$/.exec(line)
    if (!m || !m[1]!.startsWith(name)) continue
    const labels = Object.fromEntries(
      [...m[2]!.matchAll(/(\w+)="([^"]*)"/g)].map(([, k, v]) => [k!, v!]),
    )
    const value = labels[label]
    if (value === undefined) continue
    const suffix = m[1]!.slice(name.length)
    const n = Number(m[3])
    if (suffix === "_bucket")
      of(value).buckets.push([
        labels.le === "+Inf" ? Number.POSITIVE_INFINITY : Number(labels.le),
        n,
      ])
    else if (suffix === "_sum") of(value).sum = n
    else if (suffix === "_count") of(value).count = n
  }
  for (const s of Object.values(series)) s.buckets.sort((a, b) => a[0] - b[0])
  return series
}

/** What `later` added to `earlier`: the observations made between two reads. */
export function histogramDelta(earlier: HistogramSeries | undefined, later: HistogramSeries) {
  return {
    buckets: later.buckets.map(([le, n], i): [number, number] => [
      le,
      n - (earlier?.buckets[i]?.[1] ?? 0),
    ]),
    sum: later.sum - (earlier?.sum ?? 0),
    count: later.count - (earlier?.count ?? 0),
  }
}

/** The sums of several processes' series, bucket by bucket (they share bucket bounds). */
export function histogramTotal(all: HistogramSeries[]): HistogramSeries {
  return {
    buckets: all[0]!.buckets.map(([le], i): [number, number] => [
      le,
      all.reduce((n, s) => n + (s.buckets[i]?.[1] ?? 0), 0),
    ]),
    sum: all.reduce((n, s) => n + s.sum, 0),
    count: all.reduce((n, s) => n + s.count, 0),
  }
}

/**
 * The upper bound of the bucket that holds the p-th percentile: a histogram knows no more
 * than that. +Inf when it lies past the last finite bound.
 */
export function bucketPercentile(series: HistogramSeries, p: number): number {
  const rank = (p / 100) * series.count
  return series.buckets.find(([, n]) => n >= rank)?.[0] ?? Number.POSITIVE_INFINITY
}

/** CPU time a process has used so far (user and system), in ms; undefined once it has exited. */
export function processCpuMs(pid: number): number | undefined {
  let stat: string
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8")
  } catch {
    return undefined
  }
  // The fields after the command name, which may itself hold spaces and parentheses; utime
  // and stime are the 14th and 15th of the line, in USER_HZ ticks of 10 ms.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
  return (Number(fields[11]) + Number(fields[12])) * 10
}

/** A process's command name (/proc/<pid>/comm); undefined once it has exited. */
export function processName(pid: number | string): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/comm`, "utf8").trim()
  } catch {
    return undefined
  }
}

/** Pids of the running processes whose command name (/proc/<pid>/comm) is `name`. */
export function pidsNamed(name: string): number[] {
  return readdirSync("/proc").flatMap((entry) =>
    /^\d+$/.test(entry) && processName(entry) === name ? [Number(entry)] : [],
  )
}

/**
 * CPU used between start() and stop() by processes grouped under labels, and by the whole
 * machine over the same window. `labels` is asked again at every sample, so processes that
 * appear meanwhile (a pool opening connections) are counted from their start, and one that
 * exits keeps what it had used at its last sample.
 */
export class CpuByLabel {
  readonly #labels: () => Promise<Map<number, string>>
  readonly #everyMs: number
  readonly #first = new Map<number, number>()
  readonly #last = new Map<number, { label: string; ms: number }>()
  #machineFirst = 0
  #sampling: Promise<void> | undefined
  #stopped = false
  #wake: (() => void) | undefined
  #error: unknown
  #result: Promise<{ byLabel: Map<string, number>; machineMs: number }> | undefined

  constructor(labels: () => Promise<Map<number, string>>, everyMs = 250) {
    this.#labels = labels
    this.#everyMs = everyMs
  }

  async #sample(initial: boolean) {
    for (const [pid, label] of await this.#labels()) {
      const ms = processCpuMs(pid)
      if (ms === undefined) continue
      if (!this.#first.has(pid)) this.#first.set(pid, initial ? ms : 0)
      this.#last.set(pid, { label, ms })
    }
  }

  async start() {
    // The machine's window encloses the processes' (machine first at the start, last at the
    // stop), so that their sum cannot exceed it and leave "the rest" below zero.
    this.#machineFirst = machineBusyMs()
    await this.#sample(true)
    this.#sampling = (async () => {
      while (!this.#stopped) {
        await new Promise<void>((r) => {
          this.#wake = r
          setTimeout(r, this.#everyMs)
        })
        if (this.#stopped) return
        // Kept for stop() to throw: a failed sample must not become an unhandled rejection.
        await this.#sample(false).catch((err) => {
          this.#error ??= err
        })
      }
    })()
  }

  /**
   * CPU ms used per label since start(), and by the whole machine (see machineBusyMs). Calls
   * after the first return the first one's figures.
   */
  stop(): Promise<{ byLabel: Map<string, number>; machineMs: number }> {
    this.#result ??= this.#finish()
    return this.#result
  }

  async #finish() {
    this.#stopped = true
    this.#wake?.()
    await this.#sampling
    await this.#sample(false)
    const machineMs = machineBusyMs() - this.#machineFirst
    if (this.#error !== undefined) throw this.#error
    const byLabel = new Map<string, number>()
    for (const [pid, { label, ms }] of this.#last) {
      byLabel.set(label, (byLabel.get(label) ?? 0) + ms - this.#first.get(pid)!)
    }
    return { byLabel, machineMs }
  }
}
