import { currencyMinorDigits, type EslPageContent } from "@keyway/schemas"
import { createCanvas, GlobalFonts, type SKRSContext2D } from "@napi-rs/canvas"
import { encodeIndexedPng, type Rgb } from "./encode-indexed-png.ts"

/** A 2.9" SoluM Newton label: 296 × 128 pixels. */
export const LABEL_WIDTH = 296
export const LABEL_HEIGHT = 128
const MARGIN = 8
const TEXT_WIDTH = LABEL_WIDTH - 2 * MARGIN
const NAME_MAX_PX = 26
// Below this the name is unreadable from a shopper's distance: a longer name is shortened
// with an ellipsis instead. The writer accepted the task, and it carries the price: a name
// that cannot be drawn whole must not keep the new price off the shelf.
const NAME_MIN_PX = 13
const PRICE_MAX_PX = 44
// Small enough for the widest price the schema allows ("CHF 10,000,000.00", 1e9 minor units)
// to fit: a price is never shortened, since a shelf showing part of one shows a wrong price.
const PRICE_MIN_PX = 20
// The product and job ids at the bottom, for staff and for tracing a label to its job.
const FOOTER_MAX_PX = 11
const FOOTER_MIN_PX = 8
// DejaVu ships with Debian and is what the test machines have; a font missing on the
// worker's host would silently fall back to another face, and the images would change.
const FONT = "DejaVu Sans"

// The inks of a red/black/white e-paper label, and the PNG's palette in this order. Skia draws
// with anti-aliasing; each pixel then takes the nearest ink, which is what the panel can show.
const WHITE: Rgb = [255, 255, 255]
const BLACK: Rgb = [0, 0, 0]
const RED: Rgb = [208, 0, 0]
const INKS = [WHITE, BLACK, RED] as const
const css = ([r, g, b]: Rgb) => `rgb(${r}, ${g}, ${b})`

/**
 * Throws unless `family` (the labels' font by default) is installed where this process runs.
 * Without it Skia draws in whatever face the host has, or in none: a label pushed without its
 * price, since a price measured in no font fits any width. Checked when a worker is made.
 */
export function requireFont(family = FONT): void {
  if (!GlobalFonts.has(family)) {
    throw new Error(
      `the labels' font ${JSON.stringify(family)} is not installed on this host (Debian: apt-get install fonts-dejavu-core); without it labels would be drawn in another face, or without their text`,
    )
  }
}

/** The task cannot be drawn: no retry changes that, so the worker treats it as poison. */
export class RenderError extends Error {
  override name = "RenderError"
}

/**
 * Sets the largest bold size from maxPx down to minPx at which `text` fits TEXT_WIDTH, and
 * returns it; undefined (the font left at minPx) if none does.
 */
function fitFont(ctx: SKRSContext2D, text: string, maxPx: number, minPx: number) {
  // Width grows about in proportion to the size: guess from one measurement and step down
  // from just above the guess (hinting rounds widths either way). Setting ctx.font parses
  // the font string; trying every size from the top was a fifth of the render time.
  ctx.font = `bold ${maxPx}px "${FONT}"`
  const widest = ctx.measureText(text).width
  if (widest <= TEXT_WIDTH) return maxPx
  const guess = Math.floor((maxPx * TEXT_WIDTH) / widest)
  for (let px = Math.min(maxPx - 1, guess + 1); px >= minPx; px--) {
    ctx.font = `bold ${px}px "${FONT}"`
    if (ctx.measureText(text).width <= TEXT_WIDTH) return px
  }
  ctx.font = `bold ${minPx}px "${FONT}"`
  return undefined
}

/** The longest start of `text` that fits TEXT_WIDTH in the current font with "…" after it. */
function shorten(ctx: SKRSContext2D, text: string): string {
  // By code point, so that a character outside the BMP is never cut in half.
  const chars = [...text]
  let fits = 0
  let tooLong = chars.length
  while (tooLong - fits > 1) {
    const mid = (fits + tooLong) >> 1
    if (ctx.measureText(`${chars.slice(0, mid).join("").trimEnd()}…`).width <= TEXT_WIDTH) {
      fits = mid
    } else tooLong = mid
  }
  return `${chars.slice(0, fits).join("").trimEnd()}…`
}

// Building an Intl.NumberFormat loads locale data: two per currency, not one per label.
const formats = new Map<
  string,
  { digits: number; usual: number; short: Intl.NumberFormat; full: Intl.NumberFormat }
>()

/**
 * The price as the shelf shows it, e.g. 1299 EUR → "€12.99". `priceMinor` counts ISO 4217
 * minor units. Shown with the digits the currency is usually written with (CLDR's: none for
 * HUF) when that loses nothing, else with all of ISO's: 199900 HUF is "HUF 1,999", 199990
 * is "HUF 1,999.90", never 2,000 nor 1,999.9.
 */
