import { createHash, randomBytes } from "node:crypto"
import type { IncomingMessage, ServerResponse } from "node:http"
import { setTimeout as sleep } from "node:timers/promises"
import { listenHttp, readBody, sendJson } from "./internal/http-server.ts"

/**
 * A fake of the SoluM AIMS endpoints Keyway's ESL worker uses, with failure injection.
 *
 * Paths and bodies as public SoluM AIMS clients call them (no AIMS reference was at hand; check
 * them against the tenant's before going live):
 * - `POST /common/api/v2/token` with `{"username","password"}` answers
 *   `{"responseCode":"200","responseMessage":{"access_token","refresh_token","token_type":"Bearer","expires_in"}}`.
 * - `POST /common/api/v2/common/labels/image?company=…&store=…` with a bearer token and
 *   `{"labelCode","page","frontPage","image"}`: page and frontPage are page numbers (1-7),
 *   the page drawn and the page the label shows then; image a base64 PNG. A repeat of an
 *   accepted `Idempotency-Key` is marked a duplicate and drawn all the same: nothing says
 *   AIMS honours the header, and a fake that dropped repeats let a test pass on a worker
 *   that sent an older version again after a newer one (`shown()` and `lastPush()` kept
 *   the newer).
 */
export interface FakeAimsOptions {
  /** Default 0: a port the OS picks. */
  port?: number
  /** Serves its routes below this path, e.g. `/c1` (a tenant's cluster, or a gateway). Default none. */
  basePath?: string
  company?: string
  store?: string
  username?: string
  password?: string
  /** Added before every answer (token and image). Default 0. */
  latencyMs?: number
  /** A token stops working this long after it was issued. Default one hour. */
  tokenTtlMs?: number
  /** Per image request, the chance of each injected failure. Default none. */
  failureRates?: FailureRates
  /** Seeds the failure dice, so a run's injected failures can be replayed. */
  seed?: number
}

export interface FailureRates {
  /** 429 Too Many Requests. */
  rateLimited?: number
  /** 503 Service Unavailable. */
  serverError?: number
  /** No answer at all: the request is held until the client gives up. Nothing is applied. */
  timeout?: number
}

/**
 * "timeout": never answered, never applied. "late": not answered until after the client has
 * given up, and applied then, as a server under load may still do with a request whose
 * client timed out (see holdNext): whatever was applied since, its idempotency key included,
 * as by an AIMS that does not honour the header (nothing says it does).
 */
export type FakeAimsOutcome =
  | 200
  | 400
  | 401
  | 404
  | 429
  | 500
  | 502
  | 503
  | 504
  | "timeout"
  | "late"

/** One image request as the fake saw it. */
export interface FakeAimsPush {
  /** 1-based arrival order over every image request the fake received. */
  arrival: number
  /** `performance.timeOrigin + performance.now()` when it arrived (ms). */
  receivedAt: number
  labelCode: string
  page: number
  /** The page the label shows once this is applied. */
  frontPage: number
  idempotencyKey: string | undefined
  /** The `X-Fencing-Token` header, if sent. */
  fencingToken: string | undefined
  traceparent: string | undefined
  /** The W3C `baggage` header, if sent. */
  baggage: string | undefined
  imageSha256: string
  image: Buffer
  outcome: FakeAimsOutcome
  /** When the answer was sent (ms, same clock as receivedAt); undefined while unanswered. */
  answeredAt: number | undefined
  /** Accepted, but its idempotency key had been accepted before (drawn again all the same). */
  duplicate: boolean
  /** When it was applied (a 200 at arrival; a "late" one after its hold), else undefined. */
  appliedAt: number | undefined
}

export interface FakeAims {
  /** Base URL, e.g. `http://127.0.0.1:43123`, with the base path if one was given. */
  readonly url: string
  readonly company: string
  readonly store: string
  readonly username: string
  readonly password: string
  /**
   * Every well-formed image request in arrival order, the ones failed by injection included.
   * Not those refused before (a bad or expired token: 401; another company or store: 404; a
   * malformed body: 400), which carry no label to record them by: `tokensIssued` tells of
   * the first.
   */
  requests(): readonly FakeAimsPush[]
  /** Accepted, first-time pushes, in the order applied; one label's if given. */
  pushes(labelCode?: string): FakeAimsPush[]
  /** The label's last applied push, a duplicate included; of one page if given. */
  lastPush(labelCode: string, page?: number): FakeAimsPush | undefined
  /**
   * What the label shows now: the page its last accepted push turned it to, and the last
   * image accepted for that page, which may be older than that push (undefined when that
   * page was never drawn). Undefined for a label never drawn.
   */
  shown(labelCode: string): { page: number; push: FakeAimsPush | undefined } | undefined
  /** Token requests answered with a token. */
  readonly tokensIssued: number
  setLatency(ms: number): void
  setFailureRates(rates: FailureRates): void
  /**
   * The next `count` image requests get `status` (429 or a 5xx; 400 as for an image the label
   * cannot take, which no retry mends); none is applied.
   */
  burst(status: 400 | 429 | 500 | 502 | 503 | 504, count: number): void
  /** The next `count` token requests get `status` (429 or a 5xx), a 429 with Retry-After. */
  burstTokens(status: 429 | 500 | 502 | 503, count: number): void
  /**
   * The next `count` image requests are never answered; with `applyAfterMs`, they are
   * applied that long after they arrived (and answered then, to a client long gone).
   */
  holdNext(count: number, applyAfterMs?: number): void
  /** Every token issued so far stops working: image requests get 401 until re-auth. */
  expireTokens(): void
  stop(): Promise<void>
  [Symbol.asyncDispose](): Promise<void>
}

