#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR MIT
# Runs vmkit's whole test suite on a Debian machine with Rust. Installs what it needs
# (qemu-utils for the image-format interop tests, the Debian Linux guest for the Linux smoke
# test) or stops with a message naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "test.sh: $*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs)"
command -v python3 >/dev/null || die "python3 is missing: apt-get install python3"

apt_install() {
    if [ "$(id -u)" != 0 ]; then die "$1 is missing and installing it needs root: apt-get install $2"; fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
command -v qemu-img >/dev/null || apt_install qemu-img qemu-utils
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing: this needs a Debian system"
command -v lz4 >/dev/null || apt_install lz4 lz4

# The Linux smoke test boots Debian's cloud kernel (downloaded, never installed).
python3 scripts/build-linux-guest.py --out .cache/linux-guest
export VMKIT_LINUX_GUEST_DIR="$PWD/.cache/linux-guest"

# Where /dev/kvm exists, a KVM test that would skip fails instead.
if [ -e /dev/kvm ]; then export VMKIT_REQUIRE_KVM=1; fi

cargo test --workspace --locked "$@"
