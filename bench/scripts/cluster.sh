#!/usr/bin/env bash
# Herald vs NATS on 3-node clusters, on this machine (127.0.0.1 only).
#
# Starts a 3-node Herald cluster (target/release/herald, mutual TLS from
# `herald cert`) and a 3-node nats-server cluster (websocket listeners,
# full-mesh routes), runs `herald-bench compare` for the fan-out and topics
# scenarios against both, prints a table of the figures and Herald/NATS
# ratios, and stops every process it started on exit.
#
# Build first:  cargo build --release -p node -p bench
# Run:          bench/scripts/cluster.sh            (all scenarios)
#               bench/scripts/cluster.sh fanout-200 (only the named ones)
#               bench/scripts/cluster.sh --list
#
# Environment:
#   HERALD_BIN, BENCH_BIN, NATS_SERVER   binaries (defaults below)
#   OUT_DIR      where logs, configs and the report go (default: a new /tmp dir)
#   PORT_BASE    first of the ports used (default 26000); see "Ports" below
#   SCENARIO_TIMEOUT  seconds allowed per scenario, both runs (default 600)
#   SUBSCRIBERS  fan-out subscribers (default 1000)
#   FANOUT_MAX_MESSAGES  messages in the max-rate fan-out (default 10000)
#   TOPICS       topics in the topics scenarios (default 1000)
#   TOPICS_MAX_MESSAGES  messages in the max-rate topics run (default 100000)
#   SUB_PROCS    subscriber child processes per run (default 1)
#   HERALD_ARGS  extra flags for every Herald node, e.g.
#                HERALD_ARGS="--client-write-delay 20ms" (default: none)
#   KEEP=1       leave the clusters running until Enter is pressed
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERALD_BIN=${HERALD_BIN:-$ROOT/target/release/herald}
BENCH_BIN=${BENCH_BIN:-$ROOT/target/release/herald-bench}
NATS_SERVER=${NATS_SERVER:-/usr/sbin/nats-server}
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/herald-cluster-bench.XXXXXX)}
PORT_BASE=${PORT_BASE:-26000}
SCENARIO_TIMEOUT=${SCENARIO_TIMEOUT:-600}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
FANOUT_MAX_MESSAGES=${FANOUT_MAX_MESSAGES:-10000}
TOPICS=${TOPICS:-1000}
TOPICS_MAX_MESSAGES=${TOPICS_MAX_MESSAGES:-100000}
SUB_PROCS=${SUB_PROCS:-1}
NODES=3

# Ports (TCP unless noted), node i = 0..2:
#   herald client  PORT_BASE+400+i   admin PORT_BASE+480+i
#   herald cluster PORT_BASE+410+i (UDP)   gossip PORT_BASE+420+i (UDP)
#   nats client    PORT_BASE+222+i   websocket PORT_BASE+80+i
#   nats routes    PORT_BASE+250+i   monitoring PORT_BASE+280+i
h_client() { echo $((PORT_BASE + 400 + $1)); }
h_admin() { echo $((PORT_BASE + 480 + $1)); }
h_cluster() { echo $((PORT_BASE + 410 + $1)); }
h_gossip() { echo $((PORT_BASE + 420 + $1)); }
n_client() { echo $((PORT_BASE + 222 + $1)); }
n_ws() { echo $((PORT_BASE + 80 + $1)); }
n_route() { echo $((PORT_BASE + 250 + $1)); }
n_mon() { echo $((PORT_BASE + 280 + $1)); }

