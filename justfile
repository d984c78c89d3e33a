# Keyway's commands. `npx just --list` shows them all.

set shell := ["bash", "-uc"]
set dotenv-load := false

export DATABASE_URL := env_var_or_default("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/keyway")
export NATS_URL := env_var_or_default("NATS_URL", "nats://127.0.0.1:4222")

default:
    @just --list

# Format check, lint, typecheck, tests: the gate before a commit.
check: lint typecheck test

# Biome's format check and lint, as `check` runs them.
lint:
    npx biome check .

# Format and apply Biome's safe fixes in place.
fmt:
    npx biome check --write .

# tsc over the whole repository (no output files).
typecheck:
    npx tsc -p .

# Every test file (or the ones named), against the real Postgres, NATS and Redis.
test *files:
    #!/usr/bin/env bash
    set -euo pipefail
    shopt -s nullglob
    # Node 20's test runner takes no globs; bash expands them. Two files at a time: most
    # start servers or child processes, and the machine has two cores. Node 20 applies
    # --test-timeout to each file as a whole: a file that hangs is failed and killed after
    # 10 minutes (the slowest takes about 2) instead of holding the run until CI gives up.
    files=({{ if files == "" { "schemas/test/*.test.ts libs/*/test/*.test.ts apps/*/test/*.test.ts" } else { files } }})
    exec node --import tsx --test --test-concurrency=2 --test-timeout=600000 "${files[@]}"

# Apply sql/ migrations to DATABASE_URL (creating the database if needed).
migrate:
    node --import tsx apps/migrate/src/main.ts

# On NATS_URL: by default the machine's shared server, as `just demo` uses it, not `just up`'s.
# Create or update the site's JetStream streams from nats/streams/<site>.json.
streams site="cloud":
    node --import tsx apps/streams/src/main.ts nats/streams/{{site}}.json

# On DATABASE_URL and NATS_URL, which default to the machine's shared servers.
# Run a site's relay in the foreground; it applies nats/streams/<site>.json at start.
relay site="cloud":
    KEYWAY_SITE={{site}} KEYWAY_STREAMS_FILE=nats/streams/{{site}}.json node --import tsx apps/relay/src/main.ts

# One site with demo traffic on the machine's servers: migrate, streams, relay and a writer.
demo site="cloud":
    node --import tsx apps/demo/src/main.ts {{site}}

# Each site's NATS, Redis, migrated database, streams, relay, worker and demo writer, under
# the project's pm2 (.run/pm2). Running it again starts what is not running and restarts
# what runs with other settings than now (a rotated password, DEMO_RATE, an edited config).
# Both sites (or one: cloud, factory) on this machine, with demo traffic both ways.
up site="":
    @{{quote(just_executable())}} _one-at-a-time up
    flock -o .run/sites.lock node --import tsx apps/ops-local/src/main.ts up {{site}}

# Stop what `just up` started (both sites, or one); .run/ keeps the data for the next up.
down site="":
    @{{quote(just_executable())}} _one-at-a-time down
    flock -o .run/sites.lock node --import tsx apps/ops-local/src/main.ts down {{site}}

# Two `up`s at once each started a pm2 daemon on .run/pm2: one hung for good, and a daemon
# was left that `down` did not stop. So up, down and secrets of one checkout take turns (two
# first runs writing the secrets files at once could each leave a different leaf password).
[private]
_one-at-a-time what:
    #!/usr/bin/env bash
    mkdir -p .run
    if ! flock -n .run/sites.lock true; then
      echo "just {{what}}: another up, down or secrets of this checkout is running; waiting for it" >&2
    fi

# The consumer group's dead tasks, blocked keys and gaps, and demo effects, too.
# Per site of `just up`: processes, outbox backlog, stream counts, consumer lag, leaf link.
status:
    node --import tsx apps/ops-local/src/main.ts status

# `just up` does this itself; ops/compose reads the file with --env-file.
# Create .run/secrets-cloud.env and .run/secrets-factory.env (each site's NATS passwords and
# the leaf link's, mode 600) if missing; never prints them.
[doc("Create each site's NATS secrets file (.run/secrets-<site>.env, mode 600) if missing.")]
secrets:
    @{{quote(just_executable())}} _one-at-a-time secrets
    flock -o .run/sites.lock node --import tsx apps/ops-local/src/main.ts secrets

# pm2 on the project's own daemon (never a global one): `just pm2 logs factory-worker`.
# With no more of the caller's environment than it needs to run: `pm2 restart --update-env`
# copies the pm2 command's environment over the process's, and with the shared servers'
# DATABASE_URL and NATS_URL exported above a site's relay went on to write into database
# keyway and NATS 4222 (a shell's METRICS_PORT or REDIS_URL would do as much harm).
[positional-arguments]
pm2 *args:
    env -i PATH="$PATH" HOME="$HOME" TERM="${TERM:-dumb}" LANG="${LANG:-C.UTF-8}" PM2_HOME="{{justfile_directory()}}/.run/pm2" PM2_KILL_SIGNAL=SIGTERM npx pm2 "$@"

# DATABASE_URL names the group's database; for `just up`'s cloud site:
# `DATABASE_URL=postgres://postgres@127.0.0.1:5432/keyway_cloud npx just admin dead --group cloud-demo`.
# Arguments pass through as given ("$@"): pasted into the command line, a key with a space
# or a * would be split or globbed by the shell. (`--list` shows a recipe's last comment
# line only; [doc] gives it the summary instead.)
[doc("A consumer group's summary, dead tasks, gaps, blocked keys and rejects; retry, skip, redrive.")]
[positional-arguments]
admin *args:
    node --import tsx apps/admin/src/main.ts "$@"

# `npx just replay --site factory --stream FACTORY --key item-3`, or on the server NATS_URL
# names: `npx just replay --stream S --since 10m --follow`. --help lists all.
[doc("A stream's messages, decoded, one JSON line each, in order, without touching any consumer group.")]
[positional-arguments]
replay *args:
    node --import tsx apps/replay/src/main.ts "$@"

# Benchmarks: `just bench relay`. Prints a table, then one JSON line.
bench name:
    node --import tsx bench/src/main.ts {{name}}
