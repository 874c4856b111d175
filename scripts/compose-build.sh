#!/usr/bin/env bash
# Builds every image that docker-compose.yml runs, on this machine, without
# any container registry:
#
#   herald:local             FROM scratch + the static `herald` built here
#   herald-debian-base:bookworm  Debian minbase by debootstrap + docker import
#   herald-certs:local       Debian base + herald + make-certs.sh (one-shot job)
#   herald-haproxy:local     Debian base + Debian's haproxy
#   herald-prometheus:local  Debian base + Debian's prometheus
#
# Usage (from anywhere; needs cargo, docker, and root or sudo for debootstrap):
#   scripts/compose-build.sh                 # everything, then: docker compose up -d
#   scripts/compose-build.sh --herald-only   # only the herald image
#   scripts/compose-build.sh --pull          # for a Docker that can pull images:
#                                            # herald built from source in rust:*,
#                                            # Debian images FROM debian:bookworm-slim
#
# Environment:
#   BASE_IMAGE   the Debian image the others start from (default
#                herald-debian-base:bookworm, or debian:bookworm-slim with --pull)
#   CARGO_TARGET_DIR  as for cargo (default target/)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

herald_only=0
pull=0
for arg in "$@"; do
  case "$arg" in
    --herald-only) herald_only=1 ;;
    --pull) pull=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "compose-build.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

if [[ $pull -eq 1 ]]; then
  BASE_IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
else
  BASE_IMAGE=${BASE_IMAGE:-herald-debian-base:bookworm}
fi
TARGET_TRIPLE=x86_64-unknown-linux-gnu
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
step() { printf '\n== %s\n' "$*"; }

# One build at a time: test binaries run in parallel (cargo nextest) may
# each find the images missing, and two builds writing target/docker/herald
# at once truncate it.
mkdir -p "$TARGET_DIR"
exec 9>"$TARGET_DIR/compose-build.lock"
flock 9

if [[ $pull -eq 1 ]]; then
  step "herald:local from source (deploy/docker/Dockerfile, default target)"
  docker build -f deploy/docker/Dockerfile -t herald:local .
else
  step "static herald ($TARGET_TRIPLE, crt-static)"
  RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"' \
    cargo build --release --locked --target "$TARGET_TRIPLE" -p node --bin herald
  built=$TARGET_DIR/$TARGET_TRIPLE/release/herald
  if file "$built" 2>/dev/null | grep -q 'dynamically linked'; then
    echo "compose-build.sh: $built is dynamically linked; a FROM scratch image needs it static" >&2
    exit 1
  fi
  # The only file of target/ that .dockerignore lets into the build context.
  mkdir -p target/docker
  cp "$built" target/docker/herald.tmp
  strip target/docker/herald.tmp
  mv target/docker/herald.tmp target/docker/herald
  step "herald:local from target/docker/herald (deploy/docker/Dockerfile --target local)"
  docker build -f deploy/docker/Dockerfile --target local -t herald:local .
fi
docker run --rm herald:local --version
[[ $herald_only -eq 1 ]] && exit 0

if [[ $BASE_IMAGE == herald-debian-base:* ]]; then
  step "$BASE_IMAGE (deploy/docker/build-base.sh; kept when it exists)"
  BASE_IMAGE=$BASE_IMAGE deploy/docker/build-base.sh
fi

step "herald-certs:local"
docker build -f deploy/docker/certs.Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg HERALD_IMAGE=herald:local -t herald-certs:local deploy
step "herald-haproxy:local"
docker build -f deploy/docker/haproxy.Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
  -t herald-haproxy:local deploy
step "herald-prometheus:local"
docker build -f deploy/docker/prometheus.Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
  -t herald-prometheus:local deploy

step "images"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' |
  grep -E '^(herald|herald-certs|herald-haproxy|herald-prometheus|herald-debian-base):' || true
echo
echo "next: docker compose up -d    (docker-compose up -d with Compose v1); see docs/compose.md"
