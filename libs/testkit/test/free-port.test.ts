import assert from "node:assert/strict"
import { readFile } from "node:fs/promises"
import { createServer } from "node:net"
import { test } from "node:test"
import { freePort } from "../src/index.ts"

test("freePort returns a bindable port below the ephemeral range", async () => {
  const port = await freePort()
  const [ephemeralLow] = (await readFile("/proc/sys/net/ipv4/ip_local_port_range", "utf8"))
    .trim()
    .split(/\s+/)
    .map(Number)
  assert.ok(port < ephemeralLow!, `${port} is in the ephemeral range`)
  const server = createServer()
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject)
    server.listen(port, "127.0.0.1", resolve)
  })
  await new Promise((resolve) => server.close(resolve))
})
