#!/usr/bin/env bash
# Jasmin SMS Gateway end-to-end benchmark, for comparison with `make bench BENCH=e2e`.
#
# HTTP API in (Jasmin /send) -> RabbitMQ -> SMPP out to a local sink that accepts every
# submit_sm. Prints messages per second from the first HTTP request to the last submit_sm at the
# sink, and the CPU seconds of jasmind, RabbitMQ and Redis over the run. See README.md.
#
#   bench/jasmin/run.sh [-n MESSAGES] [--clients N] [--dlr] [--timeout S] [--json FILE]
#
# Installs what is missing (Debian rabbitmq-server and redis-server with apt-get, Jasmin from
# PyPI into its own virtualenv $JASMIN_VENV), starts private instances on loopback ports of
# their own under $JASMIN_RUN_DIR, configures Jasmin through jCli, runs the load and stops
# everything it started.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
JASMIN_VERSION=0.11.1
VENV=${JASMIN_VENV:-$HERE/../../.smsbridge/jasmin-venv} # beside the broker jars, git-ignored
RUN=${JASMIN_RUN_DIR:-/tmp/jasmin-bench}
PYTHON=${JASMIN_PYTHON:-python3} # 3.8 to 3.12 (jcli.py uses telnetlib)

N="" # 10,000; 3,000 with --dlr (about 100 msg/s: the load must stay under 60 s)
CLIENTS=4
WARMUP=50
TIMEOUT=55 # seconds, from the first measured request to the end: keep the load under 60 s
DLR=0
DLR_LEVEL=3
DLR_DELAY=1
DLR_DAEMONS=1
JSON=""
KEEP=0
FORCE=0

# Loopback ports, chosen not to collide with default RabbitMQ, Redis or Jasmin instances.
RABBIT_PORT=${RABBIT_PORT:-35672}
RABBIT_DIST_PORT=${RABBIT_DIST_PORT:-35673}
REDIS_PORT=${REDIS_PORT:-36379}
HTTP_PORT=${HTTP_PORT:-11401}
JCLI_PORT=${JCLI_PORT:-18990}
ROUTER_PORT=${ROUTER_PORT:-18988}
SMPPCM_PORT=${SMPPCM_PORT:-18989}
SMPPS_PORT=${SMPPS_PORT:-12775}
SMPPS_PB_PORT=${SMPPS_PB_PORT:-14001}
SINK_PORT=${SINK_PORT:-12776}
SINK_CONTROL_PORT=${SINK_CONTROL_PORT:-12777}
DLR_PORT=${DLR_PORT:-12778}
RABBIT_NODE=jasminbench@localhost

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF

Options:
  -n MESSAGES      messages in the measured run (default 10000; 3000 with --dlr)
  --clients N      concurrent HTTP clients (default $CLIENTS)
  --warmup N       messages sent first and not measured (default $WARMUP)
  --dlr            ask for delivery receipts (dlr-level $DLR_LEVEL): the sink returns a receipt
                   for every submit_sm, Jasmin's dlrlookupd and dlrd throw them back over HTTP,
                   and the run ends at the last receipt callback
  --dlr-level L    1 (SMSC ack), 2 (handset receipt) or 3 (both: two callbacks a message)
  --dlr-delay S    seconds the sink waits before sending a receipt (default $DLR_DELAY; with
                   less, receipts overtake Jasmin's own submit_sm_resp bookkeeping and wait
                   for its 10 s lookup retry)
  --single-process receipts looked up and thrown inside jasmind (--enable-dlr-lookup
                   --enable-dlr-thrower, as Jasmin's Docker image runs it) instead of by the
                   dlrlookupd and dlrd daemons that jasmind --help recommends: much slower
  --timeout S      bound of the measured run in seconds (default $TIMEOUT)
  --json FILE      also write the figures as JSON
  --keep           leave everything running after the run (stop with: $0 --stop)
  --stop           stop what a --keep run left running
  --force          run even while a sms-bridge benchmark (bench stages|e2e|fairness) runs
Environment: JASMIN_VENV (default .smsbridge/jasmin-venv), JASMIN_RUN_DIR (default /tmp/jasmin-bench),
  JASMIN_PYTHON, and the *_PORT variables at the top of this script.
EOF
}

