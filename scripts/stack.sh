#!/usr/bin/env bash
# Local development/test stack for orderfleet: a private PostgreSQL cluster and
# the moto AWS emulator (SQS, EventBridge, ...), both bound to 127.0.0.1 only.
#
# Usage: scripts/stack.sh up|down|env|status|tools|clean
#
#   up      start PostgreSQL + moto (installs moto into .venv on first use);
#           reuses whatever is already answering on the configured ports
#   down    stop what this checkout started (idempotent)
#   env     print `export ...` lines for the stack (only those, on stdout):
#             eval "$(scripts/stack.sh env)"
#   status  one line for PostgreSQL, one for moto (exit 1 unless both answer)
#   tools   install extra test tools into .venv (cfn-lint, aiosmtpd)
#   clean   down + delete all local state (.local and the PostgreSQL data dir)
#
# Environment:
#   ORDERFLEET_PG_PORT    PostgreSQL TCP port        (default 55433)
#   ORDERFLEET_MOTO_PORT  moto server port           (default 55500)
#   PG_BIN                directory holding initdb/pg_ctl/postgres/psql
#   ORDERFLEET_PG_OS_USER OS user that runs PostgreSQL when invoked as root
#                         (default postgres)
#   PYTHON                interpreter used to create .venv (default python3)
#
# All progress/diagnostic messages go to stderr; only `env` and `status`
# write to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
LOCAL="$ROOT/.local"
VENV="$ROOT/.venv"

PG_PORT="${ORDERFLEET_PG_PORT:-55433}"
MOTO_PORT="${ORDERFLEET_MOTO_PORT:-55500}"
PG_OS_USER="${ORDERFLEET_PG_OS_USER:-postgres}"
# The planner's cost of a random page read, as docs/deploy.md recommends for the deployed
# database, whose parameter group sets the same (xtask's deploy tests check that the two agree):
# at PostgreSQL's default of 4, tables of a few thousand rows are read whole where the fleet
# looks rows up by key, and each read costs as much as the table is large (docs/BENCHMARKS.md).
PG_RANDOM_PAGE_COST=1.1
PYTHON="${PYTHON:-python3}"

PG_DB=orderfleet
PG_ROLE=orderfleet

# Pinned tool versions (bump deliberately; a changed pin triggers a reinstall).
MOTO_VERSION=5.2.5
CFN_LINT_SPEC="${ORDERFLEET_CFN_LINT_SPEC:-cfn-lint}"
AIOSMTPD_SPEC="${ORDERFLEET_AIOSMTPD_SPEC:-aiosmtpd}"

MOTO_PID_FILE="$LOCAL/moto.pid"
MOTO_LOG="$LOCAL/moto.log"
# moto's server has no dedicated health endpoint. GET / "works" but is the S3
# ListBuckets call; GET /moto-api/data.json dumps every emulated resource
# (slow once queues hold many messages). GET /moto-api/config is cheap and
# state-independent: it answers a tiny JSON document (with status 201, not 200,
# in moto 5.2.5 - curl -f accepts any 2xx).
MOTO_HEALTH_PATH=/moto-api/config

