// redlock 5.0.0-beta.2 ships typings that its package.json "exports" hides from NodeNext
// resolution, so TypeScript sees an untyped module. This declares the part Keyway uses, from
// node_modules/redlock/dist/index.d.ts of that exact (pinned) version.
declare module "redlock" {
  import type { EventEmitter } from "node:events"
  import type { Redis } from "ioredis"

  export interface Settings {
    readonly driftFactor: number
    readonly retryCount: number
    readonly retryDelay: number
    readonly retryJitter: number
    readonly automaticExtensionThreshold: number
  }

  export class Lock {
    readonly resources: string[]
    readonly value: string
    expiration: number
    release(): Promise<unknown>
    extend(duration: number): Promise<Lock>
  }

  export default class Redlock extends EventEmitter {
    constructor(clients: Iterable<Redis>, settings?: Partial<Settings>)
    acquire(resources: string[], duration: number, settings?: Partial<Settings>): Promise<Lock>
  }
}
