import assert from "node:assert/strict"
import { test } from "node:test"
import { ConfigError, parseConfig, parseWriterConfig } from "../src/config.ts"

const refused = (message: RegExp) => (err: unknown) =>
  err instanceof ConfigError && message.test(err.message)

test("`just demo` runs with no variable set, on the machine's shared servers", () => {
  assert.deepEqual(parseConfig({}), {
    databaseUrl: "postgres://postgres@127.0.0.1:5432/keyway",
    natsServers: ["nats://127.0.0.1:4222"],
    rate: 50,
    seconds: 0,
  })
})

test("`just demo` takes each of its variables", () => {
  const config = parseConfig({
    DATABASE_URL: "postgres://postgres@127.0.0.1:5432/keyway_demo",
    NATS_URL: "127.0.0.1:4223,nats://127.0.0.1:4224",
    DEMO_RATE: "0.5",
    DEMO_SECONDS: "2000000",
  })
  assert.deepEqual(config, {
    databaseUrl: "postgres://postgres@127.0.0.1:5432/keyway_demo",
    natsServers: ["127.0.0.1:4223", "nats://127.0.0.1:4224"],
    rate: 0.5,
    seconds: 2_000_000,
  })
})

test("`just demo` refuses a bad value by its variable's name", () => {
  // Retried for ever by the writes otherwise, with no word of DATABASE_URL.
  assert.throws(
    () => parseConfig({ DATABASE_URL: "mysql://u:secret@h/db" }),
    refused(/^DATABASE_URL must be a URL like/),
  )
  assert.throws(
    () => parseConfig({ NATS_URL: "nats://u:secret@127.0.0.1:4222" }),
    refused(/^NATS_URL server 1 of 1 carries a user or password/),
  )
  // A pause between writes longer than a Node timer can wait ran as 1 ms: flat out.
  for (const rate of ["0", "abc", "1e3", "0.0000001", "100001"]) {
    assert.throws(
      () => parseConfig({ DEMO_RATE: rate }),
      refused(/^DEMO_RATE must be a number of events per second from 0.01 to 100000/),
      rate,
    )
  }
  for (const seconds of ["abc", "1.5", "-1", "2000001"]) {
    assert.throws(
      () => parseConfig({ DEMO_SECONDS: seconds }),
      refused(/^DEMO_SECONDS must be an integer from 0 to 2000000/),
      seconds,
    )
  }
})

const writerBase = {
  KEYWAY_SITE: "factory",
  DATABASE_URL: "postgres://postgres@127.0.0.1:5432/keyway_factory",
}

test("the writer needs its site and database; the rest has defaults", () => {
  assert.deepEqual(parseWriterConfig(writerBase), {
    site: "factory",
    databaseUrl: "postgres://postgres@127.0.0.1:5432/keyway_factory",
    rate: 10,
    keys: 20,
    otlpEndpoint: undefined,
    serviceName: "keyway-demo-factory",
  })
  assert.throws(
    () => parseWriterConfig({ ...writerBase, KEYWAY_SITE: " " }),
    refused(/^KEYWAY_SITE is required \(e\.g\. KEYWAY_SITE=factory\)/),
  )
  assert.throws(
    () => parseWriterConfig({ KEYWAY_SITE: "factory" }),
    refused(/^DATABASE_URL is required/),
  )
})

test("the writer takes each of its variables", () => {
  const config = parseWriterConfig({
    KEYWAY_SITE: "cloud",
    DATABASE_URL: "postgres://keyway@db:5432/keyway_cloud",
    DEMO_RATE: "200",
    DEMO_KEYS: "1000000",
    OTEL_EXPORTER_OTLP_ENDPOINT: "http://jaeger:4318",
    OTEL_SERVICE_NAME: "demo-cloud",
  })
  assert.deepEqual(config, {
    site: "cloud",
    databaseUrl: "postgres://keyway@db:5432/keyway_cloud",
    rate: 200,
    keys: 1_000_000,
    otlpEndpoint: "http://jaeger:4318",
    serviceName: "demo-cloud",
  })
})

test("the writer refuses a bad value by its variable's name", () => {
  assert.throws(
    () => parseWriterConfig({ ...writerBase, DATABASE_URL: "postgres://u:p%E9@h/db" }),
    refused(/^DATABASE_URL's password holds a % that does not start an escape/),
  )
  assert.throws(
    () => parseWriterConfig({ ...writerBase, DEMO_RATE: "0" }),
    refused(/^DEMO_RATE must be a number of events per second from 0.01 to 100000/),
  )
  for (const keys of ["0", "0x10", "1000001"]) {
    assert.throws(
      () => parseWriterConfig({ ...writerBase, DEMO_KEYS: keys }),
      refused(/^DEMO_KEYS must be an integer from 1 to 1000000/),
      keys,
    )
  }
  // The variable is the base URL: the exporter adds /v1/traces itself.
  assert.throws(
    () =>
      parseWriterConfig({
        ...writerBase,
        OTEL_EXPORTER_OTLP_ENDPOINT: "http://jaeger:4318/v1/traces",
      }),
    refused(/^OTEL_EXPORTER_OTLP_ENDPOINT is the receiver's base URL/),
  )
})