log() { echo "[jasmin-bench] $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

STOP_ONLY=0
while [[ $# -gt 0 ]]; do
    case $1 in
    -n) N=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --dlr) DLR=1; shift ;;
    --dlr-level) DLR_LEVEL=$2; shift 2 ;;
    --dlr-delay) DLR_DELAY=$2; shift 2 ;;
    --single-process) DLR_DAEMONS=0; shift ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --json) JSON=$(realpath -m "$2"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    --stop) STOP_ONLY=1; shift ;;
    --force) FORCE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done

RABBIT_ENV=(
    HOME="$RUN/rabbitmq"
    RABBITMQ_NODENAME="$RABBIT_NODE"
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    RABBITMQ_NODE_PORT="$RABBIT_PORT"
    RABBITMQ_DIST_PORT="$RABBIT_DIST_PORT"
    RABBITMQ_MNESIA_BASE="$RUN/rabbitmq/mnesia"
    RABBITMQ_LOG_BASE="$RUN/rabbitmq/log"
    RABBITMQ_ENABLED_PLUGINS_FILE="$RUN/rabbitmq/enabled_plugins"
    RABBITMQ_CONFIG_FILE="$RUN/rabbitmq/rabbitmq.conf"
    RABBITMQ_PID_FILE="$RUN/rabbitmq/rabbitmq.pid"
    ERL_EPMD_ADDRESS=127.0.0.1
)
rabbitmqctl() { env "${RABBIT_ENV[@]}" /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RABBIT_NODE" "$@"; }

# ---------------------------------------------------------------------------------- stopping
stop_pid() { # name pidfile
    local pid
    [[ -f $2 ]] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$2"
}

stop_all() {
    [[ -d $RUN/pids ]] && compgen -G "$RUN/pids/*" >/dev/null || return 0
    log "stopping"
    for name in dlrd dlrlookupd jasmind sink redis; do
        stop_pid "$name" "$RUN/pids/$name"
    done
    if [[ -f $RUN/pids/rabbitmq ]]; then
        rabbitmqctl stop >/dev/null 2>&1 || true
        stop_pid rabbitmq "$RUN/pids/rabbitmq"
    fi
    stop_pid epmd "$RUN/pids/epmd" # the Erlang port mapper, if RabbitMQ started it for us
}

[[ -n $N ]] || { ((DLR)) && N=3000 || N=10000; }

if ((STOP_ONLY)); then
    stop_all
    exit 0
fi

# ---------------------------------------------------------------------------------- install
install_debian() {
    [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] && command -v redis-server >/dev/null && return
    [[ $(id -u) == 0 ]] || die "rabbitmq-server and redis-server are missing: apt-get install them as root"
    log "installing rabbitmq-server and redis-server (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server redis-server >/dev/null
}

install_jasmin() {
    local resource="$VENV/share/jasmin/resource/amqp0-9-1.xml"
    if ! "$VENV/bin/python" -c "import jasmin, aiohttp, sys
sys.exit(jasmin.get_release() != '$JASMIN_VERSION')" 2>/dev/null; then
        log "installing Jasmin $JASMIN_VERSION into $VENV (pip, constraints.txt)"
        [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
        "$VENV/bin/pip" install -q -c "$HERE/constraints.txt" "jasmin==$JASMIN_VERSION" aiohttp
    fi
    local listeners
    listeners=$("$VENV/bin/python" -c "import importlib.util as u
print(u.find_spec('jasmin').submodule_search_locations[0])")/managers/listeners.py
    if grep -q "_pdu\.response\." "$listeners"; then
        # Jasmin 0.11.1 (the latest on PyPI) raises AttributeError after every submit_sm_resp
        # and so never publishes it to dlrlookup: no receipts at all (jookies/jasmin#1236).
        # Upstream's fix (commit a3635cc1, not released): r.response for _pdu.response.
        log "patching jasmin/managers/listeners.py with upstream fix a3635cc1 (jasmin#1236)"
        sed -i 's/_pdu\.response\./r.response./g' "$listeners"
    fi
    if [[ ! -f $resource ]]; then
        # The wheel built from the sdist leaves out misc/config/resource (the AMQP spec jasmind
        # loads): take it from the sdist itself.
        log "fetching the AMQP spec from the jasmin $JASMIN_VERSION sdist"
        local tmp
        tmp=$(mktemp -d)
        "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$tmp" "jasmin==$JASMIN_VERSION"
        tar -xzf "$tmp"/jasmin-"$JASMIN_VERSION".tar.gz -C "$tmp"
        mkdir -p "$(dirname "$resource")"
        cp "$tmp/jasmin-$JASMIN_VERSION/misc/config/resource/"* "$(dirname "$resource")/"
        rm -rf "$tmp"
    fi
}

# ---------------------------------------------------------------------------------- checks
wait_quiet() {
    ((FORCE)) && return 0
    # Python processes only: a shell that runs this script after a benchmark names both.
    local pattern="^[^ ]*python[0-9.]* -m bench .*(stages|e2e|fairness)"
    for try in 1 2 3 4 5 6 7 8 9 10; do
        pgrep -f "$pattern" >/dev/null || return 0
        log "a sms-bridge benchmark is running (pgrep -f '$pattern'); waiting ($try/10)"
        sleep 30
    done
    die "the machine is busy with another benchmark: try later, or --force"
}

wait_port() { # port seconds name: until it listens, while $RUN/pids/name runs
    local deadline=$((SECONDS + $2))
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        kill -0 "$(cat "$RUN/pids/$3")" 2>/dev/null || die "$3 exited (log: $RUN/$3.log)"
        ((SECONDS < deadline)) || die "$3 did not listen on port $1 within $2 s (logs: $RUN)"
        sleep 0.3
    done
}

# ---------------------------------------------------------------------------------- starting
write_jasmin_config() {
    mkdir -p "$RUN/etc/jasmin/store" "$RUN/etc/jasmin/resource" "$RUN/var/log/jasmin"
    cp "$VENV/share/jasmin/resource/"* "$RUN/etc/jasmin/resource/"
    # Everything else is Jasmin's default (log levels included: INFO, one line per message).
    cat >"$RUN/etc/jasmin/jasmin.cfg" <<EOF
[smpp-server]
bind = 127.0.0.1
port = $SMPPS_PORT

[smpp-server-pb]
bind = 127.0.0.1
port = $SMPPS_PB_PORT

[smpp-server-pb-client]
host = 127.0.0.1
port = $SMPPS_PB_PORT

[client-management]
bind = 127.0.0.1
port = $SMPPCM_PORT

[router]
bind = 127.0.0.1
port = $ROUTER_PORT

[amqp-broker]
host = 127.0.0.1
port = $RABBIT_PORT

[redis-client]
host = 127.0.0.1
port = $REDIS_PORT

[http-api]
bind = 127.0.0.1
port = $HTTP_PORT

[jcli]
bind = 127.0.0.1
port = $JCLI_PORT
authentication = False

[dlr]
pid = dlrlookupd-01
EOF
}

start() { # name command...: in the background, pid in $RUN/pids/name, output in $RUN/name.log
    local name=$1
    shift
    "$@" >"$RUN/$name.log" 2>&1 &
    echo $! >"$RUN/pids/$name"
}

start_all() {
    rm -rf "$RUN"
    mkdir -p "$RUN/pids" "$RUN/rabbitmq" "$RUN/redis"

    log "starting RabbitMQ (port $RABBIT_PORT) and Redis (port $REDIS_PORT)"
    local epmd_was_running=0
    pgrep -x epmd >/dev/null && epmd_was_running=1
    echo "[]." >"$RUN/rabbitmq/enabled_plugins"
    : >"$RUN/rabbitmq/rabbitmq.conf" # the listener: RABBITMQ_NODE_IP_ADDRESS and _PORT
    start rabbitmq env "${RABBIT_ENV[@]}" /usr/lib/rabbitmq/bin/rabbitmq-server
    # Persistence off, as for a throwaway benchmark instance.
    start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$RUN/redis" --daemonize no
    wait_port "$RABBIT_PORT" 120 rabbitmq
    rabbitmqctl await_startup --timeout 60 >/dev/null ||
        die "RabbitMQ did not start (logs: $RUN/rabbitmq.log, $RUN/rabbitmq/log)"
    ((epmd_was_running)) || pgrep -x -n epmd >"$RUN/pids/epmd" || rm -f "$RUN/pids/epmd"
    wait_port "$REDIS_PORT" 30 redis

    log "starting the SMPP sink (port $SINK_PORT)"
    local sink_args=(--port "$SINK_PORT" --control-port "$SINK_CONTROL_PORT")
    ((DLR)) && sink_args+=(--dlr --dlr-delay "$DLR_DELAY")
    start sink "$VENV/bin/python" "$HERE/sink.py" "${sink_args[@]}"
    wait_port "$SINK_CONTROL_PORT" 30 sink

    log "starting jasmind (HTTP API port $HTTP_PORT, jCli port $JCLI_PORT)"
    write_jasmin_config
    local cfg="$RUN/etc/jasmin/jasmin.cfg"
    export ROOT_PATH="$RUN"
    if ((DLR_DAEMONS)); then
        # As jasmind's --help advises: receipts looked up and thrown by daemons of their own.
        start jasmind "$VENV/bin/python" "$VENV/bin/jasmind.py" -c "$cfg"
        start dlrlookupd "$VENV/bin/python" "$VENV/bin/dlrlookupd.py" -c "$cfg"
        start dlrd "$VENV/bin/python" "$VENV/bin/dlrd.py" -c "$cfg"
    else
        # As Jasmin's Docker image runs it (less its interceptor): one process.
        start jasmind "$VENV/bin/python" "$VENV/bin/jasmind.py" -c "$cfg" \
            --enable-dlr-lookup --enable-dlr-thrower
    fi
    wait_port "$HTTP_PORT" 60 jasmind
    "$VENV/bin/python" "$HERE/jcli.py" --port "$JCLI_PORT" --sink-port "$SINK_PORT" >&2 ||
        die "configuring Jasmin through jCli failed (log: $RUN/jasmind.log)"
}

# ---------------------------------------------------------------------------------- main
install_debian
install_jasmin
wait_quiet
stop_all
on_exit() { # stop everything, unless --keep and all went well
    local status=$?
    ((KEEP && status == 0)) || stop_all
}
trap on_exit EXIT
trap 'exit 130' INT TERM
start_all

jasmin_groups=(--group "jasmind=$(cat "$RUN/pids/jasmind")")
gateway=jasmind
for d in dlrlookupd dlrd; do
    if [[ -f $RUN/pids/$d ]]; then
        jasmin_groups+=(--group "$d=$(cat "$RUN/pids/$d")")
        gateway+=",$d"
    fi
done
load_args=(
    --url "http://127.0.0.1:$HTTP_PORT/send" -n "$N" --clients "$CLIENTS" --warmup "$WARMUP"
    --timeout "$TIMEOUT" --sink-control "$SINK_CONTROL_PORT"
    "${jasmin_groups[@]}"
    --group "rabbitmq=$(cat "$RUN/pids/rabbitmq")"
    --group "redis=$(cat "$RUN/pids/redis")"
    --group "sink (harness)=$(cat "$RUN/pids/sink")"
    --gateway "$gateway,rabbitmq,redis"
    --json "${JSON:-$RUN/result.json}"
)
((DLR)) && load_args+=(--dlr --dlr-level "$DLR_LEVEL" --dlr-port "$DLR_PORT")

wait_quiet
log "load: $N messages, $CLIENTS clients (+$WARMUP warm-up), at most $TIMEOUT s"
echo "Jasmin $JASMIN_VERSION, RabbitMQ $(dpkg-query -W -f '${Version}' rabbitmq-server)," \
    "Redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), $(nproc) cores," \
    "load average $(cut -d' ' -f1-3 /proc/loadavg)"
status=0
"$VENV/bin/python" "$HERE/load.py" "${load_args[@]}" || status=$?
echo "figures: ${JSON:-$RUN/result.json}; logs: $RUN"
if ((KEEP)); then
    log "left running (--keep): stop with $0 --stop"
fi
exit $status
