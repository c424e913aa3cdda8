#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR MIT
# Boots the embedded test guest with 64 vCPUs and 1 GiB of RAM under the example VMM.
# Extra arguments go to the VMM (e.g. --cpus 2, --kernel PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "demo.sh: $*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs)"
[ -e /dev/kvm ] || die "/dev/kvm is missing: this machine has no KVM (enable virtualization or load kvm_intel/kvm_amd)"
[ -r /dev/kvm ] && [ -w /dev/kvm ] || die "/dev/kvm is not accessible: add yourself to the 'kvm' group or run as root"
if [ $# -eq 0 ]; then set -- --cpus 64 --memory 1G; fi
exec cargo run --release --locked --example vmm -- "$@"
