import assert from "node:assert/strict"
import { test } from "node:test"
import { fileURLToPath } from "node:url"
import { spawnTs } from "@keyway/testkit"

const fixture = fileURLToPath(new URL("./fixtures/print-lines.ts", import.meta.url))
const wideFixture = fileURLToPath(new URL("./fixtures/print-wide-line.ts", import.meta.url))

test("exited() resolves once everything the child printed has been read, a last line without its newline too", async () => {
  // A child's 'exit' can come before its last output is read; tests read json() right after.
  for (let round = 0; round < 5; round++) {
    const child = spawnTs(fixture, { KEYWAY_TEST_LINES: "5000" })
    assert.deepEqual(await child.exited(), { code: 0, signal: null })
    const printed = child.json()
    assert.equal(printed.length, 5001, `round ${round}`)
    assert.deepEqual(printed.at(-1), { last: true })
  }
})

test("a line of multibyte characters longer than a pipe's read comes back whole", async () => {
  const child = spawnTs(wideFixture, { KEYWAY_TEST_CHARS: "200000" })
  assert.deepEqual(await child.exited(), { code: 0, signal: null })
  const printed = child.json()
  assert.equal(printed.length, 1, "the line parses as JSON")
  assert.equal(printed[0]!.text, "€".repeat(200_000))
})
