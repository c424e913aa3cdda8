// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Impossible configurations get a clear error and a non-zero exit from the example VMM,
//! never a panic. The cases that must ask KVM for its limits need `/dev/kvm`.

mod common;

use common::{run_vmm, texts};

fn expect_error(args: &[&str], needle: &str) {
    let out = run_vmm(args);
    let (_, stderr) = texts(&out);
    assert!(!out.status.success(), "{args:?} must fail");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: error should mention {needle:?}, got: {stderr}"
    );
}

#[test]
fn zero_vcpus_is_refused() {
    expect_error(&["--cpus", "0"], "--cpus must be at least 1");
}

#[test]
fn malformed_flags_are_refused() {
    expect_error(&["--memory", "lots"], "bad size");
    expect_error(&["--serial", "tcp:1234"], "--serial takes");
    expect_error(&["--boot", "bios"], "--boot takes");
    expect_error(&["--frobnicate"], "unknown option");
    expect_error(&["--cpus"], "--cpus needs a value");
}

#[test]
fn kvm_too_many_vcpus_is_refused() {
    if !vmkit_testkit::kvm_available("kvm_too_many_vcpus_is_refused") {
        return;
    }
    expect_error(&["--cpus", "100000"], "vCPUs");
}

#[test]
fn kvm_missing_kernel_file_is_named() {
    if !vmkit_testkit::kvm_available("kvm_missing_kernel_file_is_named") {
        return;
    }
    expect_error(
        &["--kernel", "/nonexistent/vmlinuz"],
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn kvm_file_that_is_not_a_kernel_is_refused() {
    if !vmkit_testkit::kvm_available("kvm_file_that_is_not_a_kernel_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, vec![b'x'; 64 * 1024]).unwrap();
    expect_error(&["--kernel", path.to_str().unwrap()], "notes.txt");
}

#[test]
fn kvm_memory_too_small_is_refused() {
    if !vmkit_testkit::kvm_available("kvm_memory_too_small_is_refused") {
        return;
    }
    expect_error(&["--memory", "1M"], "memory");
    expect_error(&["--memory", "4095"], "memory");
}

#[test]
fn kvm_missing_initramfs_is_named() {
    if !vmkit_testkit::kvm_available("kvm_missing_initramfs_is_named") {
        return;
    }
    let guest = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(guest.path(), vmkit_guest::elf()).unwrap();
    expect_error(
        &[
            "--kernel",
            guest.path().to_str().unwrap(),
            "--initramfs",
            "/nonexistent/initrd.img",
        ],
        "/nonexistent/initrd.img",
    );
}
