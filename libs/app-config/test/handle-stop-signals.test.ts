import assert from "node:assert/strict"
import { spawn } from "node:child_process"
import { once } from "node:events"
import { test } from "node:test"
import { fileURLToPath } from "node:url"

const fixture = fileURLToPath(new URL("./fixtures/stop-fails.ts", import.meta.url))

test("a graceful stop that throws ends the process with 1 and a line saying so, not a stack trace", async () => {
  const child = spawn(process.execPath, ["--import", "tsx", fixture], {
    stdio: ["ignore", "pipe", "pipe"],
  })
  let out = ""
  let err = ""
  child.stdout.on("data", (d) => {
    out += d
  })
  child.stderr.on("data", (d) => {
    err += d
  })
  while (!out.includes("ready")) await once(child.stdout, "data")
  child.kill("SIGTERM")
  const [code] = (await once(child, "exit")) as [number | null]
  assert.equal(code, 1)
  const lines = out
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l))
  assert.deepEqual(
    lines.find((l) => l.level === "error"),
    {
      level: "error",
      message: "fixture stop failed",
      signal: "SIGTERM",
      error: "pool end refused",
    },
  )
  assert.doesNotMatch(err, /at .*\(/, "no stack trace")
})
