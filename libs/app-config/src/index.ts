export {
  ConfigError,
  type Env,
  intEnv,
  metricsPortEnv,
  type NatsClientEnv,
  natsAuthEnv,
  natsClientEnv,
  natsServersEnv,
  parsePositiveInt,
  perSecondEnv,
  postgresUrlEnv,
  redisUrlEnv,
  requiredEnv,
  type TelemetryEnv,
  telemetryEnv,
  urlEnv,
} from "./env.ts"
export {
  handleStopSignals,
  type StopSignals,
  type StopSignalsOptions,
} from "./handle-stop-signals.ts"
export {
  describeError,
  type RetryUntilReadyOptions,
  retryUntilReady,
} from "./retry-until-ready.ts"
