import { AsyncLocalStorage } from "node:async_hooks"
import { type Context, type ContextManager, ROOT_CONTEXT } from "@opentelemetry/api"

/**
 * The active context kept in an AsyncLocalStorage, so that context.with() holds across
 * awaits: what the SDK registers when it runs, for a process that runs none (startTelemetry
 * without an endpoint). Ours rather than @opentelemetry/context-async-hooks's: adding that
 * package made npm 11 here write a lock file that `npm ci` refuses (rust-just's platform
 * packages "missing"), and this is all of it that Keyway uses. bind() wraps functions only;
 * nothing in Keyway binds an event emitter.
 */
export class AsyncLocalContextManager implements ContextManager {
  #storage = new AsyncLocalStorage<Context>()

  active(): Context {
    return this.#storage.getStore() ?? ROOT_CONTEXT
  }

  with<A extends unknown[], F extends (...args: A) => ReturnType<F>>(
    context: Context,
    fn: F,
    thisArg?: ThisParameterType<F>,
    ...args: A
  ): ReturnType<F> {
    return this.#storage.run(context, () => fn.apply(thisArg, args))
  }

  bind<T>(context: Context, target: T): T {
    if (typeof target !== "function") return target
    const manager = this
    return function (this: unknown, ...args: unknown[]) {
      return manager.with(context, () => (target as (...a: unknown[]) => unknown).apply(this, args))
    } as T
  }

  enable(): this {
    return this
  }

  disable(): this {
    this.#storage.disable()
    return this
  }
}
