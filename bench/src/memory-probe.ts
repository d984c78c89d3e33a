// Loaded into each process `just bench memory` measures (node --expose-gc --import): on
// SIGUSR2 it runs a full collection and prints, as one JSON line, what the process still
// holds. The resident set alone cannot say whether memory follows the backlog: V8 lets its
// heap grow under a sustained allocation rate and collects lazily, so a longer run peaks
// higher with nothing more alive.
const gc = (globalThis as { gc?: () => void }).gc
if (!gc) throw new Error("memory-probe needs node --expose-gc")
process.on("SIGUSR2", () => {
  gc()
  const m = process.memoryUsage()
  console.log(
    JSON.stringify({
      memoryProbe: { heapUsed: m.heapUsed, external: m.external, rss: m.rss },
    }),
  )
})
