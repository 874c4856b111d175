#!/usr/bin/env bash
# Runs herald.service under a real systemd (PID 1 in a Docker container) and
# checks what the unit promises:
#   - Type=notify: the unit becomes active only after READY=1;
#   - the watchdog is pinged every WatchdogSec/2, and a stopped node is
#     killed (SIGABRT) and restarted;
#   - the sandbox: no capabilities, no_new_privs, a seccomp filter that still
#     lets herald raise its soft RLIMIT_NOFILE (tested with LimitNOFILE=1024:N);
#   - herald reads its cgroup's memory limit (/readyz "memory");
#   - systemctl stop drains: /readyz 503 "draining" with sessions open, the
#     sessions get node.drain_grace, the node exits 0 (Result=success);
#   - a configuration error (exit 2) is not restarted.
#
#   deploy/systemd/smoke-test.sh            (from the repository root, as root)
#
# Needs: Docker, target/release/herald and target/release/herald-bench
# (cargo build --release -p node -p bench), and the image
# herald-debian-base:bookworm (deploy/docker/build-base.sh makes it). Takes
# about two minutes. Everything runs inside the container, on its loopback.
# What a container cannot show: LimitNOFILE above the container's own hard
# limit, OOMScoreAdjust below 0 (both need CAP_SYS_RESOURCE), cgroup v2 when
# the host runs v1, and SELinux.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

base="${BASE_IMAGE:-herald-debian-base:bookworm}"
image="herald-systemd-smoke:local"
name="herald-systemd-smoke-$$"
fails=0

ok() { printf 'ok   %s\n' "$*"; }
bad() { printf 'FAIL %s\n' "$*"; fails=$((fails + 1)); }
check() { # check DESCRIPTION COMMAND...: ok when the command succeeds
    local what="$1"; shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}

for f in target/release/herald target/release/herald-bench; do
    [ -x "$f" ] || { echo "smoke-test: $f missing: cargo build --release -p node -p bench" >&2; exit 2; }
done
docker image inspect "$base" >/dev/null 2>&1 ||
    { echo "smoke-test: image $base missing: deploy/docker/build-base.sh" >&2; exit 2; }

ctx="$(mktemp -d)"
cleanup() {
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker rmi "$image" >/dev/null 2>&1 || true
    rm -rf "$ctx"
}
trap cleanup EXIT

cp target/release/herald target/release/herald-bench deploy/systemd/herald.service \
   deploy/systemd/herald.sysusers deploy/systemd/herald.toml "$ctx/"
# The install steps of deploy/systemd/README.md.
cat >"$ctx/Dockerfile" <<EOF
FROM $base
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends systemd systemd-sysv curl procps iproute2 >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY herald herald-bench /usr/local/bin/
COPY herald.sysusers /usr/lib/sysusers.d/herald.conf
COPY herald.service /etc/systemd/system/herald.service
COPY herald.toml /tmp/herald.toml
RUN systemd-sysusers \
 && install -D -m 0640 -o root -g herald /tmp/herald.toml /etc/herald/herald.toml \
 && systemctl enable herald \
 && systemctl mask getty@tty1.service console-getty.service systemd-logind.service
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
EOF
echo "smoke-test: building $image"
docker build -q -t "$image" "$ctx" >/dev/null 2>"$ctx/build.log" || { cat "$ctx/build.log" >&2; exit 1; }

echo "smoke-test: starting systemd in $name"
docker run -d --name "$name" --cap-add SYS_ADMIN \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --tmpfs /run --tmpfs /run/lock -v /sys/fs/cgroup:/sys/fs/cgroup:rw "$image" >/dev/null
inside() { docker exec "$name" sh -c "$*"; }
bg() { docker exec -d "$name" sh -c "$*"; }
all() { # all COND1 -- COND2 ...: every test(1) expression holds
    local args=()
    for a in "$@" --; do
        if [ "$a" = -- ]; then
            [ "${args[@]}" ] || return 1
            args=()
        else
            args+=("$a")
        fi
    done
}
prop() { inside "systemctl show herald -p $1 --value"; }

for _ in $(seq 1 30); do
    [ "$(prop ActiveState 2>/dev/null || true)" = active ] && break
    sleep 1
