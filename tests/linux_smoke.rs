// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Linux smoke test (slow: about a minute per boot on this host): the example VMM boots
//! Debian's cloud kernel with 64 vCPUs, through the Linux 64-bit boot protocol (bzImage) and
//! through PVH (the uncompressed `vmlinux`, an ELF that was not written against vmkit), and
//! the kernel's log shows that it parsed our command line, e820 map and ACPI tables and
//! switched to x2APIC mode. Then the VM is stopped: this host's KVM cannot finish booting a
//! stock kernel (README, "Known limitations").
//!
//! Needs `/dev/kvm` and the guest built by `scripts/build-linux-guest.py`, found through
//! `VMKIT_LINUX_GUEST_DIR` (`scripts/test.sh` sets both up). Without them the tests skip
//! loudly, unless `VMKIT_REQUIRE_KVM` is set (CI), in which case they fail.

mod common;

use std::path::{Path, PathBuf};

use common::{run_vmm_with_timeout, texts};

fn guest_dir(test: &str) -> Option<PathBuf> {
    if !vmkit_testkit::kvm_available(test) {
        return None;
    }
    let required =
        std::env::var(vmkit_testkit::REQUIRE_KVM_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
    match std::env::var("VMKIT_LINUX_GUEST_DIR") {
        Ok(dir) if PathBuf::from(&dir).join("bzImage").exists() => Some(PathBuf::from(dir)),
        other => {
            let msg = format!(
                "{test}: VMKIT_LINUX_GUEST_DIR ({other:?}) does not hold a Linux guest; \
                 run scripts/build-linux-guest.py (scripts/test.sh does)"
            );
            if required {
                panic!("{msg}");
            }
            eprintln!("=== SKIPPED {msg} ===");
            None
        }
    }
}

const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 clearcpuid=cx16 noxsave i8042.noaux vmkit.smoke=1";

fn boot_linux(kernel: &str, dir: &Path) -> String {
    let kernel = dir.join(kernel);
    let initramfs = dir.join("initramfs.cpio.gz");
    let out = run_vmm_with_timeout(
        &[
            "--cpus",
            "64",
            "--memory",
            "1G",
            "--x2apic",
            "--kernel",
            kernel.to_str().expect("guest paths are UTF-8"),
            "--initramfs",
            initramfs.to_str().expect("guest paths are UTF-8"),
            "--cmdline",
            CMDLINE,
            "--stop-on",
            "smpboot: Allowing",
        ],
        300,
    );
    let (stdout, stderr) = texts(&out);
    assert!(!stderr.contains("panicked"), "the VMM panicked: {stderr}");
    assert!(
        out.status.success(),
        "the VMM should stop the VM with exit 0 once the kernel printed the smpboot line"
    );
    stdout
}

fn assert_linux_parsed_our_tables(log: &str) {
    assert!(log.contains("Linux version 6."), "no 'Linux version' line");
    assert!(
        log.contains(&format!("Command line: {CMDLINE}")),
        "the kernel did not see our command line"
    );
    assert!(
        log.contains("BIOS-e820: [mem 0x0000000000100000-0x000000003fffffff] usable"),
        "the kernel did not see our e820 map"
    );
    assert!(
        log.contains("ACPI: RSDP 0x00000000000E0000"),
        "no RSDP at 0xE0000"
    );
    assert!(log.contains("smpboot: Allowing 64 CPUs"), "MADT not parsed");
    assert!(
        log.contains("x2apic: enabled by BIOS, switching to x2apic ops"),
        "the kernel did not switch to x2APIC"
    );
}

#[test]
fn kvm_linux_bzimage_64_vcpus() {
    let Some(dir) = guest_dir("kvm_linux_bzimage_64_vcpus") else {
        return;
    };
    let log = boot_linux("bzImage", &dir);
    assert_linux_parsed_our_tables(&log);
}

#[test]
fn kvm_linux_pvh_vmlinux_64_vcpus() {
    let Some(dir) = guest_dir("kvm_linux_pvh_vmlinux_64_vcpus") else {
        return;
    };
    let log = boot_linux("vmlinux", &dir);
    assert_linux_parsed_our_tables(&log);
}
