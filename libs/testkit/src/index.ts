export { createTcpProxy, type TcpProxy, type TcpProxyTarget } from "./create-tcp-proxy.ts"
export {
  createTestDatabase,
  type TestDatabase,
  type TestDatabaseOptions,
} from "./create-test-database.ts"
export { freePort } from "./free-port.ts"
export { ServerStartError } from "./server-start-error.ts"
export { spawnTs, type TsChild } from "./spawn-ts.ts"
export {
  checkNatsConfig,
  type NatsServerHandle,
  type NatsServerOptions,
  startNatsServer,
} from "./start-nats-server.ts"
export {
  type RedisServerHandle,
  type RedisServerOptions,
  startRedisServer,
} from "./start-redis-server.ts"
export { type WaitForOptions, WaitForTimeoutError, waitFor } from "./wait-for.ts"
