import { mkdtemp, rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { removeOnExit } from "./exit-cleanup.ts"

export interface TempDir {
  readonly path: string
  remove(): Promise<void>
}

/** A fresh directory under the OS temp dir, removed by remove() or else when the process exits. */
export async function createTempDir(prefix: string): Promise<TempDir> {
  const path = await mkdtemp(join(tmpdir(), prefix))
  const forget = removeOnExit(path)
  return {
    path,
    remove: async () => {
      await rm(path, { recursive: true, force: true })
      forget()
    },
  }
}
