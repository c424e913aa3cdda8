// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The guest's pure modules, compiled for the host (tests only). They use only `core` and
//! reach each other through `super::`, so they build unchanged in both places.
#![allow(dead_code)]

#[path = "../guest-src/acpi.rs"]
pub mod acpi;
#[path = "../guest-src/bootinfo.rs"]
pub mod bootinfo;
#[path = "../guest-src/mptable.rs"]
pub mod mptable;
#[path = "../guest-src/options.rs"]
pub mod options;
#[path = "../guest-src/physmem.rs"]
pub mod physmem;
#[path = "../guest-src/report.rs"]
pub mod report;
