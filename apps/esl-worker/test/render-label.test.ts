import assert from "node:assert/strict"
import { test } from "node:test"
import {
  formatPrice as formatted,
  LABEL_HEIGHT,
  LABEL_WIDTH,
  renderLabel,
  requireFont,
} from "../src/render-label.ts"
import { decodePng } from "./support.ts"

const task = {
  labelCode: "0A1B2C3D4E5F",
  jobId: "j1",
  page: 1,
  frontPage: true,
  productId: "P-1",
  productName: "Organic whole milk 3.8% 1 l",
  priceMinor: 129,
  currency: "EUR",
}

test("renders a real PNG of the label's size, the same bytes for the same task", async () => {
  const png = await renderLabel(task)
  assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])
  assert.equal(png.toString("ascii", 12, 16), "IHDR")
  assert.equal(png.readUInt32BE(16), LABEL_WIDTH)
  assert.equal(png.readUInt32BE(20), LABEL_HEIGHT)
  assert.ok((await renderLabel(task)).equals(png), "deterministic")
  assert.ok(!(await renderLabel({ ...task, priceMinor: 130 })).equals(png), "the price is drawn")
  assert.ok(!(await renderLabel({ ...task, jobId: "j2" })).equals(png), "the job is drawn")
})

test("the label is drawn in the panel's three inks: the price red, the text black, on white", async () => {
  const { width, height, rgba } = await decodePng(await renderLabel(task))
  assert.deepEqual([width, height], [LABEL_WIDTH, LABEL_HEIGHT])
  const counts = new Map<string, number>()
  for (let q = 0; q < rgba.length; q += 4) {
    const colour = `${rgba[q]},${rgba[q + 1]},${rgba[q + 2]}`
    counts.set(colour, (counts.get(colour) ?? 0) + 1)
  }
  assert.deepEqual([...counts.keys()].sort(), ["0,0,0", "208,0,0", "255,255,255"])
  // The price is the largest text: more red than black, and both far less than the paper.
  const [black, red, white] = [
    counts.get("0,0,0")!,
    counts.get("208,0,0")!,
    counts.get("255,255,255")!,
  ]
  assert.ok(red > black && white > 4 * (red + black), `black ${black}, red ${red}, white ${white}`)
})

/** The columns that hold red ink: where the price was drawn. */
async function redColumns(png: Buffer): Promise<{ first: number; last: number }> {
  const { width, height, rgba } = await decodePng(png)
  let first = width
  let last = -1
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const q = 4 * (y * width + x)
      if (rgba[q] === 208 && rgba[q + 1] === 0) {
        first = Math.min(first, x)
        last = Math.max(last, x)
      }
    }
  }
  return { first, last }
}

/** Columns of ink within `strip` px of the left or right edge: text that ran off the label. */
async function inkNearEdges(png: Buffer, strip = 6): Promise<number[]> {
  const { width, height, rgba } = await decodePng(png)
  const columns = new Set<number>()
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (x >= strip && x < width - strip) continue
      const q = 4 * (y * width + x)
      if (rgba[q] !== 255 || rgba[q + 1] !== 255 || rgba[q + 2] !== 255) columns.add(x)
    }
  }
  return [...columns].sort((a, b) => a - b)
}

test("a name too long for the label is shortened to fit inside its margins", async () => {
  const long = "Organic Free-Range Chicken Breast Fillets, family pack of twelve, 2.4 kg"
  const png = await renderLabel({ ...task, productName: long })
  assert.deepEqual(await inkNearEdges(png), [])
  // Cut where it no longer fits: what follows the cut is not drawn.
  assert.ok((await renderLabel({ ...task, productName: `${long} extra` })).equals(png))
  assert.ok(!(await renderLabel({ ...task, productName: `X${long}` })).equals(png))
  // Just too wide at the largest size (287 px of 280): shrunk, not drawn into the margin.
  assert.deepEqual(
    await inkNearEdges(await renderLabel({ ...task, productName: "W".repeat(10) })),
    [],
  )
})

