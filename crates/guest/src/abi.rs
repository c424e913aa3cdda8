// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The guest's contract with the VMM: ports, POST codes, exit codes, memory it uses.

/// POST progress port: the guest writes one byte (a [`PostCode`]).
pub const POST_PORT: u16 = 0x80;
/// Exit port: the guest writes its exit code as one byte. Under QEMU,
/// `-device isa-debug-exit,iobase=0xf4,iosize=0x04` turns it into the process exit status
/// `(code << 1) | 1`.
pub const EXIT_PORT: u16 = 0xF4;
/// COM1 base port (16550); the report is printed there.
pub const SERIAL_PORT: u16 = 0x3F8;
/// Physical address the image is linked and loaded at.
pub const LOAD_ADDRESS: u64 = 0x10_0000;
/// Physical page the guest copies its SIPI trampoline to (`0x8000..0x8FFF`); a VMM must not
/// keep anything it still needs there. The guest reads all boot data (at 0x6000/0x7000 by
/// convention) before it writes this page.
pub const TRAMPOLINE_ADDRESS: u64 = 0x8000;
/// The guest uses RAM after its image for per-CPU stacks: this many bytes per AP, starting
/// at the first 32 KiB boundary after the image.
pub const PER_CPU_BYTES: u64 = 32 * 1024;
/// Most CPUs the guest supports.
pub const MAX_CPUS: u32 = 1024;

/// Progress codes written to [`POST_PORT`], in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum PostCode {
    /// First instruction of either entry point.
    Entry = 0x10,
    /// Rust main entered on the BSP.
    Main = 0x20,
    /// Every expected AP is online (not written when bring-up timed out).
    AllOnline = 0x30,
    /// About to run the exit sequence.
    Exit = 0x40,
}

impl PostCode {
    /// The code for a byte written to [`POST_PORT`], if it is one of ours.
    pub fn from_byte(b: u8) -> Option<PostCode> {
        match b {
            0x10 => Some(PostCode::Entry),
            0x20 => Some(PostCode::Main),
            0x30 => Some(PostCode::AllOnline),
            0x40 => Some(PostCode::Exit),
            _ => None,
        }
    }
}

/// Exit code: every expected CPU online, topology consistent.
pub const EXIT_OK: u8 = 0;
/// Exit code: CPU count or topology mismatch (see the report).
pub const EXIT_MISMATCH: u8 = 1;
/// Exit code: Rust panic in the guest.
pub const EXIT_PANIC: u8 = 2;
/// Exit code: CPU exception (or unexpected interrupt) in the guest.
pub const EXIT_EXCEPTION: u8 = 3;

/// Command-line options the guest understands.
pub mod cmdline {
    /// `vmkit.debug=1`: print a `VMKIT-GUEST debug ...` line: TSC frequency and source,
    /// the boot phase timings in microseconds (`entry_us` first instruction to Rust main,
    /// `init_us`, `bootinfo_us`, `tables_us`, `sipi_us`, `tsc_us`, `bringup_us` STARTUP to all
    /// online, `entry_to_online_us`, `collect_us`; `ap_first_us`/`ap_last_us` when the
    /// first/last AP reached long mode, `ap_run_us` their mean time from there to recorded),
    /// SIPI re-sends, and a job round trip through every parked AP.
    pub const DEBUG: &str = "vmkit.debug=1";
    /// `vmkit.fault=panic`: panic right after reading the boot information (tests the panic
    /// path; exit code [`super::EXIT_PANIC`]).
    pub const FAULT_PANIC: &str = "vmkit.fault=panic";
    /// `vmkit.fault=ud2`: raise #UD (tests the exception path; exit code
    /// [`super::EXIT_EXCEPTION`]).
    pub const FAULT_UD2: &str = "vmkit.fault=ud2";
}
