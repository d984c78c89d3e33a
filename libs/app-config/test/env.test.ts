import assert from "node:assert/strict"
import { test } from "node:test"
import {
  ConfigError,
  intEnv,
  metricsPortEnv,
  natsAuthEnv,
  natsClientEnv,
  natsServersEnv,
  perSecondEnv,
  postgresUrlEnv,
  redisUrlEnv,
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
  assert.throws(
    () => intEnv({ N: "1.5" }, "N", 7),
    /N must be an integer from 1 to 2147483647, got "1.5"/,
  )
  assert.throws(() => intEnv({ N: "0" }, "N", 7), /N must be an integer from 1/)
  assert.throws(() => intEnv({ N: "70000" }, "N", 7, { min: 0, max: 65535 }), /from 0 to 65535/)
  // What Number() would read as a number, and a timer Node cannot set (it fires after 1 ms).
  assert.equal(intEnv({ N: "0500" }, "N", 7), 500)
  for (const raw of ["0x10", "1e3", "12abc", "+5", "2147483648"]) {
    assert.throws(() => intEnv({ N: raw }, "N", 7), /N must be an integer/, raw)
  }
})

test("natsServersEnv takes servers with or without a scheme, and refuses what nats.js would wait on for ever", () => {
  assert.deepEqual(natsServersEnv({}), ["nats://127.0.0.1:4222"])
  assert.deepEqual(natsServersEnv({ NATS_URL: "nats://a:4222, b:4223" }), [
    "nats://a:4222",
    "b:4223",
  ])
  for (const raw of ["nats://h:4222,", "hello world", "http://h:4222", ",", "tls://h:4222"]) {
    assert.throws(
      () => natsServersEnv({ NATS_URL: raw }),
      (err: Error) => err instanceof ConfigError && /NATS_URL must be/.test(err.message),
      raw,
    )
  }
  // Which server is wrong, not the value: it may carry user:password@.
  assert.throws(
    () => natsServersEnv({ NATS_URL: "nats://a:4222,ws://u:secret@b:4223" }),
    (err: Error) => /server 2 of 2 is not one/.test(err.message) && !err.message.includes("secret"),
  )
})

test("natsServersEnv refuses a user or password in NATS_URL, which nats.js would drop, without repeating it", () => {
  for (const raw of [
    "nats://u:secret@a:4222",
    "a:4222, u:secret@b:4223",
    "nats://:secret@a:4222",
  ]) {
    assert.throws(
      () => natsServersEnv({ NATS_URL: raw }),
      (err: Error) =>
        err instanceof ConfigError &&
        /carries a user or password.*NATS_USER and NATS_PASS/.test(err.message) &&
        !err.message.includes("secret"),
      raw,
    )
  }
})

test("natsAuthEnv: empty means unset; a password without a user is refused", () => {
  assert.deepEqual(natsAuthEnv({}), { user: undefined, pass: undefined, inboxPrefix: undefined })
  assert.deepEqual(natsAuthEnv({ NATS_USER: "relay", NATS_PASS: "p", NATS_INBOX_PREFIX: "_I.r" }), {
    user: "relay",
    pass: "p",
    inboxPrefix: "_I.r",
  })
  assert.throws(
    () => natsAuthEnv({ NATS_USER: "", NATS_PASS: "secret" }),
    (err: Error) =>
      err instanceof ConfigError &&
      /NATS_PASS is set without NATS_USER/.test(err.message) &&
      !err.message.includes("secret"),
  )
  // Refused by nats.js only when connecting, and retried there for ever; a space it sent on.
  for (const prefix of ["_INBOX_cloud-worker.>", "_I.*.r", "_I r", "_I..r", "_I."]) {
    assert.throws(
      () => natsAuthEnv({ NATS_INBOX_PREFIX: prefix }),
      (err: Error) =>
        err instanceof ConfigError &&
        err.message.startsWith(
          `NATS_INBOX_PREFIX ${JSON.stringify(prefix)} must be subject tokens`,
        ),
      prefix,
    )
  }
  assert.throws(
    () => natsAuthEnv({ NATS_USER: "relay\r", NATS_PASS: "p" }),
    /NATS_USER holds a space or a control character/,
  )
})

