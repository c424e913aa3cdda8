// SPDX-License-Identifier: Apache-2.0 OR MIT
//! End-to-end: the example VMM boots the embedded test guest under KVM and the guest's report
//! says every vCPU came online with the APIC IDs and topology we configured.
//!
//! These tests need `/dev/kvm` (they skip loudly without it, and fail instead when
//! `VMKIT_REQUIRE_KVM` is set, as CI does).

mod common;

use common::{run_vmm, texts};
use vmkit_guest::{parse_report, BootProtocol};

fn boot(test: &str, args: &[&str]) -> Option<vmkit_guest::GuestReport> {
    if !vmkit_testkit::kvm_available(test) {
        return None;
    }
    let out = run_vmm(args);
    let (stdout, stderr) = texts(&out);
    assert!(!stderr.contains("panicked"), "the VMM panicked: {stderr}");
    let report = parse_report(&stdout).unwrap_or_else(|e| panic!("no guest report: {e}"));
    assert_eq!(
        out.status.code(),
        Some(i32::from(report.exit_code)),
        "the VMM exits with the guest's exit code"
    );
    Some(report)
}

fn assert_all_online(report: &vmkit_guest::GuestReport, n: u32) {
    assert_eq!(report.expected, n, "guest found {n} CPUs in the MADT");
    assert_eq!(report.cpus, n, "every vCPU came online");
    assert!(report.consistent, "CPUID topology matches the LAPIC IDs");
    assert_eq!(report.exit_code, 0);
}

#[test]
fn kvm_boot_test_guest_1_vcpu() {
    let Some(r) = boot(
        "kvm_boot_test_guest_1_vcpu",
        &["--cpus", "1", "--memory", "128M"],
    ) else {
        return;
    };
    assert_all_online(&r, 1);
    assert_eq!(r.apic_ids, vec![0]);
    assert_eq!(r.boot, BootProtocol::Pvh);
}

#[test]
fn kvm_boot_test_guest_2_vcpus() {
    let Some(r) = boot(
        "kvm_boot_test_guest_2_vcpus",
        &["--cpus", "2", "--memory", "256M"],
    ) else {
        return;
    };
    assert_all_online(&r, 2);
    assert_eq!(r.apic_ids, vec![0, 1]);
}

#[test]
fn kvm_boot_test_guest_64_vcpus() {
    let Some(r) = boot(
        "kvm_boot_test_guest_64_vcpus",
        &["--cpus", "64", "--memory", "1G"],
    ) else {
        return;
    };
    assert_all_online(&r, 64);
    assert_eq!(r.apic_ids, (0..64).collect::<Vec<u32>>());
}

#[test]
fn kvm_boot_test_guest_linux64_protocol_with_cmdline() {
    let Some(r) = boot(
        "kvm_boot_test_guest_linux64_protocol_with_cmdline",
        &[
            "--cpus",
            "4",
            "--boot",
            "linux64",
            "--cmdline",
            "hello=world vmkit.test=1",
        ],
    ) else {
        return;
    };
    assert_all_online(&r, 4);
    assert_eq!(r.boot, BootProtocol::Linux64);
    assert!(
        r.cmdline.contains("hello=world vmkit.test=1"),
        "cmdline: {}",
        r.cmdline
    );
}

#[test]
fn kvm_boot_test_guest_smt_topology() {
    // 2 sockets x 2 cores x 2 threads: APIC IDs are dense here (all fields are powers of two).
    let Some(r) = boot(
        "kvm_boot_test_guest_smt_topology",
        &["--cpus", "8", "--sockets", "2", "--threads-per-core", "2"],
    ) else {
        return;
    };
    assert_all_online(&r, 8);
    assert_eq!(r.smt_bits, 1);
    assert_eq!(r.core_bits, 1);
}

#[test]
fn kvm_boot_test_guest_sparse_apic_ids() {
    // 3 cores per socket: the core field is 2 bits wide, so APIC IDs skip 3, 7, 11.
    let Some(r) = boot(
        "kvm_boot_test_guest_sparse_apic_ids",
        &["--cpus", "6", "--sockets", "2"],
    ) else {
        return;
    };
    assert_all_online(&r, 6);
    assert_eq!(r.apic_ids, vec![0, 1, 2, 4, 5, 6]);
}
