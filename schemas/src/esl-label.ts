import * as Schema from "effect/Schema"
import { defineEvent } from "./define-event.ts"

/**
 * Label MACs travel in one canonical form: 12 uppercase hex digits, no separators
 * ("0A1B2C3D4E5F"). It is the ordering key of topic `esl.label`, and keys compare as strings:
 * "0a:1b:…" and "0A1B…" as two keys would be two orderings of one physical label, so the
 * variants are folded by {@link canonicalLabelCode} at the writer and refused on the wire.
 * It is also the form SoluM AIMS uses for `labelCode`.
 */
export const LABEL_CODE_PATTERN = /^[0-9A-F]{12}$/

const LabelCode = Schema.String.pipe(
  Schema.check(
    Schema.isPattern(LABEL_CODE_PATTERN, {
      message: "a label MAC must be 12 hex digits, canonical uppercase without separators",
    }),
  ),
)

/**
 * The ways a MAC is written: bare, six pairs with one separator throughout (`:` or `-`), or
 * three groups of four with dots (as Cisco prints them). Only these: stripping separators
 * wherever they stand turned a 7-group typo ("0:1b:2c:3d:4e:5f:0") into another, valid MAC,
 * a label that is not the one meant.
 */
const MAC_FORMS = [
  /^[0-9A-F]{12}$/,
  /^[0-9A-F]{2}([:-])(?:[0-9A-F]{2}\1){4}[0-9A-F]{2}$/,
  /^[0-9A-F]{4}\.[0-9A-F]{4}\.[0-9A-F]{4}$/,
]

/**
 * The canonical form of a label MAC written in one of the usual ways, in any case, with
 * blanks around it (a CSV cell); `undefined` when it is not a MAC. Writers fold their input
 * through this and let the schema refuse what stays malformed, so the rejection names the
 * field.
 */
export function canonicalLabelCode(input: string): string | undefined {
  const upper = input.trim().toUpperCase()
  return MAC_FORMS.some((form) => form.test(upper)) ? upper.replace(/[:.-]/g, "") : undefined
}

/**
 * ISO 4217's minor units, where they are not 2. `priceMinor` counts these, as an ERP keeps
 * prices (Odoo's decimal places are ISO's). Intl's own digits (Unicode CLDR's) are how a
 * price is usually shown, and differ for 17 currencies: for IQD, 3 by ISO and 0 by CLDR,
 * dividing by CLDR's put 250 dinars on the shelf as 250,000.
 */
const ISO_MINOR_DIGITS: Readonly<Record<string, number>> = {
  ...Object.fromEntries(
    "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
      .split(" ")
      .map((c) => [c, 0]),
  ),
  ...Object.fromEntries("BHD IQD JOD KWD LYD OMR TND".split(" ").map((c) => [c, 3])),
  CLF: 4,
  UYW: 4,
}

/** How many digits of `priceMinor` are the fraction, for a currency code. */
export function currencyMinorDigits(currency: string): number {
  return ISO_MINOR_DIGITS[currency] ?? 2
}

// Currency codes ICU knows (which omits some fund codes, and lists withdrawn currencies
// until a later release drops them), and the fund codes above.
const KNOWN_CURRENCIES = new Set([
  ...Intl.supportedValuesOf("currency"),
  ...Object.keys(ISO_MINOR_DIGITS),
])

/**
 * For writers checking what they are sent: a code not known ("ABC", a typo) would reach the
 * shelf as itself, with two decimals guessed. Not part of the event's schema: the answer
 * depends on the runtime's ICU data, and a worker on another Node than its writer would
 * hold dead what the writer accepted.
 */
export const isKnownCurrency = Schema.makeFilter<string>((c) =>
  knownCurrency(c) ? true : `${JSON.stringify(c)} is not an ISO 4217 currency code`,
)

/** Whether a currency code is known: see {@link isKnownCurrency}. */
export function knownCurrency(code: string): boolean {
  return KNOWN_CURRENCIES.has(code)
}

/**
 * The fields of a label's render task, each with its bounds. The writer checks its requests
 * against the same ones: a value it stored unchecked would fail a later job that shows it,
 * naming a field that job does not contain.
 */
