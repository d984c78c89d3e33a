// `just streams <site>`: create or update the streams declared in nats/streams/<site>.json.
import { applyStreams, connectNats, loadStreamDefinitions } from "@keyway/nats"
import { jetstreamManager } from "@nats-io/jetstream"

const file = process.argv[2]
if (!file) {
  console.error("usage: streams <nats/streams/SITE.json>")
  process.exit(2)
}
const definitions = await loadStreamDefinitions(file)
// A site's admin user when its server has accounts (nats/README.md), as in ops/compose.
const nc = await connectNats({
  servers: (process.env.NATS_URL ?? "nats://127.0.0.1:4222").split(","),
  user: process.env.NATS_USER || undefined,
  pass: process.env.NATS_PASS || undefined,
  inboxPrefix: process.env.NATS_INBOX_PREFIX || undefined,
})
try {
  await applyStreams(await jetstreamManager(nc), definitions)
  console.log(`applied: ${definitions.map((d) => d.name).join(", ")}`)
} finally {
  await nc.close()
}
