import { mkdtemp, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { removeOnExit } from "./exit-cleanup.ts"
import { sweepTempDirs, tempDirPrefix } from "./leftovers.ts"

let swept = false

export interface TempDir {
  readonly path: string
  remove(): Promise<void>
}

/**
 * A fresh directory under the OS temp dir, `keyway-<what>-<pid>-XXXXXX`, removed by remove()
 * or else when the process exits; the pid lets a later process sweep it if this one is killed.
 */
export async function createTempDir(what: string): Promise<TempDir> {
  if (!swept) {
    swept = true
    await sweepTempDirs().catch(() => {})
  }
  const path = await mkdtemp(join(tmpdir(), tempDirPrefix(what)))
  const forget = removeOnExit(path)
  return {
    path,
    remove: async () => {
      await rm(path, { recursive: true, force: true })
      forget()
    },
  }
}
