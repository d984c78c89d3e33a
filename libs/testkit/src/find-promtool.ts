import { execFile } from "node:child_process"
import { existsSync } from "node:fs"
import { mkdir, readdir } from "node:fs/promises"
import { join } from "node:path"
import { fileURLToPath } from "node:url"
import { promisify } from "node:util"
import { createTempDir } from "./internal/temp-dir.ts"

const run = promisify(execFile)
const root = fileURLToPath(new URL("../../../", import.meta.url))
// Under the repository's .tmp/ (git-ignored), so a machine downloads it once.
const extracted = join(root, ".tmp/promtool")
const binary = join(extracted, "usr/bin/promtool")

let found: Promise<string> | undefined

/**
 * The path of a `promtool` (Prometheus' checker for configs and alert rules), fetching it on
 * first use; later calls in the process reuse the answer. One on PATH wins. Otherwise it comes
 * from Debian's `prometheus` package, downloaded and unpacked, not installed: installing would
 * run the package's scripts, which start a Prometheus server on the machine.
 */
export function findPromtool(): Promise<string> {
  found ??= locate()
  return found
}

async function locate(): Promise<string> {
  if (await works("promtool")) return "promtool"
  // Run, not only found: an unpack cut short (a killed test run) left a file that failed every
  // later run until .tmp/ was deleted by hand. Unpacked again, it is overwritten.
  if (existsSync(binary) && (await works(binary))) return binary
  const download = await createTempDir("promtool")
  try {
    const cwd = download.path
    try {
      await run("apt-get", ["download", "prometheus"], { cwd })
    } catch {
      // A fresh machine may have no package lists yet.
      await run("apt-get", ["update", "-qq"])
      await run("apt-get", ["download", "prometheus"], { cwd })
    }
    const deb = (await readdir(cwd)).find((f) => f.endsWith(".deb"))
    if (!deb) throw new Error(`apt-get download prometheus left no .deb in ${cwd}`)
    // dpkg-deb makes only the last directory of the path; a fresh clone has no .tmp/.
    await mkdir(extracted, { recursive: true })
    await run("dpkg-deb", ["-x", join(cwd, deb), extracted])
  } catch (cause) {
    throw new Error(
      "promtool is needed to check ops/prometheus and could not be fetched from Debian's " +
        "prometheus package; install it (apt-get install prometheus) or put promtool on PATH",
      { cause },
    )
  } finally {
    await download.remove()
  }
  return binary
}

async function works(command: string): Promise<boolean> {
  try {
    await run(command, ["--version"])
    return true
  } catch {
    return false
  }
}
