// `just streams <site>`: create or update the streams declared in nats/streams/<site>.json.
// Whatever goes wrong ends it with one line naming the cause: 2 for what the operator gave
// (the file, NATS_URL), 1 for what the server said or did; a server not up yet is waited for.
import { describeError, retryUntilReady } from "@keyway/app-config"
import { applyStreams, connectNats, loadStreamDefinitions } from "@keyway/nats"
import { jetstreamManager } from "@nats-io/jetstream"
import { ConfigError, parseConfig, type StreamsAppConfig } from "./config.ts"

function fail(code: number, message: string): never {
  console.error(`streams: ${message}`)
  process.exit(code)
}

const file = process.argv[2]
if (!file || process.argv.length > 3 || file.startsWith("-")) {
  fail(
    2,
    "usage: streams <nats/streams/SITE.json> (NATS_URL, NATS_USER, NATS_PASS from the environment)",
  )
}
let config: StreamsAppConfig
try {
  config = parseConfig(process.env)
} catch (err) {
  if (!(err instanceof ConfigError)) throw err
  fail(2, err.message)
}
const servers = config.natsServers
const definitions = await loadStreamDefinitions(file).catch((err) =>
  fail(2, `cannot read ${file}: ${describeError(err)}`),
)
// A site's admin user when its server has accounts (nats/README.md), as in ops/compose. A
// server not up yet is waited for (compose starts this beside NATS, which may still be
// recovering its store), saying so on every try; a refused password ends it at once.
const nc = await retryUntilReady(
  () =>
    connectNats({
      servers,
      user: config.natsUser,
      pass: config.natsPass,
      inboxPrefix: config.natsInboxPrefix,
      waitForServer: false,
    }),
  {
    what: `NATS at ${servers.length} server(s)`,
    log: (message, fields) => console.error(`streams: ${message}: ${fields.error}`),
  },
).catch((err) => fail(1, `cannot connect to NATS: ${describeError(err)}`))
try {
  // Connected is not ready: JetStream answers only once it has recovered its store, or
  // elected its leaders in a cluster (503 meanwhile). Waited for as the relay does; what the
  // server refuses ends it at once.
  await retryUntilReady(async () => applyStreams(await jetstreamManager(nc), definitions), {
    what: "JetStream",
    log: (message, fields) => console.error(`streams: ${message}: ${fields.error}`),
  })
  console.log(`applied: ${definitions.map((d) => d.name).join(", ")}`)
} catch (err) {
  console.error(`streams: ${describeError(err)}`)
  process.exitCode = 1
} finally {
  await nc.close()
}