test("postgresUrlEnv refuses what is not a postgres URL, without repeating it (it may hold a password)", () => {
  const url = "postgres://u:secret@h:5432/db"
  assert.equal(postgresUrlEnv({ DATABASE_URL: url }), url)
  assert.throws(() => postgresUrlEnv({}), /DATABASE_URL is required/)
  for (const raw of ["not a url at all", "mysql://u:secret@h/db"]) {
    assert.throws(
      () => postgresUrlEnv({ DATABASE_URL: raw }),
      (err: Error) =>
        err instanceof ConfigError &&
        /DATABASE_URL must be a URL like postgres:/.test(err.message) &&
        !err.message.includes("secret"),
      raw,
    )
  }
  // A password pg cannot decode, said without repeating it.
  assert.throws(
    () => postgresUrlEnv({ DATABASE_URL: "postgres://u:secret%E9@h/db" }),
    (err: Error) =>
      err instanceof ConfigError &&
      /DATABASE_URL's password holds a % that does not start an escape/.test(err.message) &&
      !err.message.includes("secret"),
  )
  assert.throws(
    () => postgresUrlEnv({ DATABASE_URL: "postgres://u@h%E9/keyway" }),
    /DATABASE_URL's host holds a % that does not start an escape/,
  )
  assert.throws(
    () => postgresUrlEnv({ DATABASE_URL: "postgres://u@h/keyway%E9" }),
    /DATABASE_URL's database name holds a % that does not start an escape/,
  )
  assert.equal(
    postgresUrlEnv({ DATABASE_URL: "postgres://u:s%25cret%C3%A9@h/db" }),
    "postgres://u:s%25cret%C3%A9@h/db",
  )
  // pg would use the database named as the user.
  for (const raw of ["postgres://u:secret@h:5432", "postgres://u:secret@h:5432/"]) {
    assert.throws(
      () => postgresUrlEnv({ DATABASE_URL: raw }),
      (err: Error) =>
        err instanceof ConfigError &&
        /DATABASE_URL names no database/.test(err.message) &&
        !err.message.includes("secret"),
      raw,
    )
  }
  assert.equal(
    postgresUrlEnv({ DATABASE_URL: `${url}?connect_timeout=5` }),
    `${url}?connect_timeout=5`,
  )
  assert.throws(
    () => postgresUrlEnv({ DATABASE_URL: `${url}?connect_timeout=abc` }),
    (err: Error) =>
      err instanceof ConfigError &&
      /DATABASE_URL's connect_timeout must be a whole number of seconds/.test(err.message) &&
      !err.message.includes("secret"),
  )
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

test("an OTLP endpoint that is no http(s) base URL is refused at start, saying what is meant", () => {
  const refused = (value: string, pattern: RegExp) =>
    assert.throws(
      () => telemetryEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: value }, "keyway-relay"),
      (err: unknown) => err instanceof ConfigError && pattern.test(err.message),
      value,
    )
  // A URL to the parser, of scheme "jaeger:" or "localhost:".
  refused("jaeger:4318", /must be an http\(s\) URL such as http:\/\/jaeger:4318/)
  refused("localhost:4318", /must be an http\(s\) URL/)
  refused(
    "http://jaeger:4318/v1/traces",
    /base URL \(http:\/\/jaeger:4318\): \/v1\/traces is added/,
  )
  assert.equal(
    telemetryEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: "https://otel.example/collector" }, "x")
      .otlpEndpoint,
    "https://otel.example/collector",
  )
})

