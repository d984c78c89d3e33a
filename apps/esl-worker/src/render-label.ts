import type { EslLabelRenderPayload } from "@keyway/schemas"
import { createCanvas, type SKRSContext2D } from "@napi-rs/canvas"
import { encodeIndexedPng, type Rgb } from "./encode-indexed-png.ts"

/** A 2.9" SoluM Newton label: 296 × 128 pixels. */
export const LABEL_WIDTH = 296
export const LABEL_HEIGHT = 128
const MARGIN = 8
const NAME_MAX_PX = 26
// Below this the name is unreadable from a shopper's distance: refuse rather than print it.
const NAME_MIN_PX = 13
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

/** The task cannot be drawn: no retry changes that, so the worker treats it as poison. */
export class RenderError extends Error {
  override name = "RenderError"
}

function fitFont(ctx: SKRSContext2D, text: string, maxWidth: number): number | undefined {
  // Width grows about in proportion to the size: guess from one measurement and step down
  // from just above the guess (hinting rounds widths either way). Setting ctx.font parses
  // the font string; trying every size from the top was a fifth of the render time.
  ctx.font = `bold ${NAME_MAX_PX}px "${FONT}"`
  const widest = ctx.measureText(text).width
  const guess = Math.floor((NAME_MAX_PX * maxWidth) / Math.max(widest, 1))
  for (let px = Math.min(NAME_MAX_PX, guess + 1); px >= NAME_MIN_PX; px--) {
    if (px === NAME_MAX_PX) return px // measured above
    ctx.font = `bold ${px}px "${FONT}"`
    if (ctx.measureText(text).width <= maxWidth) return px
  }
  return undefined
}

// Building an Intl.NumberFormat loads locale data: one per currency, not one per label.
const formats = new Map<string, { format: Intl.NumberFormat; digits: number }>()

/** The price as the shelf shows it, e.g. "€ 12.99" → formatted for the currency. */
export function formatPrice(priceMinor: number, currency: string): string {
  let f = formats.get(currency)
  if (!f) {
    try {
      const format = new Intl.NumberFormat("en-GB", { style: "currency", currency })
      f = { format, digits: format.resolvedOptions().maximumFractionDigits ?? 2 }
    } catch (cause) {
      throw new RenderError(`unknown currency ${currency}`, { cause })
    }
    formats.set(currency, f)
  }
  return f.format.format(priceMinor / 10 ** f.digits)
}

/**
 * Draws one label page as a 3-ink indexed PNG: product name on top (shrunk to fit), the
 * price large, the product id and job id small at the bottom. Deterministic: the same
 * payload gives the same bytes, which is how the tests tell which task a label's image
 * came from.
 */
export async function renderLabel(task: EslLabelRenderPayload): Promise<Buffer> {
  const canvas = createCanvas(LABEL_WIDTH, LABEL_HEIGHT)
  const ctx = canvas.getContext("2d")
  ctx.fillStyle = css(WHITE)
  ctx.fillRect(0, 0, LABEL_WIDTH, LABEL_HEIGHT)
  ctx.fillStyle = css(BLACK)
  ctx.textBaseline = "top"

  const namePx = fitFont(ctx, task.productName, LABEL_WIDTH - 2 * MARGIN)
  if (namePx === undefined) {
    throw new RenderError(
      `product name does not fit a ${LABEL_WIDTH}x${LABEL_HEIGHT} label at ${NAME_MIN_PX}px ` +
        `(${task.productName.length} characters): shorten it`,
    )
  }
  ctx.fillText(task.productName, MARGIN, MARGIN)

  const price = formatPrice(task.priceMinor, task.currency)
  ctx.fillStyle = css(RED)
  ctx.font = `bold 44px "${FONT}"`
  ctx.textAlign = "right"
  ctx.fillText(price, LABEL_WIDTH - MARGIN, 44)

  ctx.fillStyle = css(BLACK)
  // Bold: at this size the strokes of the regular face fall between pixels and vanish once
  // inked (the j of "job" lost its descender).
  ctx.font = `bold 11px "${FONT}"`
  ctx.textAlign = "left"
  ctx.fillText(`${task.productId}  ·  job ${task.jobId}`, MARGIN, LABEL_HEIGHT - MARGIN - 11)
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
