// `just bench <name>`: one entry point for every benchmark. Each prints a table for people
// and, as its last line, one JSON object for machines.
const benches: Record<string, () => Promise<void>> = {
  relay: async () => (await import("./relay.ts")).run(),
  pipeline: async () => (await import("./pipeline.ts")).run(),
  esl: async () => (await import("./esl.ts")).run(),
  link: async () => (await import("./link.ts")).run(),
  memory: async () => (await import("./memory.ts")).run(),
  "safety-nets": async () => (await import("./safety-nets.ts")).run(),
}

const name = process.argv[2] ?? ""
const bench = benches[name]
if (!bench) {
  console.error(
    `unknown benchmark ${JSON.stringify(name)}; one of: ${Object.keys(benches).join(", ")}`,
  )
  process.exit(2)
}
await bench()
process.exit(0)
