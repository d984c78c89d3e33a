import assert from "node:assert/strict"
import { readFile, stat, writeFile } from "node:fs/promises"
import { connect, type Socket } from "node:net"
import { join } from "node:path"
import { test } from "node:test"
import { checkNatsConfig, startNatsServer, waitFor } from "../src/index.ts"

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
