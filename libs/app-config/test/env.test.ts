import assert from "node:assert/strict"
import { test } from "node:test"
import {
  ConfigError,
  intEnv,
  metricsPortEnv,
  requiredEnv,
  telemetryEnv,
  urlEnv,
} from "@keyway/app-config"

test("requiredEnv names the variable and shows an example when it is missing or blank", () => {
  assert.equal(requiredEnv({ A: " x " }, "A", "y"), "x")
  assert.throws(
    () => requiredEnv({ A: "  " }, "A", "postgres://…"),
    (err: Error) => {
      assert.ok(err instanceof ConfigError)
      assert.equal(err.message, "A is required (e.g. A=postgres://…)")
      return true
    },
  )
})

test("intEnv falls back when unset and rejects non-integers and values out of bounds", () => {
  assert.equal(intEnv({}, "N", 7), 7)
  assert.equal(intEnv({ N: "12" }, "N", 7), 12)
  assert.equal(intEnv({ N: "0" }, "N", 7, { min: 0 }), 0)
  assert.throws(() => intEnv({ N: "1.5" }, "N", 7), /N must be an integer >= 1, got "1.5"/)
  assert.throws(() => intEnv({ N: "0" }, "N", 7), /N must be an integer >= 1/)
  assert.throws(() => intEnv({ N: "70000" }, "N", 7, { min: 0, max: 65535 }), /from 0 to 65535/)
})

test("urlEnv rejects what is not a URL", () => {
  assert.equal(urlEnv({ U: "http://h:1" }, "U", "http://…"), "http://h:1")
  assert.throws(() => urlEnv({ U: "not a url" }, "U", "http://…"), /U must be a URL/)
})

test("metricsPortEnv: unset means no metrics server, 0 a free port, anything else a port", () => {
  assert.equal(metricsPortEnv({}), undefined)
  assert.equal(metricsPortEnv({ METRICS_PORT: " " }), undefined)
  assert.equal(metricsPortEnv({ METRICS_PORT: "0" }), 0)
  assert.equal(metricsPortEnv({ METRICS_PORT: "9464" }), 9464)
  assert.throws(() => metricsPortEnv({ METRICS_PORT: "70000" }), /METRICS_PORT must be/)
  assert.throws(() => metricsPortEnv({ METRICS_PORT: "http" }), ConfigError)
})

test("telemetryEnv: no endpoint means no export; a malformed one is a config error, not a crash", () => {
  assert.deepEqual(telemetryEnv({}, "keyway-relay"), {
    otlpEndpoint: undefined,
    serviceName: "keyway-relay",
  })
  assert.deepEqual(
    telemetryEnv(
      { OTEL_EXPORTER_OTLP_ENDPOINT: "http://jaeger:4318", OTEL_SERVICE_NAME: "relay-a" },
      "keyway-relay",
    ),
    { otlpEndpoint: "http://jaeger:4318", serviceName: "relay-a" },
  )
  assert.throws(
    () => telemetryEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: "jaeger 4318" }, "keyway-relay"),
    (err: Error) =>
      err instanceof ConfigError && /OTEL_EXPORTER_OTLP_ENDPOINT must be a URL/.test(err.message),
  )
})
