/** A consumer's numeric settings, refused when out of range rather than failing silently. */
export class KeyedConsumerConfigError extends Error {
  override name = "KeyedConsumerConfigError"
}

type Rule = readonly [min: number, integer: boolean]

// The bound below which a setting cannot work. leaseMs goes to redlock, which refuses a
// duration with a fraction: taken for a lock held elsewhere, every key waited for ever,
// with nothing in the log. The counts go to NATS and to loops counting one by one.
const SETTINGS: Record<string, Rule> = {
  leaseMs: [100, true],
  pollIntervalMs: [1, false],
  recoveryIntervalMs: [1, false],
  retentionMs: [0, false],
  rejectRetentionMs: [0, false],
  pruneIntervalMs: [1, false],
  vacuumEvery: [1, true],
  concurrency: [1, true],
  ingestBatchSize: [1, true],
  ingestLingerMs: [0, false],
  maxAckPending: [1, true],
  ackWaitMs: [1, true],
  shutdownGraceMs: [0, false],
}
const POLICY: Record<string, Rule> = {
  maxAttempts: [1, true],
  backoffMs: [0, false],
  maxBackoffMs: [0, false],
}

function wrongIn(values: object, rules: Record<string, Rule>, where: string): string[] {
  const wrong: string[] = []
  for (const [name, [min, integer]] of Object.entries(rules)) {
    const v = (values as Record<string, unknown>)[name]
    if (v === undefined) continue
    const ok =
      typeof v === "number" && Number.isFinite(v) && v >= min && (!integer || Number.isInteger(v))
    if (!ok) {
      wrong.push(
        `${where}${name} must be ${integer ? "an integer" : "a number"} of at least ${min}, not ${String(v)}`,
      )
    }
  }
  return wrong
}

/** Throws a KeyedConsumerConfigError naming every setting out of range. */
export function checkSettings(config: {
  defaultPolicy?: object
  policies?: Record<string, object>
}): void {
  const wrong = [
    ...wrongIn(config, SETTINGS, ""),
    ...wrongIn(config.defaultPolicy ?? {}, POLICY, "defaultPolicy."),
    ...Object.entries(config.policies ?? {}).flatMap(([topic, p]) =>
      wrongIn(p, POLICY, `policies[${JSON.stringify(topic)}].`),
    ),
  ]
  if (wrong.length > 0) throw new KeyedConsumerConfigError(wrong.join("; "))
}