done
check "herald.service active after READY=1" [ "$(prop ActiveState)" = active ]
check "/readyz 200" inside "curl -sf localhost:7480/readyz >/dev/null"
pid="$(prop MainPID)"
check "runs as herald" inside "[ \$(stat -c %U /proc/$pid) = herald ]"
check "no capabilities" inside "grep -q '^CapEff:.*0000000000000000' /proc/$pid/status"
check "no_new_privs and a seccomp filter" inside "grep -q '^NoNewPrivs:.*1' /proc/$pid/status && grep -q '^Seccomp:.*2' /proc/$pid/status"
check "umask 0077" inside "grep -q '^Umask:.*0077' /proc/$pid/status"
check "WATCHDOG_USEC passed (10 s)" inside "tr '\\0' '\\n' </proc/$pid/environ | grep -qx WATCHDOG_USEC=10000000"

w1="$(prop WatchdogTimestampMonotonic)"; sleep 6; w2="$(prop WatchdogTimestampMonotonic)"
check "watchdog pinged (every WatchdogSec/2)" [ "$w2" -gt "$w1" ]

# The seccomp filter lets herald raise its soft limit; herald reads the
# cgroup memory limit (a tiny fraction makes /readyz report it).
inside "mkdir -p /etc/systemd/system/herald.service.d && printf '[Service]\nLimitNOFILE=1024:8192\nEnvironment=HERALD_ADMIN_MAX_MEMORY_FRACTION=0.0001\n' >/etc/systemd/system/herald.service.d/smoke.conf && systemctl daemon-reload && systemctl restart herald"
sleep 2
pid="$(prop MainPID)"
check "soft RLIMIT_NOFILE raised from 1024 to the hard limit under the filter" \
    inside "grep -Eq 'open files +8192 +8192' /proc/$pid/limits"
check "/readyz reports memory against the cgroup limit" inside "curl -s localhost:7480/readyz | grep -q memory"
inside "rm /etc/systemd/system/herald.service.d/smoke.conf && systemctl daemon-reload && systemctl restart herald"
sleep 2

# Drain with sessions open.
bg "herald-bench idle -c 100 --settle-secs 60 --url ws://127.0.0.1:7400/ws >/tmp/bench.log 2>&1"
for _ in $(seq 1 20); do
    inside "curl -s localhost:7480/metrics | grep -q '^herald_connections 100'" && break
    sleep 1
done
check "100 sessions open" inside "curl -s localhost:7480/metrics | grep -q '^herald_connections 100'"
bg "date +%s >/tmp/t0; systemctl stop herald; date +%s >/tmp/t1"
sleep 2
check "/readyz 503 draining during the grace" inside "curl -s localhost:7480/readyz | grep -q draining"
for _ in $(seq 1 40); do
    inside "[ -s /tmp/t1 ]" && break
    sleep 1
done
# shellcheck disable=SC2016 # expanded by the container's shell
took="$(inside 'echo $(( $(cat /tmp/t1) - $(cat /tmp/t0) ))')"
check "stop waited for the grace (${took}s, node.drain_grace 10s, TimeoutStopSec 30s)" \
    all "$took" -ge 9 -- "$took" -lt 30
check "drained node exited 0 (Result=success)" \
    all "$(prop Result)" = success -- "$(prop ExecMainStatus)" = 0

# A wedged node (SIGSTOP: no more pings) is killed by the watchdog and restarted.
inside "systemctl start herald"; sleep 2
pid="$(prop MainPID)"
inside "kill -STOP $pid"
for _ in $(seq 1 30); do
    [ "$(prop NRestarts)" -ge 1 ] && break
    sleep 1
done
sleep 3
check "watchdog killed the stopped node (SIGABRT)" \
    inside "journalctl -u herald -o cat | grep -q \"Failed with result 'watchdog'\""
check "systemd restarted it" all "$(prop NRestarts)" -ge 1 -- "$(prop ActiveState)" = active

# A configuration error is not retried.
inside "echo 'no_such_key = 1' >>/etc/herald/herald.toml && systemctl restart herald" >/dev/null 2>&1 || true
sleep 5
check "config error: exit 2, failed, no restart loop" \
    all "$(prop ExecMainStatus)" = 2 -- "$(prop ActiveState)" = failed -- "$(prop NRestarts)" = 0

if [ "$fails" -gt 0 ]; then
    echo "smoke-test: $fails check(s) failed; journal:"
    inside "journalctl -u herald -o cat --no-pager | tail -n 30" || true
    exit 1
fi
echo "smoke-test: all checks passed"
