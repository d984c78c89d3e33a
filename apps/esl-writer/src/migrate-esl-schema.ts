import { applyAppSchema } from "@keyway/db"
import { type Kysely, sql } from "kysely"

/** The advisory lock writers starting together take turns on (applyAppSchema). */
const LOCK_KEY = 0x65736c31

/**
 * Creates the writer's own tables in schema `esl` if they are missing. They belong to this
 * app, not to Keyway's `sql/` migrations: Keyway only needs the outbox, and the domain evolves
 * with the app.
 */
export async function migrateEslSchema(db: Kysely<any>): Promise<void> {
  await applyAppSchema(
    db,
    LOCK_KEY,
    sql`
      create schema if not exists esl;
      create table if not exists esl.product (
        id          text        primary key,
        name        text        not null,
        price_minor bigint      not null check (price_minor >= 0),
        currency    text        not null,
        updated_at  timestamptz not null default now()
      );
      -- A label. last_job_id is the job whose task was enqueued last for the label: what the
      -- label must end up showing. What its pages show is in esl.label_page, below.
      create table if not exists esl.label (
        label_code  text        primary key,
        product_id  text        not null references esl.product (id),
        page        int         not null default 1,
        front_page  boolean     not null default true,
        last_job_id text,
        updated_at  timestamptz not null default now()
      );
      -- The page the label was last told to show (AIMS frontPage), null until a job brought
      -- one to the front. Added after the table: a writer's start adds it to an older one.
      -- Both statements below lock esl.label before they look whether there is anything to
      -- do ("if not exists" included), so they run only when there is.
      do $$
      begin
        if not exists (select from pg_attribute
                        where attrelid = 'esl.label'::regclass and attname = 'shown_page'
                          and not attisdropped) then
          alter table esl.label add column shown_page int;
        end if;
        if to_regclass('esl.label_product_idx') is null then
          create index label_product_idx on esl.label (product_id);
        end if;
        -- What each page of a label shows (SoluM labels have up to 7). esl.label's product_id,
        -- page and front_page held one binding per label: a label job for another page
        -- replaced it, and the page bound before, the one shown included, was never drawn
        -- again. They stay, set as before, for writers of older releases; this table is what
        -- tasks are made from, filled from them when it is created and kept in step with
        -- them after (the trigger below). job_id is the job that last set what the page
        -- shows, drawn in its footer.
        if to_regclass('esl.label_page') is null then
          create table esl.label_page (
            label_code text not null references esl.label (label_code),
            page       int  not null check (page between 1 and 7),
            product_id text not null references esl.product (id),
            job_id     text not null,
            primary key (label_code, page)
          );
          create index label_page_product_idx on esl.label_page (product_id);
          insert into esl.label_page (label_code, page, product_id, job_id)
          select label_code, page, product_id, coalesce(last_job_id, 'before-pages') from esl.label;
        end if;
        -- A binding written to esl.label alone (a writer of an older release, running beside
        -- this one during an upgrade; a script) is a page's binding all the same: filled in
        -- only once, esl.label_page missed it, and this writer's tasks drew the page's old
        -- product, or none. This writer's own label jobs write the same row again.
        create or replace function esl.label_page_from_label() returns trigger
          language plpgsql as $f$
        begin
          insert into esl.label_page (label_code, page, product_id, job_id)
          values (new.label_code, new.page, new.product_id, coalesce(new.last_job_id, 'before-pages'))
          on conflict (label_code, page) do update
            set product_id = excluded.product_id, job_id = excluded.job_id;
          return null;
        end
        $f$;
        if not exists (select from pg_trigger
                        where tgrelid = 'esl.label'::regclass and tgname = 'label_page_from_label') then
          create trigger label_page_from_label after insert or update of product_id, page on esl.label
            for each row execute function esl.label_page_from_label();
        end if;
      end
      $$;
      create table if not exists esl.job (
        id         text        primary key,
        kind       text        not null check (kind in ('price_change', 'label_job')),
        labels     int         not null,
        created_at timestamptz not null default now()
      );
      -- One row per task: the label's outbox version for this job, so "which job is this
      -- version" is a lookup, not a guess.
      create table if not exists esl.job_label (
        job_id     text   not null references esl.job (id),
        label_code text   not null,
        ver        bigint not null,
        primary key (job_id, label_code)
      );
    `,
  )
}
