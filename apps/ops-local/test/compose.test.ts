// ops/compose cannot run here (no Docker daemon), so this holds it to the native setup that
// does: the same nats/ files, the ports, users and inbox prefixes of site-plan.ts, and every
// password a mounted config reads. A compose file that drifts fails here, not on a factory
// floor.
import assert from "node:assert/strict"
import { existsSync, readFileSync } from "node:fs"
import { dirname, join, resolve } from "node:path"
import { describe, test } from "node:test"
import { parse } from "yaml"
import {
  inboxPrefix,
  natsConfigVariables,
  passwordVariable,
  repositoryRoot,
  SITE_NAMES,
  SITES,
  type SiteName,
  siteUsers,
} from "../src/site-plan.ts"

const root = repositoryRoot()
const composeDir = join(root, "ops/compose")

interface Service {
  image?: string
  build?: { context: string; dockerfile: string }
  command?: string[]
  environment?: Record<string, string>
  volumes?: string[]
  ports?: string[]
  profiles?: string[]
}

function load(site: SiteName): Record<string, Service> {
  const doc = parse(readFileSync(join(composeDir, `${site}.yml`), "utf8"), { merge: true })
  return doc.services
}

/** `../../nats:/etc/keyway/nats:ro` → host path and container path. */
function bindMounts(service: Service) {
  return (service.volumes ?? [])
    .map((v) => v.split(":"))
    .filter(([source]) => source!.startsWith("."))
    .map(([source, target]) => ({ host: resolve(composeDir, source!), target: target! }))
}

/** The container path → host path of a file the service reads through a bind mount. */
function hostPathOf(service: Service, containerPath: string): string | undefined {
  for (const m of bindMounts(service)) {
    if (containerPath.startsWith(`${m.target}/`)) {
      return join(m.host, containerPath.slice(m.target.length + 1))
    }
  }
  return undefined
}

