import { readFileSync } from "node:fs"

/** Nearest-rank percentile of an unsorted sample. */
export function percentile(sample: readonly number[], p: number): number {
  if (sample.length === 0) return Number.NaN
  const sorted = [...sample].sort((a, b) => a - b)
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))
  return sorted[rank]!
}

export const round = (n: number, digits = 1) => Math.round(n * 10 ** digits) / 10 ** digits

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