export const EslFields = {
  /** The job (a price change or a label job) that produced this task. */
  jobId: Schema.String.pipe(Schema.check(Schema.isMinLength(1), Schema.isMaxLength(64))),
  /** AIMS page slot, 1–7 on SoluM Newton labels. */
  page: Schema.Number.pipe(
    Schema.check(Schema.isInt(), Schema.isBetween({ minimum: 1, maximum: 7 })),
  ),
  /**
   * Whether the label shows this page once it is drawn. AIMS takes a page number instead (see
   * `shownPage` of the render task): false keeps the page the label showed before.
   */
  frontPage: Schema.Boolean,
  productId: Schema.String.pipe(Schema.check(Schema.isMinLength(1), Schema.isMaxLength(64))),
  // The schema bounds the name for storage; the renderer shrinks a long one, then shortens
  // it with an ellipsis: the price it travels with must reach the shelf.
  productName: Schema.String.pipe(Schema.check(Schema.isMinLength(1), Schema.isMaxLength(200))),
  /**
   * Price in the currency's minor units by ISO 4217 (cents; fils for IQD, 1000 to the dinar;
   * yen for JPY): no binary fractions on a price tag. See {@link currencyMinorDigits}.
   */
  priceMinor: Schema.Number.pipe(
    Schema.check(Schema.isInt(), Schema.isBetween({ minimum: 0, maximum: 1e9 })),
  ),
  /** ISO 4217. */
  currency: Schema.String.pipe(Schema.check(Schema.isPattern(/^[A-Z]{3}$/))),
}

/**
 * Topic `esl.label`, keyed by label MAC, as writers before {@link EslLabelPages} wrote it:
 * draw one page of the label and push it. A label of several pages was told only of the page
 * its job named, so a price change of a page bound before it, the page the label showed
 * included, never reached the shelf. Workers still read it: the stream keeps what older
 * writers sent.
 */
export const EslLabelRender = defineEvent({
  type: "esl.label.render.v1",
  topic: "esl.label",
  schema: Schema.Struct({
    labelCode: LabelCode,
    ...EslFields,
    /**
     * The page the label shows once this task is drawn: AIMS's `frontPage`, a page number
     * that the image request must carry. `page` when `frontPage` is true; otherwise the page
     * the writer last brought to the front for this label, 1 (a label's first page) when it
     * never did. Events of writers before it was added lack it; the worker then works it out
     * from `page` and `frontPage` alone.
     */
    shownPage: Schema.optional(EslFields.page),
  }).pipe(
    // A task that brings its page to the front and names another as shown contradicts
    // itself; the worker, which reads shownPage, would show the other page.
    Schema.check(
      Schema.makeFilter((task) =>
        task.frontPage && task.shownPage !== undefined && task.shownPage !== task.page
          ? {
              path: ["shownPage"],
              issue: `${task.shownPage} contradicts frontPage true for page ${task.page}: it must be ${task.page} or left out`,
            }
          : true,
      ),
    ),
  ),
  keyField: "labelCode",
})

export type EslLabelRenderPayload = typeof EslLabelRender.schema.Type

/** What one page of a label shows, as its writer last set it. */
const EslPage = Schema.Struct({
  page: EslFields.page,
  /**
   * The job that last set this page: bound it to its product, or changed that product. It is
   * drawn in the page's footer, and a page is drawn again only when what it shows changed.
   */
  jobId: EslFields.jobId,
  productId: EslFields.productId,
  productName: EslFields.productName,
  priceMinor: EslFields.priceMinor,
  currency: EslFields.currency,
})

export type EslPageContent = typeof EslPage.Type

/**
 * Topic `esl.label`, keyed by label MAC: the whole label as of the writer's commit, every page
 * bound and the page shown. The newest version alone decides what the label shows: a worker
 * pushes each page that differs from what it last pushed for the label, so a page a dead
 * (parked) task left undrawn is drawn by the next task, whatever page that one changed.
 */
export const EslLabelPages = defineEvent({
  type: "esl.label.pages.v2",
  topic: "esl.label",
  schema: Schema.Struct({
    labelCode: LabelCode,
    /** The job that produced this task. */
    jobId: EslFields.jobId,
    /**
     * The page the label shows, AIMS's `frontPage`: the page a job last brought to the front,
     * 1 (a label's first page) when none did, bound or not.
     */
    shownPage: EslFields.page,
    /** Every page bound, in page order. */
    pages: Schema.Array(EslPage).pipe(
      Schema.check(
        Schema.isMinLength(1, { message: "a label task draws at least one page" }),
        Schema.makeFilter((pages) => {
          const at = pages.findIndex((p, i) => i > 0 && p.page <= pages[i - 1]!.page)
          return at < 0
            ? true
            : { path: [at, "page"], issue: "pages must be in page order, each once" }
        }),
      ),
    ),
  }),
  keyField: "labelCode",
})

export type EslLabelPagesPayload = typeof EslLabelPages.schema.Type