export function formatPrice(priceMinor: number, currency: string): string {
  let f = formats.get(currency)
  if (!f) {
    const digits = currencyMinorDigits(currency)
    const fixed = (n: number) =>
      new Intl.NumberFormat("en-GB", {
        style: "currency",
        currency,
        minimumFractionDigits: n,
        maximumFractionDigits: n,
      })
    try {
      const cldr = new Intl.NumberFormat("en-GB", { style: "currency", currency }).resolvedOptions()
        .maximumFractionDigits
      const usual = Math.min(cldr ?? digits, digits)
      f = { digits, usual, short: fixed(usual), full: fixed(digits) }
    } catch (cause) {
      throw new RenderError(`unknown currency ${currency}`, { cause })
    }
    formats.set(currency, f)
  }
  const format = priceMinor % 10 ** (f.digits - f.usual) === 0 ? f.short : f.full
  return format.format(priceMinor / 10 ** f.digits)
}

/** What a page shows: a page of a label task, or a task of a writer before pages. */
export type LabelPage = Pick<
  EslPageContent,
  "jobId" | "productId" | "productName" | "priceMinor" | "currency"
>

/**
 * Draws one label page as a 3-ink indexed PNG: product name on top (shrunk to fit, then
 * shortened), the price large (shrunk to fit), the product id and job id small at the
 * bottom. Deterministic: the same payload gives the same bytes, which is how the tests tell
 * which task a label's image came from.
 */
export async function renderLabel(task: LabelPage): Promise<Buffer> {
  const canvas = createCanvas(LABEL_WIDTH, LABEL_HEIGHT)
  const ctx = canvas.getContext("2d")
  ctx.fillStyle = css(WHITE)
  ctx.fillRect(0, 0, LABEL_WIDTH, LABEL_HEIGHT)
  ctx.fillStyle = css(BLACK)
  ctx.textBaseline = "top"

  const name =
    fitFont(ctx, task.productName, NAME_MAX_PX, NAME_MIN_PX) === undefined
      ? shorten(ctx, task.productName)
      : task.productName
  ctx.fillText(name, MARGIN, MARGIN)

  const price = formatPrice(task.priceMinor, task.currency)
  if (fitFont(ctx, price, PRICE_MAX_PX, PRICE_MIN_PX) === undefined) {
    throw new RenderError(`price ${price} does not fit the label at ${PRICE_MIN_PX}px`)
  }
  ctx.fillStyle = css(RED)
  ctx.textAlign = "right"
  ctx.fillText(price, LABEL_WIDTH - MARGIN, 44)

  ctx.fillStyle = css(BLACK)
  // Bold: at this size the strokes of the regular face fall between pixels and vanish once
  // inked (the j of "job" lost its descender). Shrunk to fit, then shortened, as the name:
  // drawn as it came, the writer's default job id (a UUID) ran off the label's edge.
  const footer = `${task.productId}  ·  job ${task.jobId}`
  ctx.textAlign = "left"
  ctx.fillText(
    fitFont(ctx, footer, FOOTER_MAX_PX, FOOTER_MIN_PX) === undefined
      ? shorten(ctx, footer)
      : footer,
    MARGIN,
    LABEL_HEIGHT - MARGIN - FOOTER_MAX_PX,
  )
  return encodeIndexedPng(
    LABEL_WIDTH,
    LABEL_HEIGHT,
    toInks(ctx.getImageData(0, 0, LABEL_WIDTH, LABEL_HEIGHT).data),
    INKS,
  )
}

/**
 * Each RGBA pixel as the index of its nearest ink (squared RGB distance). A label is mostly
 * runs of one colour (background, solid strokes), so the nearest ink is worked out once per
 * run: per pixel it cost 0.7 ms a label, a third of all the rendering.
 */
function toInks(rgba: Uint8ClampedArray): Uint8Array {
  const out = new Uint8Array(rgba.length / 4)
  const inks = Int32Array.from(INKS.flat())
  let r = -1
  let g = -1
  let b = -1
  let ink = 0
  for (let p = 0, q = 0; p < out.length; p++, q += 4) {
    if (rgba[q] !== r || rgba[q + 1] !== g || rgba[q + 2] !== b) {
      r = rgba[q]!
      g = rgba[q + 1]!
      b = rgba[q + 2]!
      let bestDistance = 0x7fffffff
      for (let k = 0; k < INKS.length; k++) {
        const dr = r - inks[3 * k]!
        const dg = g - inks[3 * k + 1]!
        const db = b - inks[3 * k + 2]!
        const d = dr * dr + dg * dg + db * db
        if (d < bestDistance) {
          ink = k
          bestDistance = d
        }
      }
    }
    out[p] = ink
  }
  return out
}
