// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The vmkit test guest, embedded as bytes, and the host-side tools to use it.
//!
//! The guest (sources in `guest-src/`, built by this crate's build script with `$RUSTC` into a
//! static x86_64 ELF linked at 1 MiB) boots by PVH (ELF note) or by the Linux 64-bit boot
//! protocol (ELF entry point), brings up every CPU that the ACPI MADT (or the MP table) lists
//! with INIT/SIPI, checks the APIC topology, prints a report on COM1 and writes its exit code
//! to port 0xF4. Progress is visible on POST port 0x80 ([`abi::PostCode`]).
//!
//! This crate gives the host side: [`elf`] (the image), [`inspect_elf`] (entry points and load
//! segments, so a VMM or test can check what it loads) and [`parse_report`] (the serial
//! output turned into a [`GuestReport`]).
//!
//! ```
//! let info = vmkit_guest::inspect_elf(vmkit_guest::elf()).unwrap();
//! assert!(info.pvh_entry.is_some());
//!
//! let serial = "VMKIT-GUEST boot=pvh cmdline=\"console=ttyS0\"\n\
//!               VMKIT-GUEST cpus=4 expected=4 apic_ids=0-3 x2apic=1\n\
//!               VMKIT-GUEST topo smt_bits=0 core_bits=2 consistent=1\n\
//!               VMKIT-GUEST exit=0\n";
//! let report = vmkit_guest::parse_report(serial).unwrap();
//! assert_eq!(report.cpus, 4);
//! assert_eq!(report.apic_ids, vec![0, 1, 2, 3]);
//! assert!(report.passed());
//! ```

pub mod abi;
pub mod devices;
mod elf;
mod report;

pub use elf::{inspect_elf, ElfError, ElfInfo, Segment};
pub use report::{
    parse_apic_ids, parse_report, BootProtocol, GuestReport, ReportError, MAX_APIC_IDS,
};

/// The guest ELF image (x86_64, statically linked, loaded at 1 MiB physical).
pub fn elf() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/vmkit-guest.elf"))
}

/// Path of the guest ELF as built (inside cargo's `OUT_DIR`). Handy for running an external
/// VMM such as QEMU (`-kernel <path>`); it exists as long as the build directory does. Write
/// [`elf`] to a file of your own if that is not good enough.
pub fn elf_path() -> &'static str {
    concat!(env!("OUT_DIR"), "/vmkit-guest.elf")
}

/// The guest's pure parsers (boot information, ACPI, MP table, report formatting), compiled
/// into the host test build so they can be tested against crafted and random memory.
#[cfg(test)]
mod guest_src;

#[cfg(test)]
mod guest_src_tests;
