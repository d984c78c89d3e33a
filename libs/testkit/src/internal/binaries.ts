import { existsSync } from "node:fs"

// Debian installs nats-server under /usr/sbin, which is not on every user's PATH.
function resolveBinary(name: string, candidates: string[]): string {
  return candidates.find((path) => existsSync(path)) ?? name
}

export const natsServerBinary = resolveBinary("nats-server", ["/usr/sbin/nats-server"])
export const redisServerBinary = resolveBinary("redis-server", ["/usr/bin/redis-server"])