const variablesIn = (value: string) => [...value.matchAll(/\$\{([A-Z0-9_]+)/g)].map((m) => m[1]!)
const portOf = (url: string) => Number(new URL(url).port)

for (const site of SITE_NAMES) {
  const plan = SITES[site]
  describe(`ops/compose/${site}.yml`, () => {
    const services = load(site)

    test("has the site's servers, its Keyway processes and the observability stack", () => {
      for (const name of [
        "nats",
        "redis",
        "postgres",
        "migrate",
        "streams",
        "relay",
        "worker",
        "demo",
        "jaeger",
        "prometheus",
        "grafana",
      ]) {
        assert.ok(services[name], `service ${name}`)
      }
      for (const name of ["migrate", "streams", "relay", "worker", "demo"]) {
        const s = services[name]!
        assert.equal(s.build?.dockerfile, "ops/compose/Dockerfile", `${name} builds the app image`)
        assert.ok(existsSync(join(resolve(composeDir, s.build!.context), s.build!.dockerfile)))
        const entry = s.command?.find((arg) => arg.endsWith(".ts"))
        assert.ok(entry && existsSync(join(root, entry)), `${name} runs an existing ${entry}`)
      }
      assert.deepEqual(services.demo!.profiles, ["demo"], "demo traffic only when asked for")
    })

    test("every bind mount exists in the repository", () => {
      for (const [name, s] of Object.entries(services)) {
        for (const m of bindMounts(s)) assert.ok(existsSync(m.host), `${name}: ${m.host}`)
      }
    })

    test("NATS runs the same config file as just up, with every variable it reads", () => {
      const nats = services.nats!
      const configArg = nats.command![nats.command!.indexOf("-c") + 1]!
      const hostConfig = hostPathOf(nats, configArg)
      assert.equal(hostConfig, join(root, plan.natsConfig), "mounts nats/ and runs the site's file")
      const env = nats.environment ?? {}
      const needed = natsConfigVariables(hostConfig!)
      for (const name of needed) assert.ok(env[name], `${plan.natsConfig} reads $${name}`)
      // Least privilege: a server is given only the passwords its own users need.
      for (const name of Object.keys(env).filter((k) => k.startsWith("KEYWAY_PASS_"))) {
        assert.ok(needed.has(name), `${name} is given to ${site}'s NATS but not read by it`)
      }
      assert.equal(Number(env.KEYWAY_NATS_PORT), plan.natsPort)
      assert.equal(Number(env.KEYWAY_NATS_HTTP_PORT), plan.natsHttpPort)
      if (plan.leafPort) assert.equal(Number(env.KEYWAY_LEAF_PORT), plan.leafPort)
      const published = (nats.ports ?? []).map((p) => Number(p.split(":").at(-1)))
      for (const port of [plan.natsPort, plan.natsHttpPort, plan.leafPort].filter(Boolean)) {
        assert.ok(published.includes(port!), `port ${port} published`)
      }
      if (site === "factory") {
        // The leaf dials the hub's leafnode port as leaf-factory.
        const remote = env.KEYWAY_LEAF_REMOTE_URL!
        assert.match(remote, /^nats-leaf:\/\/leaf-factory:\$\{KEYWAY_PASS_LEAF_FACTORY[:}]/)
        assert.ok(remote.endsWith(`:${SITES.cloud.leafPort}`), remote)
      }
    })

    test("the streams service applies the site's stream file as the site's admin", () => {
      const s = services.streams!
      assert.ok(s.command!.includes(plan.streamsFile))
      assert.ok(existsSync(join(root, plan.streamsFile)))
      assert.equal(s.environment!.NATS_USER, plan.adminUser)
      assert.deepEqual(variablesIn(s.environment!.NATS_PASS!), [passwordVariable(plan.adminUser)])
      assert.equal(s.environment!.NATS_INBOX_PREFIX, inboxPrefix(plan.adminUser))
      assert.equal(portOf(s.environment!.NATS_URL!), plan.natsPort)
    })

    test("relay and worker connect as their own users, on the site's ports and streams", () => {
      const redisPort = Number(
        services.redis!.command![services.redis!.command!.indexOf("--port") + 1],
      )
      assert.equal(redisPort, plan.redisPort)
      const expected = { relay: plan.relayUser, worker: plan.worker.user }
      for (const [name, user] of Object.entries(expected)) {
        const env = services[name]!.environment!
        assert.equal(env.KEYWAY_SITE, site)
        assert.equal(env.NATS_USER, user, `${name} user`)
        assert.equal(env.NATS_INBOX_PREFIX, inboxPrefix(user), `${name} inbox prefix`)
        assert.deepEqual(variablesIn(env.NATS_PASS!), [passwordVariable(user)])
        assert.equal(portOf(env.NATS_URL!), plan.natsPort)
        assert.equal(new URL(env.DATABASE_URL!).pathname, `/${plan.database}`)
      }
      const worker = services.worker!.environment!
      assert.equal(portOf(worker.REDIS_URL!), plan.redisPort)
      assert.equal(worker.KEYWAY_STREAM, plan.worker.stream)
      assert.equal(worker.KEYWAY_GROUP, plan.worker.group)
      assert.equal(worker.KEYWAY_FILTER_SUBJECT, plan.worker.filterSubject)
    })

    test("every password variable is one of the site's own users, in its secrets file", () => {
      // The env file handed to this site's hosts (secrets.ts) holds these and no other.
      const known = new Set(siteUsers(plan).map(passwordVariable))
      for (const [name, s] of Object.entries(services)) {
        for (const value of Object.values(s.environment ?? {})) {
          for (const v of variablesIn(String(value)).filter((x) => x.startsWith("KEYWAY_PASS_"))) {
            assert.ok(known.has(v), `${name}: ${v}`)
          }
        }
      }
    })
  })
}

test("Prometheus scrapes only services that both stacks have", () => {
  const config = parse(readFileSync(join(root, "ops/prometheus/prometheus.yml"), "utf8"))
  const targets: string[] = config.scrape_configs.flatMap((job: any) =>
    job.static_configs.flatMap((c: any) => c.targets),
  )
  assert.ok(targets.length > 0)
  for (const site of SITE_NAMES) {
    const services = load(site)
    for (const target of targets) {
      const host = target.split(":")[0]!
      assert.ok(services[host], `${site}: scrape target ${target}`)
    }
    const mount = bindMounts(services.prometheus!).find((m) => m.host.endsWith("prometheus.yml"))
    assert.equal(mount?.host, join(root, "ops/prometheus/prometheus.yml"))
  }
  assert.ok(existsSync(join(dirname(composeDir), "grafana/provisioning/datasources")))
})