# name|description|compare arguments (after the URLs)
SCENARIOS=(
  "fanout-max|fan-out, ${SUBSCRIBERS} subscribers over 3 nodes, ${FANOUT_MAX_MESSAGES} x 64 B at max rate|fanout -s ${SUBSCRIBERS} -n ${FANOUT_MAX_MESSAGES} -b 64 --sub-procs ${SUB_PROCS} --timeout-secs 240"
  "fanout-200|fan-out, ${SUBSCRIBERS} subscribers over 3 nodes, 2000 x 64 B at 200 msg/s|fanout -s ${SUBSCRIBERS} -n 2000 -b 64 --rate 200 --sub-procs ${SUB_PROCS} --timeout-secs 240"
  "topics-max|${TOPICS} topics x 1 subscriber, 3 publishers, every message crossing nodes, ${TOPICS_MAX_MESSAGES} x 64 B at max rate|topics -t ${TOPICS} -k 1 -n ${TOPICS_MAX_MESSAGES} -b 64 --sub-procs ${SUB_PROCS} --timeout-secs 240"
  "topics-max-ping|${TOPICS} topics x 1 subscriber, 3 publishers, every message crossing nodes, ${TOPICS_MAX_MESSAGES} x 64 B at max rate, both brokers confirming by ping/pong every 64 (no per-message ack)|topics -t ${TOPICS} -k 1 -n ${TOPICS_MAX_MESSAGES} -b 64 --confirm ping --sub-procs ${SUB_PROCS} --timeout-secs 240"
  "topics-2000|${TOPICS} topics x 1 subscriber, 3 publishers, every message crossing nodes, 10000 x 64 B at 2000 msg/s|topics -t ${TOPICS} -k 1 -n 10000 -b 64 --rate 2000 --sub-procs ${SUB_PROCS} --timeout-secs 240"
)

if [[ ${1:-} == --list ]]; then
  for s in "${SCENARIOS[@]}"; do
    IFS='|' read -r name desc _ <<<"$s"
    printf '%-12s %s\n' "$name" "$desc"
  done
  exit 0
fi
WANTED=("$@")

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

for bin in "$HERALD_BIN" "$BENCH_BIN" "$NATS_SERVER"; do
  [[ -x $bin ]] || die "$bin not found (build with: cargo build --release -p node -p bench)"
done
command -v curl >/dev/null || die "curl is needed"
command -v jq >/dev/null || die "jq is needed"

