import { context, propagation, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api"
import { request as httpRequest } from "undici"

export interface AimsClientConfig {
  /**
   * The AIMS host, e.g. `https://eu.common.solumesl.com`; the fake's url in tests. A path in
   * it is kept as a prefix (a tenant's cluster, `https://host/c1`, or a gateway's): the calls
   * go to `<baseUrl>/common/api/v2/…`.
   */
  baseUrl: string
  company: string
  store: string
  username: string
  password: string
  /** Per request; a request without an answer by then counts as a retryable timeout. */
  timeoutMs: number
  /**
   * How long AIMS may still apply a request this client gave up on (no answer in time, or the
   * connection lost once it was sent). The failure asks for a retry no sooner (retryAfterMs),
   * and the label's later versions wait behind the retry: sooner, a newer image could be
   * drawn and then the older one, applied late, drawn over it. A version whose last attempt
   * this was holds the label as long, parked (the keyed consumer's policy). Not covered: a
   * push cut short by stop() or a lost lease (the next holder retries it after its own wait
   * for the key), nor one sent by a worker that froze with it in flight (see `beforeSend`).
   * Default {@link DEFAULT_SETTLE_MS}.
   */
  settleMs?: number
}

/**
 * A guess, for want of a documented bound: a request that long in a server or its gateway has
 * been given up by them too (60 s is a common gateway timeout).
 */
export const DEFAULT_SETTLE_MS = 60_000

// Failures of a request that never reached the server: nothing of it can be applied late.
// Any other counts as sent, an idle keep-alive socket closed under a new request
// (UND_ERR_SOCKET) included: waiting when it was not costs a label a minute, not its price.
const NOT_SENT = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "UND_ERR_CONNECT_TIMEOUT"])

export interface PushImageOptions {
  labelCode: string
  page: number
  /** The page the label shows once this image is applied (AIMS takes a number, 1-based). */
  frontPage: number
  png: Buffer
  /**
   * The event id. Nothing here relies on AIMS honouring it (the fake draws a repeat all the
   * same): a repeat of a version (a crash between the push and done) draws the same image.
   */
  idempotencyKey: string
  /** `<epoch>.<version>`: lets a server that compares it refuse a fenced-off worker. */
  fencingToken: string
  signal?: AbortSignal
  /**
   * Called right before each image request goes out, the re-send after a 401 included: what it
   * throws ends the push, raw, with nothing sent. The ESL worker passes the keyed consumer's
   * `throwIfLost`: a worker frozen while it fetched a token or drew the image resumes, its
   * lock gone, and must not draw its older image over the one the label's next holder sent.
   */
  beforeSend?: () => void
}

export interface AimsClient {
  pushImage(options: PushImageOptions): Promise<void>
}

/**
 * An AIMS call that failed. `retryable` says whether trying again can help. Only an answer
 * that says the request itself is malformed (400, 413, 415, 422) cannot: the same bytes get
 * the same answer. Everything else can, including 403 and 404, which a wrong store setting or
 * a proxy in front of AIMS during maintenance gives for every label at once: dead at once,
 * they would drop every update in flight, where retries carry them over once it is mended.
 * `retryAfterMs` is the answer's Retry-After, which the keyed consumer waits at least.
 */
export class AimsError extends Error {
  override name = "AimsError"
  constructor(
    message: string,
    readonly status: number | "timeout" | "network" | "aborted",
    readonly retryable: boolean,
    options?: ErrorOptions & { retryAfterMs?: number },
  ) {
    super(message, options)
    if (options?.retryAfterMs !== undefined) this.retryAfterMs = options.retryAfterMs
  }
  readonly retryAfterMs?: number
}

const MALFORMED = new Set([400, 413, 415, 422])
// A gateway's answers for an AIMS that did not answer it in time (504) or broke off its answer
// (502): the request may have reached AIMS, which may still apply it, as one this client gave
// up on itself. 503 is not among them: a gateway says it when no AIMS took the request at all.
const GATEWAY_GAVE_UP = new Set([502, 504])

