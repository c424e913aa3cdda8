// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The README's composition example (`examples/minimal.rs`) really boots the test guest.
//! Needs `/dev/kvm` (skips loudly without it; fails under `VMKIT_REQUIRE_KVM`).

mod common;

use std::process::Command;

#[test]
fn kvm_minimal_example_boots_the_test_guest() {
    if !vmkit_testkit::kvm_available("kvm_minimal_example_boots_the_test_guest") {
        return;
    }
    let out = Command::new("timeout")
        .args(["--kill-after=5", "60"])
        .arg(common::example_binary("minimal"))
        .arg("3")
        .output()
        .expect("spawn the minimal example");
    let (stdout, stderr) = common::texts(&out);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    let report = vmkit_guest::parse_report(&stdout).expect("a guest report on stdout");
    assert_eq!((report.cpus, report.expected), (3, 3), "{stdout}");
    assert!(report.passed(), "{stdout}");
}
