// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Shared helpers of the root integration tests: running the example VMM binary.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of the example VMM built by the same `cargo test` invocation (cargo builds examples
/// before it runs tests).
pub fn vmm_binary() -> PathBuf {
    example_binary("vmm")
}

/// Path of the example `name` built by the same `cargo test` invocation.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/vmm
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let vmm = profile_dir.join("examples").join(name);
    assert!(
        vmm.exists(),
        "{} is missing: run the tests through `cargo test`, which builds the examples",
        vmm.display()
    );
    vmm
}

/// Runs the example VMM with `args`, with a 120 s timeout, and returns its output.
pub fn run_vmm(args: &[&str]) -> Output {
    run_vmm_with_timeout(args, 120)
}

/// Runs the example VMM with `args`, killed after `seconds`, and returns its output.
pub fn run_vmm_with_timeout(args: &[&str], seconds: u32) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=5")
        .arg(seconds.to_string())
        .arg(vmm_binary())
        .args(args);
    let out = cmd.output().expect("spawn the example VMM");
    eprintln!(
        "--- vmm {:?}: {}\n--- stdout:\n{}\n--- stderr:\n{}",
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stdout and stderr as strings.
pub fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