/** Retry-After as milliseconds: delay-seconds or an HTTP-date (RFC 9110 §10.2.3). */
export function parseRetryAfter(value: string | undefined, now = Date.now()): number | undefined {
  if (value === undefined) return undefined
  const text = value.trim()
  if (/^\d+$/.test(text)) return Number(text) * 1000
  const at = Date.parse(text)
  return Number.isNaN(at) ? undefined : Math.max(0, at - now)
}

// SoluM's own paths, as every public AIMS client we could read calls them: the token below
// `common/api/v2`, the label endpoints below `common/api/v2/common`.
const TOKEN_PATH = "common/api/v2/token"
const IMAGE_PATH = "common/api/v2/common/labels/image"

/**
 * `path` below the base URL's own path. `new URL("/api/…", base)` replaced the base's path,
 * so an AIMS behind a path prefix (a gateway, a tenant's `/common`) could not be reached
 * whatever AIMS_URL said.
 */
function below(baseUrl: string, path: string): URL {
  const base = new URL(baseUrl)
  if (!base.pathname.endsWith("/")) base.pathname += "/"
  return new URL(path, base)
}
const tracer = trace.getTracer("@keyway/esl-worker")

/**
 * The AIMS client: a cached bearer token shared by every concurrent push, fetched once
 * however many pushes find it missing or expired (a 401 storm must not become a token-request
 * storm), and one re-authentication per push on 401. Retries of 429/5xx/timeouts are not
 * done here: the keyed consumer's backoff does them without holding a worker slot.
 */
