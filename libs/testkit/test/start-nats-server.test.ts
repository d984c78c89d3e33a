import assert from "node:assert/strict"
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises"
import { connect, type Socket } from "node:net"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { test } from "node:test"
import {
  checkNatsConfig,
  freePort,
  ServerStartError,
  startNatsFromConfig,
  startNatsServer,
  waitFor,
} from "../src/index.ts"
import { natsServerBinary } from "../src/internal/binaries.ts"
import { type RunningChild, spawnChild, terminate } from "../src/internal/child-process.ts"

// Just enough of the NATS wire protocol to make JetStream API requests, so testkit's own
// tests need no client library.
class RawNats {
  private buffer = ""
  private waiters: Array<() => void> = []
  private constructor(private readonly socket: Socket) {
    socket.setEncoding("utf8")
    socket.on("data", (chunk: string) => {
      this.buffer += chunk
      // The server pings new clients early and drops those that do not answer.
      if (this.buffer.includes("PING\r\n")) {
        this.buffer = this.buffer.replaceAll("PING\r\n", "")
        socket.write("PONG\r\n")
      }
      for (const wake of this.waiters.splice(0)) wake()
    })
  }

  static async connect(port: number): Promise<RawNats> {
    const socket = connect({ port, host: "127.0.0.1" })
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve).once("error", reject)
    })
    const nc = new RawNats(socket)
    await nc.readUntil(/^INFO .*\r\n/)
    socket.write('CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\nPING\r\n')
    await nc.readUntil(/PONG\r\n/)
    return nc
  }

  private async readUntil(pattern: RegExp): Promise<RegExpExecArray> {
    for (;;) {
      const m = pattern.exec(this.buffer)
      if (m) {
        this.buffer = this.buffer.slice(m.index + m[0].length)
        return m
      }
      await new Promise<void>((resolve) => this.waiters.push(resolve))
    }
  }

  async request(subject: string, payload: string): Promise<any> {
    const inbox = `_INBOX.${Math.random().toString(36).slice(2)}`
    this.socket.write(
      `SUB ${inbox} 1\r\nPUB ${subject} ${inbox} ${Buffer.byteLength(payload)}\r\n${payload}\r\n`,
    )
    const head = await this.readUntil(/MSG \S+ 1\s+(\d+)\r\n/)
    const size = Number(head[1])
    const body = await this.readUntil(new RegExp(`^([\\s\\S]{${size}})\\r\\n`))
    this.socket.write("UNSUB 1\r\n")
    return JSON.parse(body[1]!)
  }

  close(): void {
    this.socket.destroy()
  }
}

async function jsz(httpPort: number): Promise<any> {
  const res = await fetch(`http://127.0.0.1:${httpPort}/jsz`)
  return res.json()
}

test("a NATS server survives kill and restart on the same port with its store", async () => {
  await using nats = await startNatsServer({ domain: "factory" })
  assert.equal(nats.url, `nats://127.0.0.1:${nats.port}`)
  assert.notEqual(nats.port, nats.httpPort)

  const nc = await RawNats.connect(nats.port)
  const created = await nc.request(
    "$JS.API.STREAM.CREATE.T",
    JSON.stringify({ name: "T", subjects: ["t.>"], storage: "file" }),
  )
  assert.equal(created.error, undefined, JSON.stringify(created.error))
  const ack = await nc.request("t.one", "hello")
  assert.equal(ack.stream, "T")
  assert.equal(ack.seq, 1)
  assert.equal(ack.domain, "factory")
  nc.close()

  await nats.kill()
  await assert.rejects(fetch(`http://127.0.0.1:${nats.httpPort}/varz`))
  await assert.rejects(nats.kill().then(() => RawNats.connect(nats.port)))

  await nats.start()
  const after = await jsz(nats.httpPort)
  assert.equal(after.config.domain, "factory")
  assert.equal(after.config.store_dir, join(nats.storeDir, "jetstream"))
  assert.equal(after.streams, 1)
  assert.equal(after.messages, 1)
  assert.ok((await stat(join(nats.storeDir, "jetstream"))).isDirectory())

  await nats.restart()
  const nc2 = await RawNats.connect(nats.port)
  const ack2 = await nc2.request("t.two", "again")
  assert.equal(ack2.seq, 2)
  nc2.close()

  await assert.rejects(nats.start(), /already running/)
  assert.match(await readFile(nats.logPath, "utf8"), /Server is ready/)
})

test("jetstream: false starts a plain server; extra config is appended", async () => {
  await using nats = await startNatsServer({
    jetstream: false,
    name: "plain",
    config: "max_payload: 65536",
  })
  const varz: any = await (await fetch(`http://127.0.0.1:${nats.httpPort}/varz`)).json()
  assert.equal(varz.server_name, "plain")
  assert.equal(varz.max_payload, 65536)
  assert.equal(varz.jetstream?.config, undefined)
  await nats.stop()
  await nats.start()
  await waitFor(async () => (await fetch(`http://127.0.0.1:${nats.httpPort}/healthz`)).ok, {
    timeoutMs: 2000,
    message: "healthz after restart",
  })
})

