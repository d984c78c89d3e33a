export { ConfigError, type Env, intEnv, requiredEnv, urlEnv } from "./env.ts"