test("redisUrlEnv takes redis:// and rediss:// URLs, and refuses others without repeating them", () => {
  assert.equal(redisUrlEnv({}), "redis://127.0.0.1:6379")
  for (const url of ["redis://:p%2Fss@h:6379/1", "rediss://u:p@h:6380"]) {
    assert.equal(redisUrlEnv({ REDIS_URL: url }), url)
  }
  // A password with a slash: ioredis threw ERR_INVALID_URL with the value in it, late.
  for (const raw of ["redis://:pa/ss@127.0.0.1:6379", "127.0.0.1:6379", "http://h:6379"]) {
    assert.throws(
      () => redisUrlEnv({ REDIS_URL: raw }),
      (err: Error) =>
        err instanceof ConfigError &&
        /REDIS_URL must be/.test(err.message) &&
        !err.message.includes("pa/ss"),
      raw,
    )
  }
})

test("perSecondEnv takes decimal rates from 0.01 up to its bound, and nothing a timer could not pace", () => {
  assert.equal(perSecondEnv({}, "RATE", 10, 1000), 10)
  assert.equal(perSecondEnv({ RATE: "0.5" }, "RATE", 10, 1000), 0.5)
  assert.equal(perSecondEnv({ RATE: "1000" }, "RATE", 10, 1000), 1000)
  for (const raw of ["0", "0.001", "1001", "1e3", "0x10", "-1", "abc", "NaN"]) {
    assert.throws(
      () => perSecondEnv({ RATE: raw }, "RATE", 10, 1000),
      /RATE must be a number of events per second from 0.01 to 1000/,
      raw,
    )
  }
})

const refusedAs = (message: RegExp) => (err: unknown) =>
  err instanceof ConfigError && message.test(err.message)

test("natsClientEnv with no variable set: the machine's shared NATS, as nobody", () => {
  assert.deepEqual(natsClientEnv({}), {
    natsServers: ["nats://127.0.0.1:4222"],
    natsUser: undefined,
    natsPass: undefined,
    natsInboxPrefix: undefined,
  })
})

test("natsClientEnv takes each of its variables", () => {
  assert.deepEqual(
    natsClientEnv({
      NATS_URL: "nats://127.0.0.1:14222, 127.0.0.1:14223",
      NATS_USER: "cloud-admin",
      NATS_PASS: "secret",
      NATS_INBOX_PREFIX: "_INBOX_cloud-admin",
    }),
    {
      natsServers: ["nats://127.0.0.1:14222", "127.0.0.1:14223"],
      natsUser: "cloud-admin",
      natsPass: "secret",
      natsInboxPrefix: "_INBOX_cloud-admin",
    },
  )
})

test("natsClientEnv refuses a bad value by its variable's name, without repeating a password", () => {
  for (const url of ["nats://127.0.0.1:4222,", "tls://127.0.0.1:4222"]) {
    assert.throws(() => natsClientEnv({ NATS_URL: url }), refusedAs(/^NATS_URL must be/), url)
  }
  assert.throws(
    () => natsClientEnv({ NATS_URL: "nats://u:secret@127.0.0.1:4222" }),
    (err: Error) =>
      refusedAs(/^NATS_URL server 1 of 1 carries a user or password/)(err) &&
      !err.message.includes("secret"),
  )
  // nats.js sends a password only beside a user.
  assert.throws(
    () => natsClientEnv({ NATS_PASS: "secret" }),
    refusedAs(/^NATS_PASS is set without NATS_USER/),
  )
  assert.throws(
    () => natsClientEnv({ NATS_USER: "cloud-admin\r", NATS_PASS: "secret" }),
    refusedAs(/^NATS_USER holds a space or a control character/),
  )
  assert.throws(
    () => natsClientEnv({ NATS_USER: "cloud-admin", NATS_INBOX_PREFIX: "_INBOX_cloud-admin.>" }),
    refusedAs(/^NATS_INBOX_PREFIX "_INBOX_cloud-admin\.>" must be subject tokens/),
  )
})
