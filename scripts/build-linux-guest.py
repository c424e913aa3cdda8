#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR MIT
"""Builds the default Linux guest from Debian packages.

Output (in --out, default .cache/linux-guest): `bzImage` (Debian's cloud kernel), `vmlinux`
(the same kernel uncompressed: an ELF with a PVH note, a PVH guest not written against vmkit) and
`initramfs.cpio.gz` (busybox-static plus the virtio modules and an /init that loads them,
prints `VMKIT-LINUX up cpus=<n>` on the console and powers off).

Needs: apt-get (Debian), dpkg-deb, lz4, network access to the Debian mirror. Nothing is installed
on the host: packages are downloaded and unpacked into the output directory.
"""

import argparse
import gzip
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

MODULES = [
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio-rng",
]

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
for m in $(cat /etc/vmkit-modules); do
    insmod /lib/modules/$m || echo "VMKIT-LINUX insmod failed: $m"
done
echo "VMKIT-LINUX up cpus=$(nproc)"
poweroff -f
"""


def run(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, **kw)


def need(tool):
    if shutil.which(tool) is None:
        sys.exit(f"build-linux-guest: '{tool}' is missing; this script needs a Debian system with {tool}")


def download(pkg, dest):
    """apt-get download `pkg` into `dest`; returns the .deb path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    try:
        run(["apt-get", "download", pkg], cwd=dest)
    except subprocess.CalledProcessError:
        # The package lists may be stale on a fresh machine.
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "download", pkg], cwd=dest)
    new = set(dest.glob("*.deb")) - before
    if not new:
        matches = sorted(dest.glob(pkg.split(":")[0] + "_*.deb"))
        if not matches:
            sys.exit(f"build-linux-guest: apt-get download {pkg} produced no .deb")
        return matches[-1]
    return new.pop()


def kernel_package():
    out = subprocess.run(
        ["apt-cache", "depends", "linux-image-cloud-amd64"],
        check=True, capture_output=True, text=True,
    ).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1]
    sys.exit("build-linux-guest: cannot resolve the kernel package of linux-image-cloud-amd64")


def modinfo_depends(ko: Path):
    """Reads `depends=` from a module's .modinfo section (NUL-separated key=value strings)."""
    data = ko.read_bytes()
    deps = []
    for chunk in data.split(b"\0"):
        if chunk.startswith(b"depends="):
            deps = [d for d in chunk[len(b"depends="):].decode().split(",") if d]
            break
    return deps


def cpio_newc(entries):
    """entries: list of (name, mode, data_bytes or None for dirs). Returns the archive bytes."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data in entries + [("TRAILER!!!", 0, b"")]:
        data = data or b""
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0]
        )
        out.write(hdr.encode() + namez)
        out.write(b"\0" * ((4 - (110 + len(namez)) % 4) % 4))
        out.write(data)
        out.write(b"\0" * ((4 - len(data) % 4) % 4))
        ino += 1
    return out.getvalue()


def extract_vmlinux(bzimage: Path, dest: Path):
    """Writes the uncompressed ELF kernel (it carries a PVH note) from an LZ4 bzImage."""
    need("lz4")
    data = bzimage.read_bytes()
    at = data.find(b"\x02\x21\x4c\x18")  # LZ4 legacy frame magic
    if at < 0:
        sys.exit("build-linux-guest: the bzImage payload is not LZ4 (no legacy-frame magic)")
    # lz4 stops at the end of the frame and complains about the trailing bytes: ignore the
    # exit status, check the result instead.
    res = subprocess.run(["lz4", "-dc"], input=data[at:], capture_output=True)
    if not res.stdout.startswith(b"\x7fELF"):
        sys.exit(f"build-linux-guest: LZ4 payload did not decompress to an ELF: {res.stderr[:200]!r}")
    dest.write_bytes(res.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".cache/linux-guest")
    args = ap.parse_args()
    for tool in ["apt-get", "apt-cache", "dpkg-deb"]:
        need(tool)
    out = Path(args.out).resolve()
    debs = out / "debs"
    root = out / "root"
    if all((out / f).exists() for f in ["bzImage", "vmlinux", "initramfs.cpio.gz"]):
        print(f"build-linux-guest: {out} is already built")
        return
    kpkg = kernel_package()
    for pkg in [kpkg, "busybox-static"]:
        deb = download(pkg, debs)
        run(["dpkg-deb", "-x", str(deb), str(root)])
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        sys.exit("build-linux-guest: the kernel package has no /boot/vmlinuz-*")
    version = vmlinuz[-1].name[len("vmlinuz-"):]
    moddir = root / "lib" / "modules" / version
    by_name = {}
    for ko in moddir.rglob("*.ko*"):
        base = ko.name.split(".ko")[0]
        by_name[base] = ko
        by_name[base.replace("-", "_")] = ko
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        for line in bfile.read_text().splitlines():
            builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))

    order, seen = [], set()

    def add(name):
        key = name.replace("-", "_")
        if key in seen or key in builtin:
            return
        seen.add(key)
        ko = by_name.get(key) or by_name.get(name)
        if ko is None:
            sys.exit(f"build-linux-guest: module {name} is neither built in nor in {moddir}")
        data = ko.read_bytes()
        if ko.name.endswith(".xz"):
            import lzma
            data = lzma.decompress(data)
        elif ko.name.endswith(".zst"):
            sys.exit("build-linux-guest: zstd-compressed modules are not supported by this script")
        tmp = out / "mods" / (key + ".ko")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        for dep in modinfo_depends(tmp):
            add(dep)
        order.append(key + ".ko")

    for m in MODULES:
        add(m)

    busybox = root / "bin" / "busybox"
    entries = [
        ("bin", 0o40755, None),
        ("etc", 0o40755, None),
        ("lib", 0o40755, None),
        ("lib/modules", 0o40755, None),
        ("proc", 0o40755, None),
        ("sys", 0o40755, None),
        ("dev", 0o40755, None),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("init", 0o100755, INIT.encode()),
        ("etc/vmkit-modules", 0o100644, ("\n".join(order) + "\n").encode()),
    ]
    for name in order:
        entries.append((f"lib/modules/{name}", 0o100644, (out / "mods" / name).read_bytes()))
    (out / "initramfs.cpio.gz").write_bytes(gzip.compress(cpio_newc(entries), 6))
    shutil.copyfile(vmlinuz[-1], out / "bzImage")
    extract_vmlinux(out / "bzImage", out / "vmlinux")
    (out / "VERSION").write_text(version + "\n")
    print(f"build-linux-guest: kernel {version}, modules {' '.join(order)}")
    print(f"build-linux-guest: wrote {out}/bzImage and {out}/initramfs.cpio.gz")


if __name__ == "__main__":
    main()