log() { printf 'stack: %s\n' "$*" >&2; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

check_port() {
    local name=$1 value=$2
    if ! [[ $value =~ ^[0-9]+$ ]] || ((value < 1 || value > 65535)); then
        die "$name must be a TCP port number, got '$value'"
    fi
}
check_port ORDERFLEET_PG_PORT "$PG_PORT"
check_port ORDERFLEET_MOTO_PORT "$MOTO_PORT"

is_root() { [[ $(id -u) -eq 0 ]]; }

# Serialise up/down/tools/clean of one checkout (e.g. `make -j`).
# NB: daemons we start must not inherit fd 9, or they would hold the lock
# forever (hence the `9>&-` on the start commands below).
take_lock() {
    mkdir -p "$LOCAL"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$LOCAL/stack.lock"
        flock 9
    fi
}

# ---------------------------------------------------------------- PostgreSQL

PG_BIN_DIR=""
find_pg_bin() {
    local d
    if [[ -n ${PG_BIN:-} ]]; then
        [[ -x $PG_BIN/initdb && -x $PG_BIN/pg_ctl ]] \
            || die "PG_BIN=$PG_BIN does not contain initdb and pg_ctl"
        PG_BIN_DIR=$PG_BIN
        return 0
    fi
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if [[ -n $d && -x $d/initdb && -x $d/pg_ctl ]]; then
            PG_BIN_DIR=$d
            return 0
        fi
    fi
    # Debian/Ubuntu layout: /usr/lib/postgresql/<major>/bin, take the newest.
    d="$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    if [[ -n $d && -x $d/initdb && -x $d/pg_ctl ]]; then
        PG_BIN_DIR=$d
        return 0
    fi
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        PG_BIN_DIR="$(dirname "$(command -v initdb)")"
        return 0
    fi
    return 1
}

require_pg_bin() {
    find_pg_bin && return 0
    {
        echo "stack: error: PostgreSQL server binaries (initdb, pg_ctl, postgres) not found."
        echo "  Install them, e.g."
        if is_root; then
            echo "    Debian/Ubuntu:  apt-get update && apt-get install -y postgresql"
        else
            echo "    Debian/Ubuntu:  sudo apt-get install -y postgresql"
        fi
        echo "    Fedora/RHEL:    sudo dnf install -y postgresql-server"
        echo "    macOS:          brew install postgresql@16"
        echo "  or point PG_BIN at the directory that contains initdb and pg_ctl."
    } >&2
    exit 1
}

# Run a command as the OS user that owns the cluster. PostgreSQL refuses to
# run as root, so as root we switch to $PG_OS_USER; otherwise we run as the
# current user. `cd /` avoids "could not change directory" noise when the
# caller's cwd is not readable by that user.
as_pg() {
    if is_root; then
        if command -v runuser >/dev/null 2>&1; then
            (cd / && runuser -u "$PG_OS_USER" -- "$@")
        else
            (cd / && su "$PG_OS_USER" -s /bin/sh -c "$(printf '%q ' "$@")")
        fi
    else
        "$@"
    fi
}

# Where the cluster lives.
#
# Preferred: <project>/.local/pg (git-ignored). When running as root, the
# cluster must be owned by an unprivileged user ($PG_OS_USER), and that user
# must be able to traverse every parent directory of the data directory. A
# checkout under e.g. /root (mode 700) is not traversable, and chmod'ing
# directories we don't own is not our business, so in that case (and when the
# unix socket path would exceed the ~107 byte sun_path limit) the cluster goes
# to /tmp/orderfleet-<hash of the project path> instead: /tmp is traversable
# by everyone, the hash keeps separate checkouts apart, and the directory is
# created mode 700 and owned by the cluster user. Being under /tmp, that data
# may vanish on reboot; it is a disposable dev/test cluster anyway.
#
# Once a cluster has been initialised in either place, that place is reused.
PG_BASE=""
pg_fallback_base() {
    local h
    if command -v sha256sum >/dev/null 2>&1; then
        h="$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
    else
        h="$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
    fi
    printf '/tmp/orderfleet-%s-%s' "$(id -un)" "$h"
}

urlencode() { # string: percent-encodes all but unreserved characters (RFC 3986)
    local s=$1 out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
        [A-Za-z0-9._~-]) out+=$c ;;
        *) printf -v c '%%%02X' "'$c" && out+=$c ;;
        esac
    done
    printf '%s' "$out"
}

pg_user_can_reach() { # dir
    if is_root; then
        as_pg test -x "$1" 2>/dev/null
    else
        test -x "$1"
    fi
}

