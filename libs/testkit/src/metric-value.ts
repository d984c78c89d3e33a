/**
 * The value of an unlabelled sample in Prometheus' text exposition (what `/metrics` serves),
 * or undefined when the body has no such line.
 */
export function metricValue(exposition: string, name: string): number | undefined {
  for (const line of exposition.split("\n")) {
    if (line.startsWith(`${name} `)) return Number(line.slice(name.length + 1))
  }
  return undefined
}
