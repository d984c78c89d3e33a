export {
  type BoundedLabels,
  type CollectedOptions,
  type CounterMetric,
  createMetricsRegistry,
  type GaugeMetric,
  type HistogramMetric,
  type HistogramOptions,
  LATENCY_BUCKETS,
  type MetricOptions,
  MetricsError,
  type MetricsRegistry,
  type MetricsRegistryConfig,
  type NoLabels,
  oldestAnswerSeconds,
  perScrape,
  SCRAPE_READ_TIMEOUT_MS,
  type ScrapeRead,
} from "./create-metrics-registry.ts"
export {
  createMetricsServer,
  type MetricsServer,
  type MetricsServerConfig,
  metricsHandler,
  serveMetrics,
} from "./create-metrics-server.ts"
export {
  startTelemetry,
  type Telemetry,
  type TelemetryConfig,
  TelemetryError,
} from "./start-telemetry.ts"
