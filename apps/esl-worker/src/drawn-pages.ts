import { createHash } from "node:crypto"
import { applyAppSchema } from "@keyway/db"
import { type Kysely, sql } from "kysely"

/** The advisory lock workers starting together take turns on (applyAppSchema). */
const LOCK_KEY = 0x65736c32

/**
 * What a group last drew on each label: the page shown and a digest of each page's image. A
 * task draws only the pages that differ, so a price change of one page does not redraw (and
 * wake the radio of) every page of the label, and a page a dead task left undrawn differs
 * still when the next task comes. Written in the transaction that marks the task done: a
 * task that failed halfway drew pages it did not record, and its retry draws them again.
 */
export async function migrateDrawnPages(db: Kysely<any>): Promise<void> {
  await applyAppSchema(
    db,
    LOCK_KEY,
    sql`
      create schema if not exists esl_worker;
      create table if not exists esl_worker.drawn_label (
        group_name text        not null,
        label_code text        not null,
        shown_page int         not null,
        -- page number (as text) → sha256 of the PNG last pushed for it
        pages      jsonb       not null,
        updated_at timestamptz not null default now(),
        primary key (group_name, label_code)
      );
    `,
  )
}

export interface DrawnLabel {
  shownPage: number
  pages: Readonly<Record<string, string>>
}

export const imageDigest = (png: Buffer) => createHash("sha256").update(png).digest("hex")

export async function readDrawn(
  db: Kysely<any>,
  group: string,
  labelCode: string,
): Promise<DrawnLabel | undefined> {
  const r = await sql<{ shown_page: number; pages: Record<string, string> }>`
    select shown_page, pages from esl_worker.drawn_label
     where group_name = ${group} and label_code = ${labelCode}`.execute(db)
  const row = r.rows[0]
  return row && { shownPage: row.shown_page, pages: row.pages }
}

/** Records pages pushed, over what was recorded of the label's other pages. */
export async function recordDrawn(
  trx: Kysely<any>,
  group: string,
  labelCode: string,
  drawn: DrawnLabel,
): Promise<void> {
  await sql`
    insert into esl_worker.drawn_label (group_name, label_code, shown_page, pages)
    values (${group}, ${labelCode}, ${drawn.shownPage}, ${JSON.stringify(drawn.pages)}::jsonb)
    on conflict (group_name, label_code) do update
      set shown_page = excluded.shown_page,
          pages = esl_worker.drawn_label.pages || excluded.pages, updated_at = now()
  `.execute(trx)
}

/**
 * The idempotency key of a page's push: its event, the page, and the image's digest. The
 * digest too: a task run again after a crash between its push and its done, by a release
 * that draws the page otherwise, sends another image, which an AIMS that honours the key
 * would drop as a repeat while its digest is recorded.
 */
export const pushKey = (eventId: string, page: number, digest: string) =>
  `${eventId}:${page}:${digest.slice(0, 16)}`

/** The event a {@link pushKey} was made for. */
export const eventIdOfPushKey = (key: string) => key.replace(/:\d+:[0-9a-f]{16}$/, "")
