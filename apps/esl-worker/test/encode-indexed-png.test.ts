import assert from "node:assert/strict"
import { test } from "node:test"
import { encodeIndexedPng, type Rgb } from "../src/encode-indexed-png.ts"
import { decodePng } from "./support.ts"

const paletteOf = (n: number): Rgb[] =>
  Array.from({ length: n }, (_, i) => [(i * 37) % 256, (i * 91 + 13) % 256, (255 + 256 - i) % 256])

// Every bit depth (1, 2, 4, 8), and widths that do not fill their rows' last byte. The depth
// is the smallest the palette allows: a decoder would read a wider one too, so it is checked
// in the header, where a 3-ink label's 2 bits a pixel keep the image small.
for (const [colours, width, height, depth] of [
  [2, 13, 5, 1],
  [3, 296, 128, 2],
  [4, 7, 3, 2],
  [16, 9, 4, 4],
  [200, 31, 6, 8],
] as const) {
  test(`${colours} colours, ${width}x${height}: a decoder reads back every pixel`, async () => {
    const palette = paletteOf(colours)
    // Deterministic, irregular indices: runs and single pixels, every palette entry used.
    const indices = Uint8Array.from(
      { length: width * height },
      (_, p) => ((p * p + 3 * p) >> 2) % colours,
    )
    const png = encodeIndexedPng(width, height, indices, palette)
    assert.equal(png[24], depth, `bit depth ${depth}`)
    assert.equal(png[25], 3, "colour type 3: indexed")
    const decoded = await decodePng(png)
    assert.equal(decoded.width, width)
    assert.equal(decoded.height, height)
    for (let p = 0; p < indices.length; p++) {
      const expected = [...palette[indices[p]!]!, 255]
      const got = [...decoded.rgba.subarray(4 * p, 4 * p + 4)]
      assert.deepEqual(got, expected, `pixel ${p % width},${Math.floor(p / width)}`)
    }
  })
}

test("refuses what a PNG cannot hold, naming the problem", () => {
  assert.throws(() => encodeIndexedPng(2, 1, Uint8Array.of(0, 0), []), /1 to 256 colours, not 0/)
  assert.throws(
    () => encodeIndexedPng(2, 2, Uint8Array.of(0, 0, 0), paletteOf(2)),
    /3 pixel indices for a 2x2 image/,
  )
  assert.throws(
    () => encodeIndexedPng(2, 1, Uint8Array.of(0, 2), paletteOf(2)),
    /pixel 1,0: index 2 outside the palette/,
  )
})