PIDS=()
NAMES=()
cleanup() {
  local rc=$? pid k
  trap - EXIT INT TERM
  if ((${#PIDS[@]})); then
    log "stopping ${#PIDS[@]} processes"
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
      local alive=0
      for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.1
    done
    for k in "${!PIDS[@]}"; do
      if kill -0 "${PIDS[$k]}" 2>/dev/null; then
        log "${NAMES[$k]} (pid ${PIDS[$k]}) ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "${PIDS[$k]}" 2>/dev/null || true
      fi
    done
    wait 2>/dev/null || true
  fi
  log "logs and configs: $OUT_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Refuse to start on ports someone else holds (other engineers run nodes too).
busy=$(ss -Hlntu 2>/dev/null | awk '{print $5}' | sed 's/.*://' | sort -u)
for i in $(seq 0 $((NODES - 1))); do
  for port in $(h_client "$i") $(h_admin "$i") $(h_cluster "$i") $(h_gossip "$i") \
    $(n_client "$i") $(n_ws "$i") $(n_route "$i") $(n_mon "$i"); do
    if grep -qx "$port" <<<"$busy"; then
      die "port $port is in use; set PORT_BASE to another value"
    fi
  done
done

mkdir -p "$OUT_DIR"
REPORT=$OUT_DIR/report.md
log "output in $OUT_DIR"

start() { # name logfile command...
  local name=$1 logfile=$2
  shift 2
  "$@" >"$logfile" 2>&1 &
  PIDS+=($!)
  NAMES+=("$name")
  log "started $name (pid $!)"
}

# --- Herald ---------------------------------------------------------------
CERTS=$OUT_DIR/certs
"$HERALD_BIN" cert ca --out "$CERTS" >/dev/null
for i in $(seq 0 $((NODES - 1))); do
  "$HERALD_BIN" cert node --ca "$CERTS" --name "herald-$i" --out "$CERTS" >/dev/null
done
HERALD_PIDS=()
for i in $(seq 0 $((NODES - 1))); do
  args=(
    --node-id "herald-$i"
    --client-listen "127.0.0.1:$(h_client "$i")"
    --admin-listen "127.0.0.1:$(h_admin "$i")"
    --cluster-listen "127.0.0.1:$(h_cluster "$i")"
    --gossip-listen "127.0.0.1:$(h_gossip "$i")"
    --cluster-name herald-bench
    --cluster-ca "$CERTS/ca.pem"
    --cluster-cert "$CERTS/herald-$i.pem"
    --cluster-key "$CERTS/herald-$i-key.pem"
    --client-admission-threshold 1000000
    --node-drain-grace 1s
  )
  # shellcheck disable=SC2206 # extra flags are words by design
  args+=(${HERALD_ARGS:-})
  # Every node seeds from the others, so start order does not matter.
  for j in $(seq 0 $((NODES - 1))); do
    ((j == i)) || args+=(--seed "127.0.0.1:$(h_gossip "$j")")
  done
  echo "$HERALD_BIN ${args[*]}" >"$OUT_DIR/herald-$i.cmd"
  start "herald-$i" "$OUT_DIR/herald-$i.log" "$HERALD_BIN" "${args[@]}"
  HERALD_PIDS+=("${PIDS[-1]}")
done

# --- NATS -----------------------------------------------------------------
NATS_PIDS=()
for i in $(seq 0 $((NODES - 1))); do
  routes=""
  for j in $(seq 0 $((NODES - 1))); do
    ((j == i)) || routes+="    nats-route://127.0.0.1:$(n_route "$j")"$'\n'
  done
  conf=$OUT_DIR/nats-$i.conf
  cat >"$conf" <<EOF
server_name: nats-$i
listen: 127.0.0.1:$(n_client "$i")
http: 127.0.0.1:$(n_mon "$i")

websocket {
  host: 127.0.0.1
  port: $(n_ws "$i")
  no_tls: true
}

cluster {
  name: herald-bench
  listen: 127.0.0.1:$(n_route "$i")
  routes: [
$routes  ]
}
EOF
  start "nats-$i" "$OUT_DIR/nats-$i.log" "$NATS_SERVER" -c "$conf"
  NATS_PIDS+=("${PIDS[-1]}")
done

# --- Wait until both clusters are formed ------------------------------------
wait_for() { # description timeout-seconds command...
  local what=$1 secs=$2 k
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    for k in "${!PIDS[@]}"; do
      kill -0 "${PIDS[$k]}" 2>/dev/null || die "${NAMES[$k]} exited; see $OUT_DIR/${NAMES[$k]}.log"
    done
    ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}
herald_ready() { # node
  local admin=127.0.0.1:$(h_admin "$1")
  [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$admin/readyz") == 200 ]] &&
    curl -sf "http://$admin/v1/cluster" |
    jq -e "(.ring.owners | length) == $NODES and ([.members[] | select(.state == \"ready\")] | length) == $NODES"
}
nats_routed() { # node
  curl -sf "http://127.0.0.1:$(n_mon "$1")/routez" | jq -e ".num_routes >= $((NODES - 1))"
}
for i in $(seq 0 $((NODES - 1))); do
  wait_for "herald-$i to be ready with $NODES members on its ring" 60 herald_ready "$i"
  wait_for "nats-$i to have $((NODES - 1)) routes" 30 nats_routed "$i"
done
log "both clusters are up"
for i in $(seq 0 $((NODES - 1))); do
  curl -sf "http://127.0.0.1:$(h_admin "$i")/v1/cluster" >"$OUT_DIR/herald-$i.cluster-before.json" || true
done

HERALD_URLS=()
NATS_URLS=()
for i in $(seq 0 $((NODES - 1))); do
  HERALD_URLS+=(--herald-url "ws://127.0.0.1:$(h_client "$i")/ws")
  NATS_URLS+=(--nats-url "ws://127.0.0.1:$(n_ws "$i")")
done

# CPU time (user + system, seconds) of a list of pids.
cpu_secs() {
  local ticks=0 pid utime stime
  for pid in "$@"; do
    if [[ -r /proc/$pid/stat ]]; then
      # Fields 14 and 15 after the command name (which may contain spaces).
      read -r utime stime < <(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12, $13}')
      ticks=$((ticks + utime + stime))
    fi
  done
  awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}
rss_mib() {
  local kb=0 pid v
  for pid in "$@"; do
    v=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    kb=$((kb + ${v:-0}))
  done
  echo $((kb / 1024))
}
alive_check() {
  local k
  for k in "${!PIDS[@]}"; do
    kill -0 "${PIDS[$k]}" 2>/dev/null || log "WARNING: ${NAMES[$k]} is no longer running"
  done
}

{
  echo "# Herald vs NATS, 3-node clusters on 127.0.0.1"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); machine: $(nproc) cores, $(uname -sr)"
  echo "- herald: $("$HERALD_BIN" --version 2>/dev/null) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ', dirty tree'))"
  echo "- nats-server: $("$NATS_SERVER" --version 2>/dev/null)"
  echo "- extra Herald flags: ${HERALD_ARGS:-none}"
  echo
} >"$REPORT"
ROWS=()
CPU_ROWS=()
for s in "${SCENARIOS[@]}"; do
  IFS='|' read -r name desc cargs <<<"$s"
  if ((${#WANTED[@]})) && ! printf '%s\n' "${WANTED[@]}" | grep -qx "$name"; then
    continue
  fi
  log "=== $name: $desc"
  # shellcheck disable=SC2206 # the arguments are words by design
  cmd=("$BENCH_BIN" compare "${HERALD_URLS[@]}" "${NATS_URLS[@]}" --label "$name" $cargs)
  echo "${cmd[*]}" >"$OUT_DIR/$name.cmd"
  load=$(cut -d' ' -f1 /proc/loadavg)
  h_cpu0=$(cpu_secs "${HERALD_PIDS[@]}")
  n_cpu0=$(cpu_secs "${NATS_PIDS[@]}")
  set +e
  timeout --kill-after=10 "$SCENARIO_TIMEOUT" "${cmd[@]}" 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  h_cpu=$(awk -v a="$h_cpu0" -v b="$(cpu_secs "${HERALD_PIDS[@]}")" 'BEGIN { printf "%.1f", b - a }')
  n_cpu=$(awk -v a="$n_cpu0" -v b="$(cpu_secs "${NATS_PIDS[@]}")" 'BEGIN { printf "%.1f", b - a }')
  # The load generator's CPU seconds in each run: "GENERATOR_CPU | herald | nats |".
  gen=$(grep -m1 '^GENERATOR_CPU |' "$OUT_DIR/$name.log" | awk -F'|' '{ gsub(/ /, ""); print $2 " | " $3 }')
  CPU_ROWS+=("| $name | $h_cpu | $n_cpu | ${gen:-- | -} | $(rss_mib "${HERALD_PIDS[@]}") | $(rss_mib "${NATS_PIDS[@]}") | $load |")
  if ((rc == 124 || rc == 137)); then
    log "$name: timed out after ${SCENARIO_TIMEOUT}s"
    ROWS+=("| $name | timed out after ${SCENARIO_TIMEOUT}s |")
  elif row=$(grep -m1 '^ROW |' "$OUT_DIR/$name.log"); then
    ROWS+=("${row#ROW }")
  else
    ROWS+=("| $name | failed (exit $rc), see $name.log |")
  fi
  {
    echo "## $name: $desc"
    echo
    echo '```'
    echo "${cmd[*]}"
    echo '```'
    echo
    echo '```'
    grep -v -e '^ROW |' -e '^GENERATOR_CPU |' "$OUT_DIR/$name.log" || true
    echo '```'
    echo
  } >>"$REPORT"
  alive_check
done

for i in $(seq 0 $((NODES - 1))); do
  curl -sf "http://127.0.0.1:$(h_admin "$i")/metrics" >"$OUT_DIR/herald-$i.metrics" || true
  curl -sf "http://127.0.0.1:$(h_admin "$i")/v1/cluster" >"$OUT_DIR/herald-$i.cluster-after.json" || true
  curl -sf "http://127.0.0.1:$(n_mon "$i")/varz" >"$OUT_DIR/nats-$i.varz.json" || true
done

{
  echo "## Summary (ratios are Herald / NATS: throughput above 1 and latency below 1 favour Herald)"
  echo
  echo "| scenario | Herald deliveries/s | NATS deliveries/s | ratio | Herald p50 | NATS p50 | ratio | Herald p99 | NATS p99 | ratio | Herald lost/dup/ooo | NATS lost/dup/ooo |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
  ((${#ROWS[@]} == 0)) || printf '%s\n' "${ROWS[@]}"
  echo
  echo "Broker CPU seconds used during each scenario (both runs; each cluster is idle while the other is measured), the load generator's CPU seconds in each run (it shares the cores), and resident memory after it, summed over 3 nodes; the machine's 1-minute load average before the scenario:"
  echo
  echo "| scenario | Herald CPU s | NATS CPU s | generator CPU s (Herald run) | generator CPU s (NATS run) | Herald RSS MiB | NATS RSS MiB | load before |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  ((${#CPU_ROWS[@]} == 0)) || printf '%s\n' "${CPU_ROWS[@]}"
} | tee -a "$REPORT"
log "report: $REPORT"

if [[ ${KEEP:-0} == 1 ]]; then
  log "KEEP=1: clusters still running; press Enter to stop them"
  read -r _
fi
