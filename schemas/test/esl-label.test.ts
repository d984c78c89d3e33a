import assert from "node:assert/strict"
import { test } from "node:test"
import { EslLabelPages, EslLabelRender, InvalidEventError } from "../src/index.ts"

const task = {
  labelCode: "0A1B2C3D4E5F",
  jobId: "j1",
  page: 3,
  frontPage: true,
  productId: "P1",
  productName: "Butter 250 g",
  priceMinor: 279,
  currency: "EUR",
}

test("a render task that brings its page to the front names no other page as shown", () => {
  assert.throws(
    () => EslLabelRender.check({ ...task, shownPage: 5 }),
    (err: unknown) =>
      err instanceof InvalidEventError &&
      /\["shownPage"\]/.test(err.message) &&
      /5 contradicts frontPage true for page 3/.test(err.message),
  )
  assert.equal(EslLabelRender.check({ ...task, shownPage: 3 }).shownPage, 3)
  assert.equal(EslLabelRender.check(task).shownPage, undefined, "left out: an older writer's")
  // In the background, the label goes on showing another page.
  assert.equal(EslLabelRender.check({ ...task, frontPage: false, shownPage: 5 }).shownPage, 5)
})

test("a label task lists each page once, in page order, and at least one", () => {
  const page = (n: number) => ({
    page: n,
    jobId: "j1",
    productId: "P1",
    productName: "Butter 250 g",
    priceMinor: 279,
    currency: "EUR",
  })
  const label = { labelCode: "0A1B2C3D4E5F", jobId: "j2", shownPage: 2 }
  assert.deepEqual(
    EslLabelPages.check({ ...label, pages: [page(2), page(5)] }).pages.map((p) => p.page),
    [2, 5],
  )
  for (const [pages, problem] of [
    [[page(5), page(2)], /page order, each once\s+at \["pages"\]\[1\]\["page"\]/],
    [[page(2), page(2)], /page order, each once/],
    [[], /at least one page/],
    [[page(8)], /\["pages"\]\[0\]\["page"\]/],
  ] as const) {
    assert.throws(
      () => EslLabelPages.check({ ...label, pages }),
      (err: unknown) => err instanceof InvalidEventError && problem.test(err.message),
      JSON.stringify(pages.map((p) => p.page)),
    )
  }
})
