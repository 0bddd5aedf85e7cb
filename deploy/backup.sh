#!/usr/bin/env bash
# Backups of CryptoVault's state. See "Backup and restore" in the README for the runbook.
#
#   deploy/backup.sh postgres-logical [DIR]  pg_dump (custom format) of DATABASE_URL
#   deploy/backup.sh postgres-base [DIR]     pg_basebackup of the whole Postgres cluster
#                                            (tar, compressed, WAL streamed), for point-in-time
#                                            recovery together with WAL archiving
#   deploy/backup.sh jetstream [DIR]         snapshot of a stopped nats-server's JetStream store
#                                            (NATS_STORE_DIR), for a single node; on a cluster,
#                                            R3 streams survive a node, and `nats stream backup`
#                                            (the nats CLI, JetStream's snapshot API) takes
#                                            online snapshots
#
# DIR defaults to ./backups. Each mode prints the path of the file it wrote on its last line.
# The Postgres URL and the store path come from the environment, never from arguments, so they
# do not appear in process lists; the password in DATABASE_URL is never printed.
set -euo pipefail

die() {
  printf 'backup: %s\n' "$*" >&2
  exit 1
}

mode=${1:-}
dir=${2:-backups}
stamp=$(date -u +%Y%m%dT%H%M%SZ)

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 not found (Debian: apt-get install ${2:-postgresql-client})"
}

case "$mode" in
  postgres-logical)
    need pg_dump
    [ -n "${DATABASE_URL:-}" ] || die "DATABASE_URL is not set"
    mkdir -p "$dir"
    out="$dir/vault-$stamp.pgdump"
    # Custom format: compressed, restorable table by table, and consistent (one snapshot).
    pg_dump --format=custom --no-owner --no-privileges --file="$out.partial" --dbname="$DATABASE_URL"
    mv "$out.partial" "$out"
    printf '%s\n' "$out"
    ;;
  postgres-base)
    need pg_basebackup
    [ -n "${DATABASE_URL:-}" ] || die "DATABASE_URL is not set (a role with REPLICATION)"
    out="$dir/vault-base-$stamp"
    mkdir -p "$out"
    pg_basebackup --dbname="$DATABASE_URL" --pgdata="$out" --format=tar --gzip --wal-method=stream \
      --checkpoint=fast --label="vault-$stamp"
    printf '%s\n' "$out"
    ;;
  jetstream)
    [ -n "${NATS_STORE_DIR:-}" ] || die "NATS_STORE_DIR is not set (the nats-server store_dir)"
    [ -d "$NATS_STORE_DIR/jetstream" ] || die "no JetStream store under NATS_STORE_DIR"
    # A snapshot of files being written is not a snapshot: the server must be stopped.
    if [ -n "${NATS_PID:-}" ] && kill -0 "$NATS_PID" 2>/dev/null; then
      die "nats-server (pid $NATS_PID) is running; stop it first (./deploy/local.sh backup does)"
    fi
    mkdir -p "$dir"
    out="$dir/jetstream-$stamp.tar.gz"
    tar -C "$NATS_STORE_DIR" -czf "$out.partial" jetstream
    mv "$out.partial" "$out"
    printf '%s\n' "$out"
    ;;
  *)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
