#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR MIT
# Puts Debian's qemu-system-x86 under .cache/qemu WITHOUT installing it: installing the package
# would remove the preinstalled qemu-utils 10.0 backport. Downloads the package and every
# dependency that is not installed yet, unpacks them with dpkg-deb, and prints the command
# prefix to run it. Idempotent.
#
# Usage: scripts/fetch-qemu.sh [DIR]     (default DIR: .cache/qemu)
# Then:  DIR/qemu-system-x86_64 ...      (a wrapper that sets LD_LIBRARY_PATH and -L)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$(realpath -m "${1:-.cache/qemu}")"
die() { echo "fetch-qemu.sh: $*" >&2; exit 1; }
if [ -x "$dir/qemu-system-x86_64" ] && "$dir/qemu-system-x86_64" --version >/dev/null 2>&1; then
    echo "$dir/qemu-system-x86_64"
    exit 0
fi
for t in apt-get apt-cache dpkg-deb dpkg-query; do
    command -v "$t" >/dev/null || die "$t is missing: this script needs a Debian system"
done
mkdir -p "$dir/debs" "$dir/root"
deps() {
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances qemu-system-x86 qemu-system-data seabios 2>/dev/null |
        awk '/^[a-z0-9]/ {print $1}' | sed 's/:any$//' | sort -u
}
pkgs="$(deps)"
if [ -z "$pkgs" ]; then
    apt-get update -qq || die "apt-get update failed"
    pkgs="$(deps)"
fi
[ -n "$pkgs" ] || die "cannot resolve qemu-system-x86 with apt-cache"
need=()
for p in $pkgs; do
    case "$p" in qemu-system-x86|qemu-system-data|qemu-system-common|seabios) need+=("$p"); continue ;; esac
    # Skip virtual packages and what is installed already.
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then continue; fi
    apt-cache show "$p" >/dev/null 2>&1 || continue
    need+=("$p")
done
(cd "$dir/debs" && apt-get download "${need[@]}" >/dev/null 2>&1) ||
    (apt-get update -qq && cd "$dir/debs" && apt-get download "${need[@]}") ||
    die "apt-get download failed for: ${need[*]}"
for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
libs="$dir/root/usr/lib/x86_64-linux-gnu:$dir/root/lib/x86_64-linux-gnu"
cat > "$dir/qemu-system-x86_64" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$dir/root/usr/bin/qemu-system-x86_64" -L "$dir/root/usr/share/qemu" -L "$dir/root/usr/share/seabios" "\$@"
WRAP
chmod +x "$dir/qemu-system-x86_64"
"$dir/qemu-system-x86_64" --version >/dev/null || die "the unpacked QEMU does not run; see: $dir/qemu-system-x86_64 --version"
echo "$dir/qemu-system-x86_64"
