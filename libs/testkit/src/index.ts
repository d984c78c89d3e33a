export { createTcpProxy, type TcpProxy, type TcpProxyTarget } from "./create-tcp-proxy.ts"
export {
  createTestDatabase,
  type TestDatabase,
  type TestDatabaseOptions,
} from "./create-test-database.ts"
export { findPromtool } from "./find-promtool.ts"
export { freePort } from "./free-port.ts"
export { gate } from "./gate.ts"
export { metricValue } from "./metric-value.ts"
export { ServerStartError } from "./server-start-error.ts"
export { type SpawnTsOptions, spawnTs, type TsChild } from "./spawn-ts.ts"
export {
  type FailureRates,
  type FakeAims,
  type FakeAimsOptions,
  type FakeAimsOutcome,
  type FakeAimsPush,
  startFakeAims,
} from "./start-fake-aims.ts"
export {
  type ConfigNatsServerHandle,
  type ConfigNatsServerOptions,
  checkNatsConfigWith,
  startNatsFromConfig,
} from "./start-nats-from-config.ts"
export {
  checkNatsConfig,
  type NatsServerHandle,
  type NatsServerOptions,
  startNatsServer,
} from "./start-nats-server.ts"
export { type OtlpReceiver, type ReceivedSpan, startOtlpReceiver } from "./start-otlp-receiver.ts"
export {
  type RedisServerHandle,
  type RedisServerOptions,
  startRedisServer,
} from "./start-redis-server.ts"
export { createTestStream, readStream, streamCount } from "./test-streams.ts"
export { type WaitForOptions, WaitForTimeoutError, waitFor } from "./wait-for.ts"
