#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR MIT
# Acceptance check of the test guest's PCI/virtio drivers under QEMU (KVM, PVH boot):
#   1. microvm + PCIe (ECAM 0xE0000000, given with vmkit.pci_ecam: microvm has no MCFG):
#      virtio-blk-pci (8 queues), virtio-rng-pci, virtio-serial-pci with a port named
#      vmkit.echo whose host side echoes, BARs force-reprogrammed; 1 and 64 vCPUs.
#   2. q35 (ECAM from the MCFG table, BARs assigned by SeaBIOS, relocated by the guest).
#   3. microvm without ACPI: virtio-blk-device over virtio-mmio (QEMU appends
#      virtio_mmio.device= to the command line itself).
# Each run must exit with the guest's code 0 (QEMU status 1 through isa-debug-exit) and
# print verify=ok / ok=1 / echo=ok. Usage: crates/guest/qemu-check.sh [GUEST_ELF]
# (default: built with cargo into $CARGO_TARGET_DIR or target/). QEMU from
# scripts/fetch-qemu.sh ($QEMU overrides).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
qemu="${QEMU:-$("$root/scripts/fetch-qemu.sh")}"
elf="${1:-}"
if [ -z "$elf" ]; then
    (cd "$root" && cargo build -q -p vmkit-guest)
    elf="$(find "${CARGO_TARGET_DIR:-$root/target}" -path '*vmkit-guest-*/out/vmkit-guest.elf' -newer "$here/build.rs" | head -1)"
fi
[ -f "$elf" ] || { echo "no guest ELF (pass its path)" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
truncate -s 8M "$tmp/pci.raw"
truncate -s 4M "$tmp/mmio.raw"
fail=0

echo_server() {
    python3 - "$1" <<'PY' &
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(1)
c, _ = s.accept()
while True:
    d = c.recv(4096)
    if not d:
        break
    c.sendall(d)
PY
    for _ in $(seq 50); do [ -S "$1" ] && return; sleep 0.1; done
}

run() { # name, expected-lines regexes..., -- qemu args...
    local name="$1"; shift
    local want=()
    while [ "$1" != "--" ]; do want+=("$1"); shift; done
    shift
    local out="$tmp/$name.out" status=0
    timeout 300 "$qemu" -accel kvm -cpu host,-arch-capabilities -m 512M -nographic -nodefaults \
        -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -kernel "$elf" "$@" > "$out" 2>&1 || status=$?
    local ok=1
    [ "$status" = 1 ] || { echo "$name: QEMU exit status $status (want 1 = guest exit 0)"; ok=0; }
    for w in "${want[@]}"; do
        grep -aEq "$w" "$out" || { echo "$name: missing /$w/"; ok=0; }
    done
    grep -a '^VMKIT-' "$out" | sed "s/^/  [$name] /"
    if [ $ok = 1 ]; then echo "$name: PASS"; else echo "$name: FAIL"; fail=1; fi
}

for smp in 1 64; do
    sock="$tmp/echo$smp.sock"
    echo_server "$sock"
    run "microvm-pci-smp$smp" \
        'VIRTIO-BLK transport=pci .*verify=ok' 'VIRTIO-BLK-BENCH .*io_errors=0' \
        'VIRTIO-RNG transport=pci .*ok=1' 'VIRTIO-CONSOLE .*name=vmkit.echo .*echo=ok' \
        "VMKIT-MSIX .*cpus=$smp .*cpus_hit=$smp .*wrong_cpu=0 rotation_cpus=$smp rotation_hit=$smp" -- \
        -M microvm,pcie=on,acpi=on -smp "$smp" \
        -append "vmkit.pci_ecam=0xe0000000 vmkit.pci_reassign=1 vmkit.blk_bench=1 vmkit.blk_bench_ms=200" \
        -drive id=d0,file="$tmp/pci.raw",format=raw,if=none -device virtio-blk-pci,drive=d0,num-queues=8 \
        -device virtio-rng-pci -device virtio-serial-pci \
        -chardev socket,id=ec,path="$sock" -device virtserialport,chardev=ec,name=vmkit.echo
done

run q35-mcfg-relocate 'VMKIT-PCI access=ecam .*relocated=[1-9]' \
    'VIRTIO-BLK transport=pci .*verify=ok' 'VIRTIO-RNG transport=pci .*ok=1' -- \
    -M q35 -smp 2 -append "vmkit.pci_reassign=1" \
    -drive id=d0,file="$tmp/pci.raw",format=raw,if=none -device virtio-blk-pci,drive=d0 \
    -device virtio-rng-pci

run microvm-mmio 'VIRTIO-BLK transport=mmio .*verify=ok' 'VIRTIO-RNG transport=mmio .*ok=1' -- \
    -M microvm,acpi=off -smp 1 -global virtio-mmio.force-legacy=false \
    -drive id=d1,file="$tmp/mmio.raw",format=raw,if=none -device virtio-blk-device,drive=d1 \
    -device virtio-rng-device

exit $fail
