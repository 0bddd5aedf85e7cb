#!/usr/bin/env bash
# Restores what deploy/backup.sh wrote. See "Backup and restore" in the README for the runbook.
#
#   deploy/restore.sh postgres-logical FILE  into DATABASE_URL, which must be an empty database
#                                            (create it first: createdb, or CREATE DATABASE);
#                                            all or nothing (one transaction)
#   deploy/restore.sh jetstream FILE         into NATS_STORE_DIR of a stopped nats-server; the
#                                            store there is moved aside, not deleted
#
# After a Postgres restore, run `vault-engine reconcile` and `vault-worker audit verify` against
# it before starting the stack: both must pass.
set -euo pipefail

die() {
  printf 'restore: %s\n' "$*" >&2
  exit 1
}

mode=${1:-}
file=${2:-}
[ -n "$file" ] || {
  sed -n '2,12p' "$0" >&2
  exit 2
}
[ -f "$file" ] || die "$file: no such file"

case "$mode" in
  postgres-logical)
    command -v pg_restore >/dev/null 2>&1 || die "pg_restore not found (Debian: apt-get install postgresql-client)"
    [ -n "${DATABASE_URL:-}" ] || die "DATABASE_URL is not set"
    # Refuse to restore over data: a restore is for a new, empty database.
    tables=$(psql "$DATABASE_URL" -qtAc \
      "select count(*) from information_schema.tables where table_schema = 'public'") ||
      die "cannot connect to DATABASE_URL"
    [ "$tables" = 0 ] || die "the target database is not empty ($tables tables); restore into a new database"
    pg_restore --no-owner --no-privileges --exit-on-error --single-transaction --dbname="$DATABASE_URL" "$file"
    printf 'restored %s\n' "$file"
    ;;
  jetstream)
    [ -n "${NATS_STORE_DIR:-}" ] || die "NATS_STORE_DIR is not set (the nats-server store_dir)"
    if [ -n "${NATS_PID:-}" ] && kill -0 "$NATS_PID" 2>/dev/null; then
      die "nats-server (pid $NATS_PID) is running; stop it first"
    fi
    mkdir -p "$NATS_STORE_DIR"
    if [ -e "$NATS_STORE_DIR/jetstream" ]; then
      aside="$NATS_STORE_DIR/jetstream.before-restore-$(date -u +%Y%m%dT%H%M%SZ)"
      mv "$NATS_STORE_DIR/jetstream" "$aside"
      printf 'moved the existing store aside to %s\n' "$aside"
    fi
    tar -C "$NATS_STORE_DIR" -xzf "$file"
    printf 'restored %s\n' "$file"
    ;;
  *)
    sed -n '2,12p' "$0" >&2
    exit 2
    ;;
esac
