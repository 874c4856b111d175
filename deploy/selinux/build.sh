#!/usr/bin/env bash
# Builds the Herald SELinux policy package (herald.pp) from herald.te and
# herald.fc, and checks it.
#
#   deploy/selinux/build.sh [--out DIR] [--no-link-check] [--check-interfaces]
#
# Steps (any failure exits non-zero):
#   1. installs checkpolicy and semodule-utils with apt-get when checkmodule
#      or semodule_package is missing (Debian/Ubuntu, as root);
#   2. checkmodule -M -m (herald.te -> herald.mod), semodule_package
#      (herald.mod + herald.fc -> herald.pp) into DIR (default: a new
#      temporary directory, printed at the end);
#   3. checks that every type herald.fc names is declared in herald.te;
#   4. link check (default on): fetches Debian's reference policy package
#      (selinux-policy-default, with `apt-get download`, not installed),
#      links herald.pp against its base module and expands the result. This
#      proves that every type, attribute, class and permission herald.te
#      requires exists in that policy, and (with setfiles, from
#      policycoreutils, when present) that every context in herald.fc is
#      valid. If the package cannot be downloaded the check is skipped with a
#      warning; if linking fails, the build fails;
#   5. with --check-interfaces: compiles a test module that calls every
#      interface in herald.if through the reference policy's build
#      (selinux-policy-dev, installed when missing) and links it too.
#
# Installing the result on an SELinux host is a separate, manual step
# (docs/production.md#17-selinux): semodule -i DIR/herald.pp, then semanage port
# and restorecon.

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out=""
link_check=1
check_interfaces=0

usage() {
    # The comment block at the top of this file.
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        --no-link-check) link_check=0; shift ;;
        --check-interfaces) check_interfaces=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() { printf 'selinux: %s\n' "$*"; }
