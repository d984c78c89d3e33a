import { context, DiagLogLevel, diag, propagation } from "@opentelemetry/api"
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks"
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http"
import { resourceFromAttributes } from "@opentelemetry/resources"
import { core, NodeSDK } from "@opentelemetry/sdk-node"
import {
  AlwaysOnSampler,
  BatchSpanProcessor,
  ParentBasedSampler,
} from "@opentelemetry/sdk-trace-base"
import { ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION } from "@opentelemetry/semantic-conventions"

export interface TelemetryConfig {
  /** `service.name` of every span this process exports. */
  serviceName: string
  serviceVersion?: string
  /**
   * Base URL of an OTLP/HTTP receiver (Jaeger, a collector: `http://host:4318`); spans go to
   * `<otlpEndpoint>/v1/traces`. Without it no span is recorded, but W3C context is still
   * propagated, so a process without an exporter does not cut the traces through it.
   */
  otlpEndpoint?: string
  /** Extra resource attributes (`deployment.environment.name`, `keyway.site`, …). */
  resourceAttributes?: Record<string, string>
  /** How long spans wait in the batch before export. Default 1000 ms. */
  exportDelayMs?: number
  /** Most spans buffered while the receiver is slow or away; beyond it spans are dropped. Default 4096. */
  maxQueueSize?: number
  /**
   * How long shutdown() waits for the last spans to go out. Default 2000 ms: the exporter's
   * own timeout is 10 s, most of a process's stop budget (handleStopSignals), for spans that
   * a receiver which does not answer would not take anyway.
   */
  shutdownTimeoutMs?: number
  /**
   * Told what the SDK reports of its own trouble: a failed export (the receiver down, or
   * the wrong port), spans dropped from a full queue. Without it these go nowhere, and an
   * SRE finds traces missing with nothing saying why. The same report is passed on once a
   * minute at most, with how many were held back.
   */
  logger?: { warn(message: string, fields?: Record<string, unknown>): void }
}

export interface Telemetry {
  /** Whether spans are recorded and exported (an endpoint was given). */
  readonly exporting: boolean
  /** Exports every span ended so far. */
  forceFlush(): Promise<void>
  /** Flushes, then stops exporting. */
  shutdown(): Promise<void>
  [Symbol.asyncDispose](): Promise<void>
}

export class TelemetryError extends Error {
  override name = "TelemetryError"
}

let started = false

/**
 * Starts tracing for this process: the OpenTelemetry Node SDK with the OTLP/HTTP trace
 * exporter and W3C trace context + baggage propagation, registered globally, so the
 * `@opentelemetry/api` tracers of the Keyway libraries (outbox `send`, consumer `process`)
 * and of the app record into it. Call it once, first thing in `main.ts`, before work starts.
 *
 * Everything is passed explicitly; the app's config.ts reads the environment. Resource
 * detection from the environment (`OTEL_RESOURCE_ATTRIBUTES`, host, process) is off so
 * that what a process reports is what its config says.
 */
