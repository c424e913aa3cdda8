// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Test support shared by vmkit's crates.
//!
//! Tests that need `/dev/kvm` call [`kvm_available`] first. Where `/dev/kvm` is missing the
//! test prints a loud `SKIPPED` line and returns early; but when the environment variable
//! [`REQUIRE_KVM_ENV`] is set (`.ci/run` sets it whenever `/dev/kvm` exists) a missing or
//! unusable `/dev/kvm` is a test failure instead, so that CI never silently skips.
//!
//! ```
//! fn kvm_something() {
//!     if !vmkit_testkit::kvm_available("kvm_something") {
//!         return;
//!     }
//!     // ... open /dev/kvm and test ...
//! }
//! # kvm_something();
//! ```

use std::fs::OpenOptions;

/// Environment variable that turns a KVM skip into a failure.
pub const REQUIRE_KVM_ENV: &str = "VMKIT_REQUIRE_KVM";

/// Returns `true` when `/dev/kvm` can be opened read-write.
///
/// Returns `false` (after printing a loud skip message naming `test`) when it cannot, unless
/// [`REQUIRE_KVM_ENV`] is set to a non-empty value other than `0`, in which case it panics so
/// the test fails.
pub fn kvm_available(test: &str) -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            let required = std::env::var(REQUIRE_KVM_ENV)
                .map(|v| !v.is_empty() && v != "0")
                .unwrap_or(false);
            if required {
                panic!("{test}: /dev/kvm is required ({REQUIRE_KVM_ENV} is set) but cannot be opened: {e}");
            }
            eprintln!("=== SKIPPED {test}: /dev/kvm cannot be opened ({e}) ===");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_consistently_with_device_node() {
        let openable = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if openable {
            assert!(kvm_available("reports_consistently_with_device_node"));
        }
    }
}
