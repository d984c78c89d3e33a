# Keyway's commands. `npx just --list` shows them all.

set shell := ["bash", "-uc"]
set dotenv-load := false

export DATABASE_URL := env_var_or_default("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/keyway")
export NATS_URL := env_var_or_default("NATS_URL", "nats://127.0.0.1:4222")

default:
    @just --list

# Format check, lint, typecheck, tests: the gate before a commit.
check: lint typecheck test

lint:
    npx biome check .

fmt:
    npx biome check --write .

typecheck:
    npx tsc -p .

# Every test file (or the ones named), against the real Postgres, NATS and Redis.
test *files:
    #!/usr/bin/env bash
    set -euo pipefail
    shopt -s nullglob
    # Node 20's test runner takes no globs; bash expands them. Two files at a time: most
    # start servers or child processes, and the machine has two cores.
    files=({{ if files == "" { "schemas/test/*.test.ts libs/*/test/*.test.ts apps/*/test/*.test.ts" } else { files } }})
    exec node --import tsx --test --test-concurrency=2 "${files[@]}"

# Apply sql/ migrations to DATABASE_URL (creating the database if needed).
migrate:
    node --import tsx apps/migrate/src/main.ts

# Create or update the site's JetStream streams from nats/streams/<site>.json.
streams site="cloud":
    node --import tsx apps/streams/src/main.ts nats/streams/{{site}}.json

# Run the relay for a site in the foreground.
relay site="cloud":
    KEYWAY_SITE={{site}} KEYWAY_STREAMS_FILE=nats/streams/{{site}}.json node --import tsx apps/relay/src/main.ts

# A site with demo traffic on the machine's servers: migrate, streams, relay and writers.
demo site="cloud":
    node --import tsx apps/demo/src/main.ts {{site}}

# Benchmarks: `just bench relay`. Prints a table, then one JSON line.
bench name:
    node --import tsx bench/src/main.ts {{name}}
