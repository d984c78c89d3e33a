// The NATS passwords of a local run, one file per site: .run/secrets-cloud.env and
// .run/secrets-factory.env (mode 600, gitignored), each with the passwords of that site's
// users (site-plan.ts siteUsers), handed to each process through its environment and to
// ops/compose/<site>.yml as its --env-file. Per site, so that the file copied to a factory
// host carries no cloud password but the leaf link's. Never printed: callers get them back
// only as a map.
import { randomBytes } from "node:crypto"
import { chmod, mkdir, readFile, writeFile } from "node:fs/promises"
import { join } from "node:path"
import { passwordVariable, SITE_NAMES, SITES, type SiteName, siteUsers } from "./site-plan.ts"

const PASSWORD_SHAPE = /^[A-Za-z][A-Za-z0-9]{15,}$/

/**
 * NAME=value lines, # comments and blank lines; any other line is refused. Skipped, an
 * `export KEYWAY_PASS_…=…` line read as a password missing: a new one was written in its
 * place and the line dropped, and the site's servers no longer matched its other hosts. The
 * error gives the line's number, not its text, which may hold a password.
 */
function parseEnvFile(text: string, path: string): Record<string, string> {
  const out: Record<string, string> = {}
  for (const [i, line] of text.split("\n").entries()) {
    if (/^\s*(#.*)?$/.test(line)) continue
    const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line)
    if (!m) {
      throw new Error(
        `${path}:${i + 1}: not NAME=value, a # comment or a blank line (no \`export\`, no spaces around =); fix or delete the line`,
      )
    }
    out[m[1]!] = m[2]!.trim()
  }
  return out
}

/**
 * Where both sites' passwords were kept before each site had its own file. Read only to carry
 * its passwords over, so that a host updated alone still matches the other (the leaf link's
 * password above all); never written.
 */
export function legacySecretsFile(runDir: string): string {
  return join(runDir, "secrets.env")
}

/** The file of a site's secrets in `runDir` (.run/ of the checkout). */
export function siteSecretsFile(runDir: string, site: SiteName): string {
  return join(runDir, `secrets-${site}.env`)
}

async function readText(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, "utf8")
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined
    throw err
  }
}

/** A site's secrets file's variables, or undefined if there is none (no `just up` ran here). */
export async function readSiteSecrets(
  runDir: string,
  site: SiteName,
): Promise<Record<string, string> | undefined> {
  const path = siteSecretsFile(runDir, site)
  const text = await readText(path)
  return text === undefined ? undefined : parseEnvFile(text, path)
}

/**
 * Reads both sites' secrets files, adding a password for any user that has none yet (a user
 * added later gets one without changing the others), and returns the password of each user.
 * The leaf link's user is in both files with one password; two different ones are refused,
 * not mended, since either may be the one a running server holds.
 * A letter, then hex: nats-server parses a `$VAR` as a config value, so a password that starts
 * with a digit is read as a number and the server refuses the config; letters and digits are
 * also safe in a leaf URL and in a shell-sourced env file without quoting.
 */
export async function ensureSecrets(runDir: string): Promise<Record<string, string>> {
  const files = await Promise.all(
    SITE_NAMES.map(async (site) => {
      const path = siteSecretsFile(runDir, site)
      const text = (await readText(path)) ?? ""
      return { site, path, text, vars: parseEnvFile(text, path), users: siteUsers(SITES[site]) }
    }),
  )
  const passwords: Record<string, string> = {}
  const foundIn: Record<string, string> = {}
  const legacyPath = legacySecretsFile(runDir)
  const legacy = parseEnvFile((await readText(legacyPath)) ?? "", legacyPath)
  for (const { path, vars, users } of files) {
    for (const user of users) {
      const name = passwordVariable(user)
      const value = vars[name]
      if (!value) continue
      if (!PASSWORD_SHAPE.test(value)) {
        // Not replaced silently: a compose host may share this file.
        throw new Error(
          `${path}: ${name} must be a letter followed by letters and digits (nats-server reads other values as numbers or syntax); replace or delete it`,
        )
      }
      if (passwords[user] !== undefined && passwords[user] !== value) {
        throw new Error(
          `${foundIn[user]} and ${path} hold different values of ${name}: both sites need the same one; make them equal`,
        )
      }
      passwords[user] = value
      foundIn[user] = path
    }
  }
  for (const { users } of files) {
    for (const user of users) {
      const carried = legacy[passwordVariable(user)]
      passwords[user] ??=
        carried && PASSWORD_SHAPE.test(carried) ? carried : `k${randomBytes(16).toString("hex")}`
    }
  }
  await mkdir(runDir, { recursive: true })
  for (const { site, path, text, vars, users } of files) {
    const missing = users.filter((u) => !vars[passwordVariable(u)])
    if (missing.length > 0 || text === "") {
      const body =
        text === ""
          ? [
              `# NATS passwords of the ${site} site: \`just up\`, and ops/compose/${site}.yml's --env-file.`,
              `# Generated once; copy to the ${site}'s hosts only; never commit.`,
              ...missing.map((user) => `${passwordVariable(user)}=${passwords[user]}`),
              "",
            ].join("\n")
          : withPasswords(
              text,
              missing.map((user) => [passwordVariable(user), passwords[user]!]),
            )
      // Tightened before the write: writeFile's mode applies only to a file it creates.
      await chmod(path, 0o600).catch(() => {})
      await writeFile(path, body, { mode: 0o600 })
    }
    // Also when the file existed: a copy made with a looser mode is tightened.
    await chmod(path, 0o600)
  }
  return passwords
}

/**
 * `text` with each name set: a `NAME=` line left empty is filled in place, other names are
 * added at the end. The rest stays as the operator wrote it, comments included.
 */
function withPasswords(text: string, set: [name: string, value: string][]): string {
  const left = new Map(set)
  const lines = text.replace(/\n$/, "").split("\n")
  for (const [i, line] of lines.entries()) {
    const name = /^\s*([A-Za-z0-9_]+)=\s*$/.exec(line)?.[1]
    if (name === undefined || !left.has(name)) continue
    lines[i] = `${name}=${left.get(name)}`
    left.delete(name)
  }
  for (const [name, value] of left) lines.push(`${name}=${value}`)
  return `${lines.join("\n")}\n`
}
