#!/usr/bin/env bash
# Checks a sysctl.d file without applying it (there is no `sysctl --dry-run`):
#
#   deploy/sysctl/check.sh [FILE]        (default: 90-herald.conf beside this script)
#
# Fails (exit 1) when:
#   - a line is neither a comment, blank, nor `[-]key = value`;
#   - a key is not a dotted lower-case sysctl name, or appears twice;
#   - a value is empty or not numbers (the settings here are all numeric,
#     with ranges like 7400-7402,7480 for ip_local_reserved_ports);
#   - a setting has no comment directly above it (every setting says why),
#     except when it continues a group of settings under one comment;
#   - a key without the '-' prefix does not exist on this kernel.
# Reports, without failing: each key's current value next to the file's,
# and the keys whose file value is lower than the running kernel's for
# settings that should only ever be raised. Reads /proc/sys only.

set -euo pipefail

file="${1:-$(dirname "${BASH_SOURCE[0]}")/90-herald.conf}"
[ -r "$file" ] || { echo "check.sh: cannot read $file" >&2; exit 1; }

# Settings that are ceilings or sizes: a lower value than the kernel's
# running one would shrink something.
raise_only=" net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.core.netdev_max_backlog
 fs.nr_open fs.file-max net.core.rmem_max net.core.wmem_max net.core.rmem_default
 net.core.wmem_default net.netfilter.nf_conntrack_max "

errors=0
err() { printf '%s:%d: %s\n' "$file" "$1" "$2" >&2; errors=$((errors + 1)); }

declare -A seen=()
lineno=0
prev=blank # what the previous line was: blank, comment or setting
settings=0
printf '%-52s %-22s %s\n' "key" "file" "running kernel"
while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    # Trim surrounding white space.
    trimmed="${line#"${line%%[![:space:]]*}"}"
    trimmed="${trimmed%"${trimmed##*[![:space:]]}"}"
    if [ -z "$trimmed" ]; then
        prev=blank
        continue
    fi
    case "$trimmed" in
        '#'* | ';'*)
            prev=comment
            continue
            ;;
    esac
    if ! [[ "$trimmed" =~ ^(-?)([a-z0-9_.-]+)[[:space:]]*=[[:space:]]*(.*)$ ]]; then
        err "$lineno" "not a 'key = value' line: $trimmed"
        prev=setting
        continue
    fi
    optional="${BASH_REMATCH[1]}"
    key="${BASH_REMATCH[2]}"
    value="${BASH_REMATCH[3]}"
    settings=$((settings + 1))
    if ! [[ "$key" =~ ^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)+$ ]]; then
        err "$lineno" "not a sysctl name: $key"
    fi
    if [ -n "${seen[$key]:-}" ]; then
        err "$lineno" "$key is set twice (first on line ${seen[$key]})"
    fi
    seen[$key]=$lineno
    if [ -z "$value" ]; then
        err "$lineno" "$key has no value"
    elif ! [[ "$value" =~ ^[0-9]+([-,[:space:]]+[0-9]+)*$ ]]; then
        err "$lineno" "$key = $value: expected numbers"
    fi
    if [ "$prev" = blank ]; then
        err "$lineno" "$key has no comment above it saying why"
    fi
    prev=setting

    path="/proc/sys/${key//.//}"
    if [ -r "$path" ]; then
        current="$(tr -s '[:space:]' ' ' <"$path" | sed 's/ $//')"
    else
        current="(absent)"
        if [ -z "$optional" ]; then
            err "$lineno" "$key does not exist on this kernel ($path); prefix it with '-' if it depends on a module"
        fi
    fi
    proposed="$(tr -s '[:space:]' ' ' <<<"$value" | sed 's/ $//')"
    note=""
    if [[ "$raise_only" == *" $key "* ]] && [[ "$current" =~ ^[0-9]+$ ]] && [[ "$proposed" =~ ^[0-9]+$ ]]; then
        if [ "$proposed" -lt "$current" ]; then
            note="  <- LOWER than running: drop this line on this host"
        fi
    fi
    printf '%-52s %-22s %s%s\n' "$optional$key" "$proposed" "$current" "$note"
done <"$file"

if [ "$settings" -eq 0 ]; then
    err 0 "no settings"
fi
if [ "$errors" -gt 0 ]; then
    echo "check.sh: $errors problem(s) in $file" >&2
    exit 1
fi
echo "check.sh: $file: $settings settings, syntax OK (nothing applied)"
