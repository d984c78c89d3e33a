export { ConfigError, type Env, intEnv, metricsPortEnv, requiredEnv, urlEnv } from "./env.ts"
