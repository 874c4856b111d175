#!/usr/bin/env bash
# Builds the Debian base image that the HAProxy, Prometheus and certs images
# start from, without any container registry: debootstrap (minbase) makes a
# Debian root file system from Debian's package mirror, and `docker import`
# turns it into an image.
#
# Idempotent: an existing image is kept (its tag is the cache) unless
# --force is given.
#
#   deploy/docker/build-base.sh            # builds herald-debian-base:bookworm if missing
#   deploy/docker/build-base.sh --force    # builds it again
#
# Environment:
#   BASE_IMAGE     the tag to make (default herald-debian-base:bookworm)
#   SUITE          the Debian release (default bookworm)
#   DEBIAN_MIRROR  the mirror (default http://deb.debian.org/debian)
#
# Needs root (debootstrap) and installs debootstrap with apt-get if missing.
# Where images can be pulled, `debian:bookworm-slim` does the same job: pass
# it as the BASE_IMAGE build argument instead (see docs/compose.md).
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-herald-debian-base:bookworm}
SUITE=${SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-base.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

if [[ $force -eq 0 ]] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "build-base.sh: $BASE_IMAGE exists (use --force to rebuild)"
  exit 0
fi

SUDO=
if [[ $(id -u) -ne 0 ]]; then
  SUDO=sudo
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "build-base.sh: installing debootstrap"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/herald-debian-base.XXXXXX")
cleanup() { $SUDO rm -rf "$work"; }
trap cleanup EXIT
rootfs=$work/rootfs

echo "build-base.sh: debootstrap $SUITE from $DEBIAN_MIRROR (minbase)"
$SUDO debootstrap --variant=minbase "$SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  echo "build-base.sh: debootstrap failed" >&2
  exit 1
}

# Security and point-release updates, as in Debian's own images, applied
# now so that every image starts patched.
$SUDO tee "$rootfs/etc/apt/sources.list" >/dev/null <<SOURCES
deb $DEBIAN_MIRROR $SUITE main
deb $DEBIAN_MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
$SUDO chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -qq && apt-get upgrade -y -qq && apt-get clean' >>"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  echo "build-base.sh: apt-get upgrade in the new root failed" >&2
  exit 1
}
# Keep images small: no downloaded .debs, no documentation or man pages.
$SUDO tee "$rootfs/etc/apt/apt.conf.d/90herald-docker" >/dev/null <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT
$SUDO tee "$rootfs/etc/dpkg/dpkg.cfg.d/90herald-docker" >/dev/null <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG
$SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/var/log/*.log "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
  "$rootfs"/usr/share/info/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
$SUDO find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
# The container's own /etc/hostname, /etc/hosts and /etc/resolv.conf are
# mounted by Docker; leave none of the build machine's behind.
$SUDO rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"

echo "build-base.sh: importing as $BASE_IMAGE"
$SUDO tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "Debian $SUITE minbase (debootstrap) for Herald's compose images" \
  - "$BASE_IMAGE" >/dev/null
docker image ls "$BASE_IMAGE"