locate_pg_base() {
    local preferred="$LOCAL/pg" fallback
    fallback="$(pg_fallback_base)"
    if [[ -f $preferred/data/PG_VERSION ]]; then
        PG_BASE=$preferred
    elif [[ -f $fallback/data/PG_VERSION ]]; then
        PG_BASE=$fallback
    else
        PG_BASE=$preferred
        # "<base>/sock/.s.PGSQL.<port>" must fit into sun_path (108 bytes).
        if ((${#preferred} + 22 > 100)); then
            PG_BASE=$fallback
        elif is_root; then
            mkdir -p "$LOCAL"
            # .local is ours; make sure the cluster user may traverse it
            # (harmless otherwise: the one secret in .local, the local lake key, is 0600).
            chmod o+x "$LOCAL" 2>/dev/null || true
            pg_user_can_reach "$LOCAL" || PG_BASE=$fallback
        fi
    fi
}

prepare_pg_base() {
    if [[ $PG_BASE == /tmp/* ]]; then
        # /tmp is shared: create our directory ourselves and refuse to use a
        # pre-existing one that is a symlink or owned by someone else.
        if [[ ! -e $PG_BASE ]]; then
            mkdir -m 700 "$PG_BASE"
        fi
        [[ -d $PG_BASE && ! -L $PG_BASE ]] || die "$PG_BASE is not a plain directory"
        local owner
        owner="$(stat -c %U "$PG_BASE" 2>/dev/null || stat -f %Su "$PG_BASE")"
        [[ $owner == "$(id -un)" || $owner == "$PG_OS_USER" ]] \
            || die "$PG_BASE is owned by '$owner'; remove it and retry"
        log "note: PostgreSQL data lives in $PG_BASE (project directory not usable by the cluster user)"
    else
        mkdir -p "$PG_BASE"
    fi
    if is_root; then
        chown "$PG_OS_USER": "$PG_BASE"
        chmod 700 "$PG_BASE"
    fi
}

pg_ready() {
    "$PG_BIN_DIR/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2 >/dev/null 2>&1
}

pg_psql() { # args...
    PGCONNECT_TIMEOUT=5 "$PG_BIN_DIR/psql" -X -q -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$PG_PORT" -U "$PG_ROLE" "$@"
}

pg_init() {
    local data="$PG_BASE/data" sock="$PG_BASE/sock"
    as_pg mkdir -p "$sock"
    log "initialising PostgreSQL cluster in $data"
    if ! as_pg "$PG_BIN_DIR/initdb" -D "$data" --auth=trust --username="$PG_ROLE" \
        --encoding=UTF8 --locale=C >"$LOCAL/initdb.log" 2>&1; then
        tail -n 30 "$LOCAL/initdb.log" >&2 || true
        die "initdb failed (full log: $LOCAL/initdb.log)"
    fi
    # Local dev/test cluster only: no durability needed, so fsync,
    # synchronous_commit and full_page_writes are off (much faster test runs;
    # a crash of the machine may corrupt this cluster, which is acceptable).
    # Listen on loopback only; the unix socket lives inside the data area so
    # we never need /var/run/postgresql. The port is given at start time.
    local sock_q=${sock//\'/\'\'}
    as_pg tee -a "$data/postgresql.conf" >/dev/null <<EOF

# ---- orderfleet local dev/test settings (written by scripts/stack.sh) ----
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sock_q'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
}

pg_up() {
    require_pg_bin
    if pg_ready; then
        log "PostgreSQL already answering on 127.0.0.1:$PG_PORT, reusing it"
        # The planner's cost is given at start (below): a cluster started without it keeps
        # PostgreSQL's default until it is restarted.
        local cost
        cost="$(pg_psql -d postgres -tA -c 'show random_page_cost' 2>/dev/null || true)"
        if [[ -n $cost && $cost != "$PG_RANDOM_PAGE_COST" ]]; then
            log "warning: this PostgreSQL plans with random_page_cost = $cost, not" \
                "$PG_RANDOM_PAGE_COST as the deployed database does; '$0 down' and up again to fix"
        fi
    else
        locate_pg_base
        prepare_pg_base
        local data="$PG_BASE/data"
        [[ -f $data/PG_VERSION ]] || pg_init
        if as_pg "$PG_BIN_DIR/pg_ctl" status -D "$data" >/dev/null 2>&1; then
            die "the cluster in $data is running but not answering on port $PG_PORT" \
                "(started with another ORDERFLEET_PG_PORT?); run '$0 down' first"
        fi
        # pg_stat_statements is loaded, where the server has it, so that `make bench-fleet`
        # can count statements per order (only the benchmark reads it; without it the
        # benchmark reports no statement count and nothing else changes).
        local preload=""
        if [[ -f $PG_BIN_DIR/../lib/pg_stat_statements.so ]]; then
            preload=" -c shared_preload_libraries=pg_stat_statements"
        fi
        # Given at start rather than written at initdb, so that an older cluster gets it too.
        local planner=" -c random_page_cost=$PG_RANDOM_PAGE_COST"
        log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
        if ! as_pg "$PG_BIN_DIR/pg_ctl" start -w -t 60 -D "$data" \
            -l "$PG_BASE/postgres.log" -o "-p $PG_PORT$planner$preload" </dev/null >/dev/null 2>&1 9>&-; then
            as_pg tail -n 30 "$PG_BASE/postgres.log" >&2 || true
            die "PostgreSQL failed to start (log: $PG_BASE/postgres.log)"
        fi
        pg_ready || die "PostgreSQL started but does not answer on 127.0.0.1:$PG_PORT"
    fi
    local exists
    exists="$(pg_psql -d postgres -tA -c "select 1 from pg_database where datname = '$PG_DB'" 2>&1)" \
        || die "cannot connect to PostgreSQL on 127.0.0.1:$PG_PORT as '$PG_ROLE' (another server on that port? set ORDERFLEET_PG_PORT): $exists"
    if [[ $exists != 1 ]]; then
        log "creating database $PG_DB"
        pg_psql -d postgres -c "create database $PG_DB" >/dev/null
    fi
    pg_worker_logins
}

# The workers' database roles (migration 0015 creates them NOLOGIN and grants them their
# tables). Locally they may log in without a password (trust, loopback only), so that
# `make -s env` can print one URL per role; the migration finds them and only grants.
WORKER_ROLES="orders inventory payments fulfillment notifications analytics personalization operator"
pg_worker_logins() {
    local r
    for r in $WORKER_ROLES; do
        pg_psql -d postgres -c "DO \$\$ BEGIN
            CREATE ROLE orderfleet_$r LOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            ALTER ROLE orderfleet_$r LOGIN;
        END \$\$" >/dev/null
    done
}

pg_down() {
    find_pg_bin || return 0
    local base data
    for base in "$LOCAL/pg" "$(pg_fallback_base)"; do
        data="$base/data"
        [[ -f $data/PG_VERSION ]] || continue
        if as_pg "$PG_BIN_DIR/pg_ctl" status -D "$data" >/dev/null 2>&1; then
            log "stopping PostgreSQL ($data)"
            as_pg "$PG_BIN_DIR/pg_ctl" stop -m fast -w -t 60 -D "$data" >/dev/null
        fi
    done
}

pg_status() {
    local base where="not started by this checkout"
    if find_pg_bin && pg_ready; then
        for base in "$LOCAL/pg" "$(pg_fallback_base)"; do
            if [[ -f $base/data/PG_VERSION ]] \
                && as_pg "$PG_BIN_DIR/pg_ctl" status -D "$base/data" >/dev/null 2>&1; then
                where="data $base/data"
            fi
        done
        echo "postgres: up   127.0.0.1:$PG_PORT ($where)"
        return 0
    fi
    echo "postgres: down (port $PG_PORT)"
    return 1
}

# ---------------------------------------------------------------------- moto

moto_ready() {
    curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$MOTO_PORT$MOTO_HEALTH_PATH" 2>/dev/null
}

ensure_venv() {
    if [[ ! -x $VENV/bin/python ]]; then
        command -v "$PYTHON" >/dev/null 2>&1 \
            || die "$PYTHON not found; install Python 3 (Debian: apt-get install -y python3 python3-venv)"
        log "creating virtualenv $VENV"
        "$PYTHON" -m venv "$VENV" \
            || die "could not create $VENV (Debian: apt-get install -y python3-venv)"
    fi
}

pip_install() { # spec...
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$VENV/bin/python" -m pip install -q "$@" || die "pip install $* failed"
}

ensure_moto() {
    local stamp="$VENV/.orderfleet-moto-$MOTO_VERSION"
    if [[ ! -x $VENV/bin/moto_server || ! -f $stamp ]]; then
        ensure_venv
        log "installing moto[server]==$MOTO_VERSION into $VENV"
        pip_install "moto[server]==$MOTO_VERSION"
        rm -f "$VENV"/.orderfleet-moto-*
        touch "$stamp"
    fi
}

moto_pid() { # prints the pid of the moto server we started, if it is alive
    local pid
    [[ -f $MOTO_PID_FILE ]] || return 1
    pid="$(cat "$MOTO_PID_FILE" 2>/dev/null || true)"
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    ps -o args= -p "$pid" 2>/dev/null | grep -q moto_server || return 1
    echo "$pid"
}

moto_up() {
    if moto_ready; then
        log "moto already answering on 127.0.0.1:$MOTO_PORT, reusing it"
        return 0
    fi
    ensure_moto
    mkdir -p "$LOCAL"
    local pid
    if pid="$(moto_pid)"; then
        log "moto (pid $pid) is running but not answering yet"
    else
        log "starting moto on 127.0.0.1:$MOTO_PORT"
        rm -f "$MOTO_PID_FILE"
        # Fully detached (own session, stdin from /dev/null, output to the
        # log) so it survives the calling make/shell and never holds its
        # pipes open. The child writes its own pid, then execs the server.
        # shellcheck disable=SC2016 # $$, $0 and $@ are for the inner sh
        local launcher=(sh -c 'echo $$ > "$0"; exec "$@"' "$MOTO_PID_FILE"
            "$VENV/bin/python" "$ROOT/scripts/moto_server.py" -H 127.0.0.1 -p "$MOTO_PORT")
        if command -v setsid >/dev/null 2>&1; then
            setsid "${launcher[@]}" </dev/null >"$MOTO_LOG" 2>&1 9>&- &
        else
            nohup "${launcher[@]}" </dev/null >"$MOTO_LOG" 2>&1 9>&- &
        fi
    fi
    local i
    for ((i = 0; i < 300; i++)); do
        moto_ready && return 0
        if ((i > 10)) && ! moto_pid >/dev/null; then
            break # died
        fi
        sleep 0.1
    done
    tail -n 30 "$MOTO_LOG" >&2 || true
    die "moto did not answer on http://127.0.0.1:$MOTO_PORT$MOTO_HEALTH_PATH within 30s (log: $MOTO_LOG)"
}

moto_down() {
    local pid i
    if pid="$(moto_pid)"; then
        log "stopping moto (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "moto did not exit after SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$MOTO_PID_FILE"
}

moto_status() {
    local pid
    if moto_ready; then
        if pid="$(moto_pid)"; then
            echo "moto:     up   http://127.0.0.1:$MOTO_PORT (pid $pid)"
        else
            echo "moto:     up   http://127.0.0.1:$MOTO_PORT (not started by this checkout)"
        fi
        return 0
    fi
    echo "moto:     down (port $MOTO_PORT)"
    return 1
}

# --------------------------------------------------------------------- tools

tools() {
    ensure_venv
    if [[ ! -x $VENV/bin/cfn-lint ]]; then
        log "installing $CFN_LINT_SPEC into $VENV"
        pip_install "$CFN_LINT_SPEC"
    fi
    if [[ ! -x $VENV/bin/aiosmtpd ]]; then
        log "installing $AIOSMTPD_SPEC into $VENV"
        pip_install "$AIOSMTPD_SPEC"
    fi
}

# ---------------------------------------------------------------------- main

cmd="${1:-}"
case "$cmd" in
up)
    take_lock
    pg_up
    moto_up
    ;;
down)
    take_lock
    moto_down
    pg_down
    ;;
env)
    # Local-only dummy credentials: moto accepts anything, these just keep
    # the AWS SDK from looking for real ones. ORDERFLEET_PG_SOCKET_URL reaches
    # the same database through its Unix-domain socket (the benchmark uses it).
    # ORDERFLEET_LAKE_HASH_KEY: a random key made once per checkout (0600 in
    # .local), under which the analytics worker pseudonymises the local lake.
    locate_pg_base
    lake_key="$LOCAL/lake-hash-key"
    if [ ! -s "$lake_key" ]; then
        mkdir -p "$LOCAL"
        (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$lake_key")
    fi
    cat <<EOF
export DATABASE_URL=postgres://$PG_ROLE@127.0.0.1:$PG_PORT/$PG_DB
export ORDERFLEET_PG_SOCKET_URL=postgres://$PG_ROLE@$(urlencode "$PG_BASE/sock"):$PG_PORT/$PG_DB
export AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT
export AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export ORDERFLEET_LOCAL=1
export ORDERFLEET_LAKE_HASH_KEY=$(cat "$lake_key")
EOF
    # One URL per worker role: what a worker of that handler may do, and no more.
    for r in $WORKER_ROLES; do
        echo "export ORDERFLEET_DATABASE_URL_${r^^}=postgres://orderfleet_$r@127.0.0.1:$PG_PORT/$PG_DB"
    done
    ;;
status)
    rc=0
    pg_status || rc=1
    moto_status || rc=1
    exit "$rc"
    ;;
tools)
    take_lock
    tools
    ;;
clean)
    take_lock
    moto_down
    pg_down
    fallback="$(pg_fallback_base)"
    if [[ -d $fallback ]]; then
        log "removing $fallback"
        rm -rf -- "$fallback"
    fi
    log "removing $LOCAL"
    rm -rf -- "$LOCAL"
    ;;
*)
    echo "usage: $0 up|down|env|status|tools|clean" >&2
    exit 2
    ;;
esac