export function startTelemetry(config: TelemetryConfig): Telemetry {
  // The SDK registers global providers; a second start would silently replace the first.
  if (started) throw new TelemetryError("startTelemetry was already called in this process")
  if (!config.serviceName) throw new TelemetryError("serviceName is required")
  started = true
  const troubleTo = config.logger && sdkTroubleTo(config.logger)
  // Without suppressOverrideMessage, replacing the SDK's console logger (below) was itself
  // reported, to the logger given, as trouble.
  const reportTrouble = () =>
    troubleTo &&
    diag.setLogger(troubleTo, { logLevel: DiagLogLevel.WARN, suppressOverrideMessage: true })
  const propagator = new core.CompositePropagator({
    propagators: [new core.W3CTraceContextPropagator(), new core.W3CBaggagePropagator()],
  })
  // No SDK: the API's no-op tracer creates non-recording spans that still carry the incoming
  // context, and this propagator writes it on, so the trace survives a hop through a process
  // that does not export. The context manager makes context.with() hold across awaits, as
  // the SDK's does: without it a handler that enqueues follow-up events saw no active
  // context, and stored none.
  const propagateOnly = (): Telemetry => {
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable())
    propagation.setGlobalPropagator(propagator)
    const noop = async () => {}
    return { exporting: false, forceFlush: noop, shutdown: noop, [Symbol.asyncDispose]: noop }
  }
  if (!config.otlpEndpoint) {
    reportTrouble()
    return propagateOnly()
  }
  let url: URL
  try {
    url = new URL(
      "v1/traces",
      config.otlpEndpoint.endsWith("/") ? config.otlpEndpoint : `${config.otlpEndpoint}/`,
    )
  } catch (cause) {
    throw new TelemetryError(`otlpEndpoint is not a URL: ${config.otlpEndpoint}`, { cause })
  }
  // Every setting given, the SDK's defaults written out for the rest: one left unset is read
  // from OTEL_BSP_* (a shell's OTEL_BSP_MAX_EXPORT_BATCH_SIZE=0 made forceFlush never settle).
  const processor = new BatchSpanProcessor(new OTLPTraceExporter({ url: url.toString() }), {
    scheduledDelayMillis: config.exportDelayMs ?? 1000,
    maxQueueSize: config.maxQueueSize ?? 4096,
    maxExportBatchSize: 512,
    exportTimeoutMillis: 30_000,
  })
  const sdk = new NodeSDK({
    resource: resourceFromAttributes({
      ...config.resourceAttributes,
      [ATTR_SERVICE_NAME]: config.serviceName,
      ...(config.serviceVersion ? { [ATTR_SERVICE_VERSION]: config.serviceVersion } : {}),
    }),
    autoDetectResources: false,
    spanProcessors: [processor],
    // None, said outright: left unset, the SDK reads OTEL_METRICS_EXPORTER and
    // OTEL_LOGS_EXPORTER, which default to OTLP, and pushed metrics and logs to the trace
    // endpoint every minute (Jaeger answers 404). Metrics are prom-client's, scraped.
    metricReaders: [],
    logRecordProcessors: [],
    textMapPropagator: propagator,
    // Both said outright: left unset, the SDK reads OTEL_TRACES_SAMPLER and the
    // OTEL_*_LIMIT variables, and a shell's `always_off` recorded nothing while this said it
    // exported. A trace follows its writer's decision (parent-based), so a hop never cuts a
    // sampled trace in two, as `traceidratio` would, deciding again at every process. A
    // caller's unsampled context (an ERP sampling 1% of its own sends `-00` on the rest) is
    // recorded all the same: Keyway's hops always say sampled, so only an outside caller's
    // decision reaches here, and followed it left the order with no trace at all.
    sampler: new ParentBasedSampler({
      root: new AlwaysOnSampler(),
      remoteParentNotSampled: new AlwaysOnSampler(),
    }),
    // The SDK's defaults, whatever the environment says.
    spanLimits: {
      attributeCountLimit: 128,
      attributeValueLengthLimit: Number.POSITIVE_INFINITY,
      eventCountLimit: 128,
      linkCountLimit: 128,
      attributePerEventCountLimit: 128,
      attributePerLinkCountLimit: 128,
    },
    // No auto-instrumentation: Keyway's spans are made by hand where the messaging
    // conventions need them, and patching pg/http would add a span per query.
    instrumentations: [],
  })
  // The SDK still reads some variables of the environment itself: OTEL_SDK_DISABLED (below),
  // the exporter's OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT and _COMPRESSION (a collector's
  // credentials belong there), and OTEL_LOG_LEVEL, which has its constructor put a console
  // logger in place: set before it, the one given was replaced, and the SDK's trouble went
  // to the console unthrottled.
  reportTrouble()
  sdk.start()
  // OTEL_SDK_DISABLED=true makes start() do nothing: no propagator and no context manager
  // either, and every outbox row stored a null trace while this said it exported.
  if (propagation.fields().length === 0) return propagateOnly()
  let stopped: Promise<void> | undefined
  const shutdownTimeoutMs = config.shutdownTimeoutMs ?? 2000
  const shutdown = () => {
    stopped ??= (async () => {
      let timer: NodeJS.Timeout | undefined
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(
          () =>
            reject(
              new TelemetryError(
                `telemetry shutdown gave up after ${shutdownTimeoutMs} ms: the OTLP receiver at ${url} did not take the last spans`,
              ),
            ),
          shutdownTimeoutMs,
        )
      })
      try {
        await Promise.race([
          sdk.shutdown().catch((cause) => {
            throw new TelemetryError("telemetry shutdown failed", { cause })
          }),
          late,
        ])
      } finally {
        clearTimeout(timer)
      }
    })()
    return stopped
  }
  return {
    exporting: true,
    forceFlush: () => processor.forceFlush(),
    shutdown,
    [Symbol.asyncDispose]: shutdown,
  }
}

const QUIET_MS = 60_000

/**
 * A diag logger passing warnings and errors on, each kind once a minute (texts alike but
 * for their numbers are one kind): an export that fails fails at every scheduled export,
 * every second, and a full queue reports every batch it drops.
 */
function sdkTroubleTo(logger: NonNullable<TelemetryConfig["logger"]>) {
  const last = new Map<string, { at: number; held: number }>()
  const pass = (message: string) => {
    const now = Date.now()
    // Numbers aside: "Dropped 512 spans because maxQueueSize reached" is one report, whatever
    // the count.
    const kind = message.replace(/\d+/g, "#")
    const seen = last.get(kind)
    if (seen && now - seen.at < QUIET_MS) {
      seen.held++
      return
    }
    // Bounded, the oldest forgotten first.
    if (!seen && last.size >= 100) last.delete(last.keys().next().value!)
    last.delete(kind)
    last.set(kind, { at: now, held: 0 })
    logger.warn("telemetry: the OpenTelemetry SDK reports trouble", {
      report: message.slice(0, 2000),
      ...(seen?.held ? { heldBackSinceLast: seen.held } : {}),
    })
  }
  const none = () => {}
  return { error: pass, warn: pass, info: none, debug: none, verbose: none }
}
