// The NATS passwords of a local run: generated once, kept in .run/secrets.env (mode 600,
// gitignored) and handed to each process through its environment. Never printed: callers
// get them back only as a map.
import { randomBytes } from "node:crypto"
import { chmod, mkdir, readFile, writeFile } from "node:fs/promises"
import { dirname } from "node:path"
import { NATS_USERS, passwordVariable } from "./site-plan.ts"

const PASSWORD_SHAPE = /^[A-Za-z][A-Za-z0-9]{15,}$/

function parseEnvFile(text: string): Record<string, string> {
  const out: Record<string, string> = {}
  for (const line of text.split("\n")) {
    const m = /^\s*([A-Z0-9_]+)=(.*)$/.exec(line)
    if (m) out[m[1]!] = m[2]!.trim()
  }
  return out
}

/** The secrets file's variables, or undefined if there is none (no `just up` has run here). */
export async function readSecrets(path: string): Promise<Record<string, string> | undefined> {
  try {
    return parseEnvFile(await readFile(path, "utf8"))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined
    throw err
  }
}

/**
 * Reads the secrets file, adding a password for any user that has none yet (a user added
 * later gets one without changing the others), and returns the password of each user.
 * A letter, then hex: nats-server parses a `$VAR` as a config value, so a password that starts
 * with a digit is read as a number and the server refuses the config; letters and digits are
 * also safe in a leaf URL and in a shell-sourced env file without quoting.
 */
export async function ensureSecrets(path: string): Promise<Record<string, string>> {
  let text = ""
  try {
    text = await readFile(path, "utf8")
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err
  }
  const vars = parseEnvFile(text)
  for (const user of NATS_USERS) {
    const value = vars[passwordVariable(user)]
    if (value && !PASSWORD_SHAPE.test(value)) {
      // Not replaced silently: a compose host may share this file.
      throw new Error(
        `${path}: ${passwordVariable(user)} must be a letter followed by letters and digits (nats-server reads other values as numbers or syntax); replace or delete it`,
      )
    }
  }
  const missing = NATS_USERS.filter((u) => !vars[passwordVariable(u)])
  if (missing.length > 0 || text === "") {
    for (const user of missing) vars[passwordVariable(user)] = `k${randomBytes(16).toString("hex")}`
    const body = [
      "# NATS passwords of `just up` (and of ops/compose: --env-file). Generated once; never commit.",
      ...Object.entries(vars).map(([k, v]) => `${k}=${v}`),
      "",
    ].join("\n")
    await mkdir(dirname(path), { recursive: true })
    await writeFile(path, body, { mode: 0o600 })
  }
  // Also when the file existed: a copy made with a looser mode is tightened.
  await chmod(path, 0o600)
  return Object.fromEntries(NATS_USERS.map((u) => [u, vars[passwordVariable(u)]!]))
}