fail() { printf 'selinux: FAIL: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        fail "need the packages $* and there is no apt-get here: install them by hand"
    if [ "$(id -u)" -ne 0 ]; then
        fail "need the packages $*: run as root, or install them first"
    fi
    if [ "$apt_updated" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || fail "apt-get update failed"
        apt_updated=1
    fi
    say "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
        fail "apt-get install $* failed"
}

# 1. Tools.
missing=()
command -v checkmodule >/dev/null 2>&1 || missing+=(checkpolicy)
command -v semodule_package >/dev/null 2>&1 || missing+=(semodule-utils)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi

if [ -z "$out" ]; then
    out="$(mktemp -d "${TMPDIR:-/tmp}/herald-selinux.XXXXXX")"
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/herald-selinux-work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# 2. Compile and package. checkmodule wants the output named after the
# module, so compile from a copy named herald.te.
cp "$here/herald.te" "$here/herald.fc" "$work/"
say "checkmodule: $(checkmodule -V 2>/dev/null | head -n1 | tr "[:upper:]" "[:lower:]")"
(cd "$work" && checkmodule -M -m -o herald.mod herald.te) || fail "checkmodule rejected herald.te"
(cd "$work" && semodule_package -o herald.pp -m herald.mod -f herald.fc) ||
    fail "semodule_package rejected herald.mod/herald.fc"
cp "$work/herald.mod" "$work/herald.pp" "$out/"
say "built $out/herald.pp ($(wc -c <"$out/herald.pp") bytes)"

# 3. Every type in herald.fc is declared in herald.te.
declared="$(sed -n 's/^[[:space:]]*type[[:space:]]\{1,\}\([a-z0-9_]*\)[[:space:]]*;.*/\1/p' "$here/herald.te" | sort -u)"
fc_types="$(grep -v '^[[:space:]]*#' "$here/herald.fc" | grep -o ':object_r:[a-z0-9_]*:' | cut -d: -f3 | sort -u)"
[ -n "$fc_types" ] || fail "herald.fc names no type"
for t in $fc_types; do
    grep -qx "$t" <<<"$declared" || fail "herald.fc uses $t, which herald.te does not declare"
done
say "herald.fc: $(wc -w <<<"$fc_types") types, all declared in herald.te"

# Fetches Debian's reference policy (not installed: unpacked under $work)
# and prints the path of its base module, or nothing.
debian_base_policy() {
    command -v apt-get >/dev/null 2>&1 || return 0
    command -v dpkg-deb >/dev/null 2>&1 || return 0
    local dir="$work/refpolicy"
    mkdir -p "$dir"
    if [ "$apt_updated" -eq 0 ] && [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
        apt_updated=1
    fi
    # apt's sandbox user may not write to $dir; download as this user.
    (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root selinux-policy-default >/dev/null 2>&1) || return 0
    local debs=("$dir"/selinux-policy-default_*.deb)
    local deb="${debs[0]}"
    [ -f "$deb" ] || return 0
    dpkg-deb -x "$deb" "$dir/root" || return 0
    local base="$dir/root/usr/share/selinux/default/base.pp"
    if [ -f "$base.bz2" ]; then
        bunzip2 -k "$base.bz2" || return 0
    fi
    [ -f "$base" ] && printf '%s %s\n' "$base" "$(dpkg-deb -f "$deb" Version)"
}

# 4. Link against Debian's base policy.
base=""
if [ "$link_check" -eq 1 ]; then
    read -r base base_version < <(debian_base_policy || true) || true
    if [ -z "$base" ]; then
        say "WARNING: link check skipped: could not download Debian's selinux-policy-default"
    else
        command -v semodule_link >/dev/null 2>&1 || fail "semodule_link missing (semodule-utils)"
        if ! semodule_link -o "$work/linked.pp" "$base" "$work/herald.pp" >"$work/link.log" 2>&1; then
            semodule_link -v -o "$work/linked.pp" "$base" "$work/herald.pp" 2>&1 |
                grep -i "herald.*requirements\|error" >&2 || cat "$work/link.log" >&2
            fail "herald.pp does not link against Debian's base policy $base_version"
        fi
        semodule_expand "$work/linked.pp" "$work/policy.bin" >/dev/null 2>&1 ||
            fail "base policy + herald.pp does not expand to a kernel policy"
        say "links and expands against Debian's reference policy (selinux-policy-default $base_version)"
        if command -v setfiles >/dev/null 2>&1; then
            grep -v '^[[:space:]]*#' "$here/herald.fc" | grep -v '^[[:space:]]*$' >"$work/file_contexts"
            setfiles -c "$work/policy.bin" "$work/file_contexts" ||
                fail "herald.fc has a context the linked policy rejects"
            say "herald.fc: every context is valid in the linked policy (setfiles -c)"
        else
            say "herald.fc contexts not checked against the policy (no setfiles: apt-get install policycoreutils)"
        fi
    fi
fi

# 5. herald.if through the reference policy's build.
if [ "$check_interfaces" -eq 1 ]; then
    devel=/usr/share/selinux/devel/Makefile
    [ -f "$devel" ] || apt_install selinux-policy-dev
    [ -f "$devel" ] || fail "no $devel after installing selinux-policy-dev"
    t="$work/interfaces"
    mkdir -p "$t"
    cp "$here/herald.te" "$here/herald.if" "$here/herald.fc" "$t/"
    # One call of every interface herald.if defines.
    {
        echo 'policy_module(heraldiftest, 1.0.0)'
        echo 'type heraldiftest_t;'
        echo 'type heraldiftest_exec_t;'
        echo 'init_daemon_domain(heraldiftest_t, heraldiftest_exec_t)'
        echo "gen_require(\`"
        echo '	role system_r;'
        echo "')"
        sed -n "s/^interface(\`\(herald_[a-z_]*\)'.*/\1/p" "$here/herald.if" | while read -r name; do
            if [ "$name" = herald_admin ]; then
                echo "$name(heraldiftest_t, system_r)"
            else
                echo "$name(heraldiftest_t)"
            fi
        done
    } >"$t/heraldiftest.te"
    : >"$t/heraldiftest.if"
    : >"$t/heraldiftest.fc"
    count="$(grep -c '^herald_' "$t/heraldiftest.te")"
    (cd "$t" && make -s -f "$devel" heraldiftest.pp >"$work/iftest.log" 2>&1) || {
        cat "$work/iftest.log" >&2
        fail "herald.if does not compile through the reference policy's build"
    }
    say "herald.if: $count interfaces compile through the reference policy's build"
    if [ -n "$base" ]; then
        semodule_link -o "$work/linked-if.pp" "$base" "$work/herald.pp" "$t/heraldiftest.pp" >"$work/link-if.log" 2>&1 || {
            cat "$work/link-if.log" >&2
            fail "a module using herald.if does not link against base + herald.pp"
        }
        say "a module calling every interface links against base + herald.pp"
    fi
fi

say "OK: $out/herald.pp"