export function createAimsClient(config: AimsClientConfig): AimsClient {
  let token: Promise<string> | undefined
  const imageUrl = below(config.baseUrl, IMAGE_PATH)
  const tokenUrl = below(config.baseUrl, TOKEN_PATH)
  imageUrl.searchParams.set("company", config.company)
  imageUrl.searchParams.set("store", config.store)

  // undici's request(), not fetch(): fetch wraps every body in web streams, and with it the
  // HTTP client was 11% of the worker's CPU in `just bench esl`.
  const request = async (
    url: URL,
    init: { method: "POST"; headers: Record<string, string>; body: string },
    signal?: AbortSignal,
    /** An image, which AIMS may apply after this client has given up on it; not a token. */
    appliesLate = false,
  ): Promise<{ status: number; text: string; retryAfter?: string }> => {
    // Given up before it left (while the token was fetched, say): nothing for AIMS to apply
    // late, so the abort as it is, which holds nothing.
    signal?.throwIfAborted()
    const timeout = AbortSignal.timeout(config.timeoutMs)
    try {
      const res = await httpRequest(url, {
        ...init,
        signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
      })
      // Read either way, so the keep-alive connection goes back to the pool.
      const retryAfter = res.headers["retry-after"]
      return {
        status: res.statusCode,
        text: await res.body.text(),
        retryAfter: Array.isArray(retryAfter) ? retryAfter[0] : retryAfter,
      }
    } catch (err) {
      const settleMs = config.settleMs ?? DEFAULT_SETTLE_MS
      if (timeout.aborted) {
        throw new AimsError(
          `${url.pathname}: no answer within ${config.timeoutMs} ms${appliesLate ? ` (retried after ${settleMs} ms at the soonest, in case AIMS applies it yet)` : ""}`,
          "timeout",
          true,
          { cause: err, ...(appliesLate ? { retryAfterMs: settleMs } : {}) },
        )
      }
      if (signal?.aborted) {
        if (!appliesLate) throw err
        // Given up by its worker (stopping, or its label taken by another), the push perhaps
        // on its way: said as a timeout says it, so that the label's next push waits as long.
        throw new AimsError(
          `${url.pathname}: given up by its worker while AIMS may have it (retried after ${settleMs} ms at the soonest)`,
          "aborted",
          true,
          { cause: err, retryAfterMs: settleMs },
        )
      }
      const sent = !NOT_SENT.has((err as { code?: string }).code ?? "")
      throw new AimsError(`${url.pathname}: ${(err as Error).message}`, "network", true, {
        cause: err,
        ...(appliesLate && sent ? { retryAfterMs: settleMs } : {}),
      })
    }
  }

  const fetchToken = async (): Promise<string> => {
    const res = await request(tokenUrl, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ username: config.username, password: config.password }),
    })
    const { status, text } = res
    if (status < 200 || status >= 300) {
      // Bad credentials do not get better with retries, but an operator can fix them while
      // the task waits: retryable, and the topic's attempts bound it. A rate limit on the
      // token endpoint is waited out as one on the image endpoint: every push waiting for the
      // token got this answer, and each retrying at its own backoff kept AIMS at its limit.
      throw new AimsError(`token request refused: HTTP ${status}`, status, true, {
        retryAfterMs: parseRetryAfter(res.retryAfter),
      })
    }
    const access = (JSON.parse(text) as { responseMessage?: { access_token?: string } })
      .responseMessage?.access_token
    if (!access) throw new AimsError("token response without access_token", status, true)
    return access
  }

  // One fetch shared by every push waiting on it, so it runs on its own timeout, with no
  // push's signal: one label's abort (a lost lease) failed the others' pushes with it. An
  // aborted push notices at its own request, at most timeoutMs later.
  const currentToken = () => {
    token ??= fetchToken().catch((err) => {
      token = undefined
      throw err
    })
    return token
  }

  const post = async (options: PushImageOptions, bearer: string) => {
    options.beforeSend?.()
    const headers: Record<string, string> = {
      "content-type": "application/json",
      authorization: `Bearer ${bearer}`,
      "idempotency-key": options.idempotencyKey,
      "x-fencing-token": options.fencingToken,
    }
    propagation.inject(context.active(), headers)
    return request(
      imageUrl,
      {
        method: "POST",
        headers,
        body: JSON.stringify({
          labelCode: options.labelCode,
          page: options.page,
          frontPage: options.frontPage,
          image: options.png.toString("base64"),
        }),
      },
      options.signal,
      true,
    )
  }

  return {
    async pushImage(options) {
      // The HTTP client span (OTel HTTP conventions); its context rides in the traceparent
      // header, so the trace continues into AIMS if it records one.
      return tracer.startActiveSpan(
        "POST",
        {
          kind: SpanKind.CLIENT,
          attributes: {
            "http.request.method": "POST",
            "url.full": imageUrl.toString(),
            "url.path": imageUrl.pathname,
            "server.address": imageUrl.hostname,
            "server.port": Number(imageUrl.port || (imageUrl.protocol === "https:" ? 443 : 80)),
          },
        },
        async (span) => {
          try {
            let bearer = await currentToken()
            let r = await post(options, bearer)
            if (r.status === 401) {
              // Expired or revoked: one fresh token, unless another push already got one.
              // Compared with the fetch awaited, and cleared only if it is still the current
              // one: a fresh fetch another push started meanwhile is left to finish.
              const stale = bearer
              const current = token
              if (
                current &&
                (await current.catch(() => undefined)) === stale &&
                token === current
              ) {
                token = undefined
              }
              bearer = await currentToken()
              r = await post(options, bearer)
            }
            span.setAttribute("http.response.status_code", r.status)
            if (r.status >= 200 && r.status < 300) return
            let retryAfterMs = parseRetryAfter(r.retryAfter)
            if (GATEWAY_GAVE_UP.has(r.status)) {
              retryAfterMs = Math.max(retryAfterMs ?? 0, config.settleMs ?? DEFAULT_SETTLE_MS)
            }
            throw new AimsError(
              `AIMS answered HTTP ${r.status} for label ${options.labelCode}: ${r.text.slice(0, 200)}`,
              r.status,
              !MALFORMED.has(r.status),
              { retryAfterMs },
            )
          } catch (err) {
            span.recordException(err as Error)
            span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message })
            if (err instanceof AimsError) span.setAttribute("error.type", String(err.status))
            throw err
          } finally {
            span.end()
          }
        },
      )
    },
  }
}
