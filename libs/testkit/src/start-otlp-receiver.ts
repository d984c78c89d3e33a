import { listenHttp, readBody, sendJson } from "./internal/http-server.ts"

/** One span as an OTLP receiver got it, flattened out of its resource and scope. */
export interface ReceivedSpan {
  traceId: string
  spanId: string
  /** Empty for a root span. */
  parentSpanId: string
  name: string
  /** OTLP SpanKind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer. */
  kind: number
  attributes: Record<string, string | number | boolean>
  /** The resource's `service.name`. */
  serviceName: string
  /** Every attribute of the resource, `service.name` among them. */
  resource: Record<string, string | number | boolean>
  scope: string
  /** 0 unset, 1 ok, 2 error. */
  statusCode: number
}

export interface OtlpReceiver {
  /** Base URL: give it to the exporter as the OTLP endpoint; spans arrive at `/v1/traces`. */
  readonly url: string
  spans(): readonly ReceivedSpan[]
  /** Requests to anything but `POST /v1/traces` (an exporter of metrics or logs, say). */
  elsewhere(): readonly string[]
  /** Bodies refused (not OTLP JSON), with their content type: a misconfigured exporter. */
  readonly refused: readonly string[]
  stop(): Promise<void>
  [Symbol.asyncDispose](): Promise<void>
}

type AnyValue = {
  stringValue?: string
  intValue?: string | number
  doubleValue?: number
  boolValue?: boolean
}

const value = (v: AnyValue | undefined): string | number | boolean => {
  if (!v) return ""
  if (v.stringValue !== undefined) return v.stringValue
  if (v.intValue !== undefined) return Number(v.intValue)
  if (v.doubleValue !== undefined) return v.doubleValue
  if (v.boolValue !== undefined) return v.boolValue
  return JSON.stringify(v)
}

const attributes = (list: { key: string; value: AnyValue }[] | undefined) =>
  Object.fromEntries((list ?? []).map((a) => [a.key, value(a.value)]))

// The OTLP/JSON spec writes ids as hex; older exporters wrote protobuf-JSON base64. Both
// come out as lowercase hex, so tests compare them with traceparent headers directly.
const hexId = (id: string | undefined): string => {
  if (!id) return ""
  if (/^[0-9a-f]+$/i.test(id) && (id.length === 16 || id.length === 32)) return id.toLowerCase()
  return Buffer.from(id, "base64").toString("hex")
}

/**
 * A test OTLP/HTTP trace receiver: collects what an exporter posts to `/v1/traces` as OTLP
 * JSON (what `@opentelemetry/exporter-trace-otlp-http` sends). Protobuf bodies are refused
 * with 415 and counted in `refused`, so a test sees the mismatch instead of no spans.
 */
export async function startOtlpReceiver(options: { port?: number } = {}): Promise<OtlpReceiver> {
  const spans: ReceivedSpan[] = []
  const refused: string[] = []
  const elsewhere: string[] = []
  const http = await listenHttp(options.port ?? 0, async (req, res) => {
    const body = await readBody(req)
    if (req.method !== "POST" || req.url?.split("?")[0] !== "/v1/traces") {
      elsewhere.push(`${req.method} ${req.url}`)
      return sendJson(res, 404, {})
    }
    const type = req.headers["content-type"] ?? ""
    if (!type.startsWith("application/json")) {
      refused.push(type)
      return sendJson(res, 415, { error: "only OTLP JSON is understood here" })
    }
    const doc = JSON.parse(body.toString("utf8")) as {
      resourceSpans?: {
        resource?: { attributes?: { key: string; value: AnyValue }[] }
        scopeSpans?: {
          scope?: { name?: string }
          spans?: {
            traceId?: string
            spanId?: string
            parentSpanId?: string
            name: string
            kind?: number
            attributes?: { key: string; value: AnyValue }[]
            status?: { code?: number }
          }[]
        }[]
      }[]
    }
    for (const rs of doc.resourceSpans ?? []) {
      const resource = attributes(rs.resource?.attributes)
      const serviceName = String(resource["service.name"] ?? "")
      for (const ss of rs.scopeSpans ?? []) {
        for (const s of ss.spans ?? []) {
          spans.push({
            traceId: hexId(s.traceId),
            spanId: hexId(s.spanId),
            parentSpanId: hexId(s.parentSpanId),
            name: s.name,
            kind: s.kind ?? 0,
            attributes: attributes(s.attributes),
            serviceName,
            resource,
            scope: ss.scope?.name ?? "",
            statusCode: s.status?.code ?? 0,
          })
        }
      }
    }
    sendJson(res, 200, { partialSuccess: {} })
  })
  return {
    url: http.url,
    spans: () => spans,
    elsewhere: () => elsewhere,
    refused,
    stop: () => http.close(),
    [Symbol.asyncDispose]: () => http.close(),
  }
}
