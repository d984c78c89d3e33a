export { ConfigError, type Env, intEnv, metricsPortEnv, requiredEnv, urlEnv } from "./env.ts"
export { type RetryUntilReadyOptions, retryUntilReady } from "./retry-until-ready.ts"