test("prices count ISO 4217 minor units, shown as the currency is written when that loses nothing", () => {
  // Intl's digits are CLDR's: 0 for IQD and HUF, where ISO has 3 and 2. Divided by those,
  // 250 dinars were "IQD 250,000".
  const formatPrice = (priceMinor: number, currency: string) =>
    formatted(priceMinor, currency).replace(/\u00a0/g, " ") // Intl puts a no-break space there
  assert.equal(formatPrice(250_000, "IQD"), "IQD 250")
  assert.equal(formatPrice(250_500, "IQD"), "IQD 250.500")
  assert.equal(formatPrice(199_900, "HUF"), "HUF 1,999")
  assert.equal(formatPrice(199_990, "HUF"), "HUF 1,999.90")
  assert.equal(formatPrice(199_999, "HUF"), "HUF 1,999.99")
  assert.equal(formatPrice(1200, "EUR"), "€12.00")
  assert.equal(formatPrice(1299, "EUR"), "€12.99")
  assert.equal(formatPrice(500, "JPY"), "JP¥500")
  assert.equal(formatPrice(12_345, "KWD"), "KWD 12.345")
})

test("every price the schema allows is drawn whole, inside the margins", async () => {
  for (const [priceMinor, currency] of [
    [123_456, "CHF"],
    [1e9, "CHF"],
    [1e9, "KWD"],
    [1e9, "JPY"],
    [1e9, "EUR"],
    [1e9, "CLF"],
    [1e9, "HUF"],
  ] as const) {
    const png = await renderLabel({ ...task, priceMinor, currency })
    assert.deepEqual(await inkNearEdges(png), [], `${priceMinor} ${currency}`)
    // Drawn, and as wide as a price of ten or more characters at 20 px at least.
    const { first, last } = await redColumns(png)
    assert.ok(last - first > 120, `${priceMinor} ${currency}: red from x ${first} to ${last}`)
    // Whole, not shortened: two of the longest prices, apart in their last digit only, are
    // two images. Cut short ("CHF 9,999,999.9…"), they would be drawn alike.
    const [nines, eight] = await Promise.all(
      [999_999_999, 999_999_998].map((p) => renderLabel({ ...task, priceMinor: p, currency })),
    )
    assert.notDeepEqual(nines, eight, `${currency}: the last digit drawn`)
  }
})

/** The rightmost column holding black ink in the footer's rows (the bottom 20 pixels). */
async function footerRightEdge(png: Buffer): Promise<number> {
  const { width, height, rgba } = await decodePng(png)
  let last = -1
  for (let y = height - 20; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const q = 4 * (y * width + x)
      if (rgba[q] === 0 && rgba[q + 1] === 0 && rgba[q + 2] === 0) last = Math.max(last, x)
    }
  }
  return last
}

test("the product and job ids stay within the label's margin, whole where they fit", async () => {
  // The writer's default job id is a UUID; the schema allows ids of 64 characters.
  const uuid = "3f2c9a4e-8b1d-4c7e-9f60-2a5b8c1d7e43"
  for (const jobId of [uuid, "j".repeat(64)]) {
    const edge = await footerRightEdge(await renderLabel({ ...task, productId: "P-000123", jobId }))
    assert.ok(edge >= 0 && edge < LABEL_WIDTH - 8, `job ${jobId}: ink up to column ${edge}`)
  }
  // A UUID is drawn whole: two that differ only in their last character give two images.
  const a = await renderLabel({ ...task, productId: "P-000123", jobId: uuid })
  const b = await renderLabel({ ...task, productId: "P-000123", jobId: `${uuid.slice(0, -1)}4` })
  assert.ok(!a.equals(b), "the whole job id is drawn")
})

test("a worker's host without the labels' font is refused, saying which package brings it", () => {
  // Installed here: the labels' font passes.
  requireFont()
  assert.throws(
    () => requireFont("No Such Face Keyway"),
    /font "No Such Face Keyway" is not installed on this host \(Debian: apt-get install fonts-dejavu-core\)/,
  )
})