const IMAGE_PATH = "/common/api/v2/common/labels/image"
const TOKEN_PATH = "/common/api/v2/token"
const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])
const now = () => performance.timeOrigin + performance.now()

// mulberry32: a small seeded PRNG, so a failing run's dice can be replayed with its seed.
function seeded(seed: number) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** Starts a fake SoluM AIMS server on 127.0.0.1. */
export async function startFakeAims(options: FakeAimsOptions = {}): Promise<FakeAims> {
  // "common", "/common/" and "/common" alike: one leading slash, none at the end.
  const basePath = (options.basePath ?? "").replace(/^\/*/, "/").replace(/\/+$/, "")
  const company = options.company ?? "KEYWAY"
  const store = options.store ?? "S001"
  const username = options.username ?? "esl@keyway.test"
  const password = options.password ?? randomBytes(8).toString("hex")
  const tokenTtlMs = options.tokenTtlMs ?? 3600_000
  const random = seeded(options.seed ?? Date.now())
  let latencyMs = options.latencyMs ?? 0
  let rates: FailureRates = { ...options.failureRates }
  const bursts: { status: FakeAimsOutcome; left: number; applyAfterMs?: number }[] = []
  const tokenBursts: { status: 429 | 500 | 502 | 503; left: number }[] = []
  const tokens = new Map<string, number>() // token → valid until
  const requests: FakeAimsPush[] = []
  const accepted = new Set<string>()
  const byLabel = new Map<string, FakeAimsPush[]>()
  let tokensIssued = 0

  const token = async (req: IncomingMessage, res: ServerResponse) => {
    let body: { username?: unknown; password?: unknown }
    try {
      body = JSON.parse((await readBody(req)).toString("utf8"))
    } catch {
      return sendJson(res, 400, { responseCode: "400", responseMessage: "body is not JSON" })
    }
    if (latencyMs > 0) await sleep(latencyMs)
    const failure = tokenBursts[0]
    if (failure) {
      if (--failure.left <= 0) tokenBursts.shift()
      return sendJson(
        res,
        failure.status,
        { responseCode: String(failure.status), responseMessage: "injected failure" },
        failure.status === 429 ? { "retry-after": "1" } : {},
      )
    }
    if (body.username !== username || body.password !== password) {
      return sendJson(res, 401, { responseCode: "401", responseMessage: "bad credentials" })
    }
    const access = randomBytes(16).toString("hex")
    tokens.set(access, Date.now() + tokenTtlMs)
    tokensIssued++
    sendJson(res, 200, {
      responseCode: "200",
      responseMessage: {
        access_token: access,
        refresh_token: randomBytes(16).toString("hex"),
        token_type: "Bearer",
        expires_in: Math.floor(tokenTtlMs / 1000),
      },
    })
  }

  const decideFailure = (): { outcome: FakeAimsOutcome; applyAfterMs?: number } | undefined => {
    const b = bursts[0]
    if (b) {
      if (--b.left <= 0) bursts.shift()
      return { outcome: b.status, applyAfterMs: b.applyAfterMs }
    }
    const roll = random()
    let edge = rates.rateLimited ?? 0
    if (roll < edge) return { outcome: 429 }
    edge += rates.serverError ?? 0
    if (roll < edge) return { outcome: 503 }
    edge += rates.timeout ?? 0
    if (roll < edge) return { outcome: "timeout" }
    return undefined
  }

  // Applied in the order applied, which for a late one is not its arrival's.
  const apply = (push: FakeAimsPush, late = false) => {
    push.appliedAt = now()
    if (!late && push.idempotencyKey !== undefined && accepted.has(push.idempotencyKey)) {
      push.duplicate = true
    }
    if (push.idempotencyKey !== undefined) accepted.add(push.idempotencyKey)
    const list = byLabel.get(push.labelCode) ?? []
    list.push(push)
    byLabel.set(push.labelCode, list)
  }

  const image = async (req: IncomingMessage, res: ServerResponse, url: URL) => {
    const receivedAt = now()
    const raw = await readBody(req)
    const auth = req.headers.authorization ?? ""
    const validUntil = tokens.get(auth.replace(/^Bearer /, ""))
    if (!auth.startsWith("Bearer ") || validUntil === undefined || validUntil < Date.now()) {
      if (latencyMs > 0) await sleep(latencyMs)
      return sendJson(res, 401, {
        responseCode: "401",
        responseMessage: "token expired or invalid",
      })
    }
    if (url.searchParams.get("company") !== company || url.searchParams.get("store") !== store) {
      return sendJson(res, 404, {
        responseCode: "404",
        responseMessage: "unknown company or store",
      })
    }
    let body: { labelCode?: unknown; page?: unknown; frontPage?: unknown; image?: unknown }
    try {
      body = JSON.parse(raw.toString("utf8"))
    } catch {
      return sendJson(res, 400, { responseCode: "400", responseMessage: "body is not JSON" })
    }
    const png = typeof body.image === "string" ? Buffer.from(body.image, "base64") : Buffer.alloc(0)
    const isPage = (v: unknown): v is number =>
      Number.isInteger(v) && Number(v) >= 1 && Number(v) <= 7
    if (
      typeof body.labelCode !== "string" ||
      !isPage(body.page) ||
      !isPage(body.frontPage) ||
      !png.subarray(0, 8).equals(PNG_SIGNATURE)
    ) {
      return sendJson(res, 400, {
        responseCode: "400",
        responseMessage:
          "labelCode (string), page and frontPage (page numbers, 1-7) and a base64 PNG image are required",
      })
    }
    const header = (name: string) => {
      const v = req.headers[name]
      return Array.isArray(v) ? v[0] : v
    }
    const push: FakeAimsPush = {
      arrival: requests.length + 1,
      receivedAt,
      labelCode: body.labelCode,
      page: body.page,
      frontPage: body.frontPage,
      idempotencyKey: header("idempotency-key"),
      fencingToken: header("x-fencing-token"),
      traceparent: header("traceparent"),
      baggage: header("baggage"),
      imageSha256: createHash("sha256").update(png).digest("hex"),
      image: png,
      outcome: 200,
      answeredAt: undefined,
      duplicate: false,
      appliedAt: undefined,
    }
    const failure = decideFailure()
    if (failure) push.outcome = failure.outcome
    requests.push(push)
    if (push.outcome === "timeout") return // held until the client gives up or stop()
    if (push.outcome === "late") {
      await sleep(failure?.applyAfterMs ?? 0)
      apply(push, true)
      push.answeredAt = now()
      // To a client that has given up: its socket may be gone.
      if (!res.destroyed) sendJson(res, 200, { responseCode: "200", responseMessage: "SUCCESS" })
      return
    }
    // Applied at arrival: the client sends a label's next version only after this one's
    // answer, so arrival order is the order the label was drawn in.
    if (push.outcome === 200) apply(push)
    if (latencyMs > 0) await sleep(latencyMs)
    push.answeredAt = now()
    if (push.outcome === 200) {
      return sendJson(res, 200, { responseCode: "200", responseMessage: "SUCCESS" })
    }
    sendJson(
      res,
      push.outcome,
      { responseCode: String(push.outcome), responseMessage: "injected failure" },
      push.outcome === 429 ? { "retry-after": "1" } : {},
    )
  }

  const http = await listenHttp(options.port ?? 0, async (req, res) => {
    const url = new URL(req.url ?? "/", "http://fake")
    if (req.method === "POST" && url.pathname === basePath + TOKEN_PATH) return token(req, res)
    if (req.method === "POST" && url.pathname === basePath + IMAGE_PATH) {
      return image(req, res, url)
    }
    await readBody(req)
    sendJson(res, 404, {
      responseCode: "404",
      responseMessage: `no route ${req.method} ${url.pathname}`,
    })
  })

  return {
    url: http.url + basePath,
    company,
    store,
    username,
    password,
    requests: () => requests,
    pushes: (labelCode) =>
      labelCode === undefined
        ? requests.filter((p) => p.appliedAt !== undefined && !p.duplicate)
        : (byLabel.get(labelCode) ?? []).filter((p) => !p.duplicate),
    lastPush: (labelCode, page) =>
      (byLabel.get(labelCode) ?? []).findLast((p) => page === undefined || p.page === page),
    shown: (labelCode) => {
      const last = byLabel.get(labelCode)?.at(-1)
      if (!last) return undefined
      const page = last.frontPage
      return { page, push: byLabel.get(labelCode)!.findLast((p) => p.page === page) }
    },
    get tokensIssued() {
      return tokensIssued
    },
    setLatency(ms) {
      latencyMs = ms
    },
    setFailureRates(r) {
      rates = { ...r }
    },
    burst(status, count) {
      if (count > 0) bursts.push({ status, left: count })
    },
    burstTokens(status, count) {
      if (count > 0) tokenBursts.push({ status, left: count })
    },
    holdNext(count, applyAfterMs) {
      if (count <= 0) return
      bursts.push(
        applyAfterMs === undefined
          ? { status: "timeout", left: count }
          : { status: "late", left: count, applyAfterMs },
      )
    },
    expireTokens() {
      tokens.clear()
    },
    stop: () => http.close(),
    [Symbol.asyncDispose]: () => http.close(),
  }
}
