/**
 * A promise the test resolves by hand, to hold a handler or a writer at a chosen point:
 * `await opened` there, `open()` from the test. What Promise.withResolvers() gives on newer
 * Node versions; Node 20 lacks it.
 */
export function gate(): { opened: Promise<void>; open: () => void } {
  let open!: () => void
  const opened = new Promise<void>((resolve) => {
    open = resolve
  })
  return { opened, open }
}