test("a server that cannot start fails with its log", async () => {
  await assert.rejects(startNatsServer({ config: "no_such_option: true" }), (err: Error) => {
    assert.equal(err.name, "ServerStartError")
    assert.match(err.message, /exited during startup/)
    assert.match(err.message, /unknown field "no_such_option"/)
    return true
  })
})

test("dispose removes the directory", async () => {
  const nats = await startNatsServer()
  await nats[Symbol.asyncDispose]()
  await assert.rejects(stat(nats.dir), { code: "ENOENT" })
})

test("checkNatsConfig accepts a 2.9 config and rejects 2.10+ keys", async () => {
  await using nats = await startNatsServer()
  const good = await checkNatsConfig(nats.configPath)
  assert.equal(good.ok, true, good.output)
  assert.match(good.output, /is valid/)

  const bad = join(nats.dir, "bad.conf")
  await writeFile(
    bad,
    `jetstream { store_dir: ${JSON.stringify(nats.storeDir)}, sync_interval: "1s" }\n`,
  )
  const result = await checkNatsConfig(bad)
  assert.equal(result.ok, false)
  assert.match(result.output, /unknown field "sync_interval"/)

  const missing = await checkNatsConfig(join(nats.dir, "missing.conf"))
  assert.equal(missing.ok, false)
})

/** Another test's server, on ports that were ours. */
async function startForeignNats(
  port: number,
  httpPort: number,
  logPath: string,
): Promise<RunningChild> {
  const args = ["-a", "127.0.0.1", "-p", String(port), "-m", String(httpPort), "-n", "foreign"]
  const child = await spawnChild({ command: natsServerBinary, args, logPath })
  try {
    await waitFor(
      async () => {
        if ((await fetch(`http://127.0.0.1:${httpPort}/healthz`)).status !== 200) return false
        ;(await RawNats.connect(port)).close()
        return true
      },
      { timeoutMs: 10_000, message: "foreign nats-server ready" },
    )
  } catch (err) {
    await terminate(child, "SIGKILL")
    throw err
  }
  return child
}

/**
 * SIGSTOPs the process `pid()` names as soon as it exists. That stands for a server slow to
 * start (a loaded machine): stopped before it gets to its ports, it leaves whoever holds them
 * to answer the launcher's probes for as long as the start waits, where otherwise the window
 * lasts until it fails on the port in use, a few milliseconds.
 */
async function stopOnceSpawned(
  pid: () => number | undefined | Promise<number | undefined>,
  starting: Promise<unknown>,
): Promise<void> {
  let settled = false
  void starting.then(
    () => (settled = true),
    () => (settled = true),
  )
  while (!settled) {
    const found = await pid()
    if (found !== undefined) {
      process.kill(found, "SIGSTOP")
      return
    }
    await new Promise((resolve) => setImmediate(resolve))
  }
}

async function children(): Promise<number[]> {
  const list = await readFile(`/proc/self/task/${process.pid}/children`, "utf8")
  return list
    .split(" ")
    .filter((pid) => pid !== "")
    .map(Number)
}

test("a restart onto ports another nats-server took while it was down fails, not takes that server for its own", async () => {
  await using nats = await startNatsServer({ jetstream: false, readyTimeoutMs: 3000 })
  await nats.stop()
  const foreign = await startForeignNats(nats.port, nats.httpPort, join(nats.dir, "foreign.log"))
  try {
    const starting = nats.start()
    await stopOnceSpawned(() => nats.pid, starting)
    await assert.rejects(starting, ServerStartError)
    assert.equal(nats.pid, undefined)
  } finally {
    await terminate(foreign, "SIGKILL")
  }
})

test("startNatsFromConfig does not take a server already on its ports for its own", async () => {
  const dir = await mkdtemp(join(tmpdir(), "keyway-natsconf-test-"))
  const port = await freePort()
  let httpPort = await freePort()
  while (httpPort === port) httpPort = await freePort()
  const configPath = join(dir, "plain.conf")
  await writeFile(
    configPath,
    "host: $KEYWAY_NATS_HOST\nport: $KEYWAY_NATS_PORT\nhttp_port: $KEYWAY_NATS_HTTP_PORT\n",
  )
  const foreign = await startForeignNats(port, httpPort, join(dir, "foreign.log"))
  const known = new Set(await children())
  const starting = startNatsFromConfig({
    configPath,
    env: { KEYWAY_NATS_PORT: String(port), KEYWAY_NATS_HTTP_PORT: String(httpPort) },
    jetstream: false,
    readyTimeoutMs: 3000,
  })
  try {
    // From /proc: this launcher names no pid before its start has returned.
    await stopOnceSpawned(async () => (await children()).find((pid) => !known.has(pid)), starting)
    await assert.rejects(starting, ServerStartError)
  } finally {
    await starting.then(
      (nats) => nats[Symbol.asyncDispose](),
      () => {},
    )
    await terminate(foreign, "SIGKILL")
    await rm(dir, { recursive: true, force: true })
  }
})
