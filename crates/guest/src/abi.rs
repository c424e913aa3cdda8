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

/// Exit code: a device check failed (a `verify=fail`, `echo=` other than `ok`/`no_port`,
/// `ok=0`, `VMKIT-VIRTIO-ERROR` or BAR `failed=` line; see [`devices`]).
pub const EXIT_DEVICE: u8 = 4;

/// Device options (after every CPU is online the guest enumerates PCI and drives the
/// virtio devices it finds; with none, it prints only the `VMKIT-PCI` summary).
pub mod device_options {
    /// `vmkit.devices=0`: skip all device work (no device lines at all).
    pub const DEVICES_OFF: &str = "vmkit.devices=0";
    /// `vmkit.pci_ecam=<base>`: ECAM base (buses 0..=255) when there is no ACPI MCFG table
    /// (QEMU's microvm describes its ECAM at 0xE000_0000 only in the DSDT). Without MCFG or
    /// this option the guest uses the legacy 0xCF8/0xCFC ports.
    pub const PCI_ECAM: &str = "vmkit.pci_ecam";
    /// `vmkit.pci_mmio=<start>-<end>`: window for BARs the guest assigns (default
    /// `0xc0000000-0xe0000000`, end exclusive).
    pub const PCI_MMIO: &str = "vmkit.pci_mmio";
    /// `vmkit.pci_reassign=1`: reprogram every endpoint memory BAR, allocating top-down from
    /// the end of the window (so BARs a VMM assigned bottom-up move). Without it only
    /// unassigned (zero) BARs are programmed.
    pub const PCI_REASSIGN: &str = "vmkit.pci_reassign=1";
    /// `vmkit.blk_verify_mib=<n>`: bytes verified per disk (default 2 MiB, `0` = whole disk;
    /// never more than the capacity).
    pub const BLK_VERIFY_MIB: &str = "vmkit.blk_verify_mib";
    /// `vmkit.blk_queue_size=<n>`: largest virtqueue size used (default 256).
    pub const BLK_QUEUE_SIZE: &str = "vmkit.blk_queue_size";
    /// `vmkit.blk_bench=1`: run the benchmark after the verification.
    pub const BLK_BENCH: &str = "vmkit.blk_bench=1";
    /// `vmkit.blk_bench_ms=<ms>`: duration of each benchmark phase (default 500).
    pub const BLK_BENCH_MS: &str = "vmkit.blk_bench_ms";
    /// `vmkit.blk_qd=<n>`: requests in flight per queue (default 16; at most queue size / 3).
    pub const BLK_QD: &str = "vmkit.blk_qd";
    /// `vmkit.blk_bs=<bytes>`: sequential request size (default 65536).
    pub const BLK_BS: &str = "vmkit.blk_bs";
    /// `vmkit.echo_port=<name>`: virtio-console port to echo through (default `vmkit.echo`).
    pub const ECHO_PORT: &str = "vmkit.echo_port";
    /// `vmkit.echo_timeout_ms=<ms>`: how long to wait for the port and the echo (default
    /// 3000).
    pub const ECHO_TIMEOUT_MS: &str = "vmkit.echo_timeout_ms";
    /// `virtio_mmio.device=<size>@<base>:<gsi>[:<id>]` (Linux's syntax, repeatable): a
    /// virtio-mmio version 2 device. Its interrupt is routed through the IOAPIC that serves
    /// `<gsi>` (MADT; else 0xFEC0_0000), edge triggered, active high.
    pub const VIRTIO_MMIO: &str = "virtio_mmio.device";
}

/// The device report lines, one per line on COM1, `key=value` tokens separated by spaces.
///
/// ```text
/// VMKIT-PCI access=<ecam|legacy> ecam=<0xbase|-> buses=<n> devices=<n> assigned=<n> relocated=<n> failed=<n>
/// VMKIT-PCI-DEV bdf=<bb:dd.f> id=<vvvv:dddd> class=<0xhex> bar_bytes=<n>
/// VMKIT-VIRTIO-BLK transport=<pci|mmio> addr=<bdf|0xbase> queues=<n> capacity=<bytes> verify=<ok|fail|skipped> bytes=<n> bad_sectors=<n> io_errors=<n> flush=<ok|fail|unsupported> irqs=<n> us=<n>
/// VMKIT-VIRTIO-BLK-BENCH transport=.. addr=.. queues=<n> qd=<n> bs=<bytes> ms=<n> seq_write_mibps=<x.yy> seq_read_mibps=<x.yy> rand_read_iops=<n> rand_bs=4096 io_errors=<n>
/// VMKIT-VIRTIO-CONSOLE transport=.. addr=.. port=<n> name=<name|-> sent=<n> received=<n> echo=<ok|mismatch|timeout|no_port> irqs=<n>
/// VMKIT-VIRTIO-RNG transport=.. addr=.. bytes=<n> ok=<0|1> irqs=<n>
/// VMKIT-VIRTIO-ERROR transport=.. addr=.. device=<virtio type> reason=<word>
/// VMKIT-MSIX vectors=<n> cpus=<n> cpus_targeted=<n> cpus_hit=<n> interrupts=<n> wrong_cpu=<n> rotation_cpus=<n> rotation_hit=<n>
/// ```
///
/// - `VMKIT-PCI`: `assigned` memory BARs the guest programmed, `relocated` of those that had
///   another non-zero address, `failed` that did not fit the window.
/// - `irqs`: interrupts counted on the device's vectors when its line was printed.
/// - verification: the first `vmkit.blk_verify_mib` MiB are written with a per-boot
///   pattern (64 KiB requests, two in flight on every queue), flushed, read back, compared.
/// - benchmark: three phases of `ms` each (sequential write, sequential read of `bs`,
///   random 4 KiB reads), `qd` requests in flight on every queue; MiB/s with two decimals.
/// - `VMKIT-MSIX` (printed when any device interrupt was set up): MSI-X entries and IOAPIC
///   routes programmed (`vectors`), spread round-robin over the online CPUs (`cpus`,
///   `cpus_targeted`); `cpus_hit` CPUs received device interrupts, `interrupts` in total,
///   `wrong_cpu` arrived on a CPU other than the programmed one. Rotation: the first
///   virtio-rng-pci's MSI-X entry is pointed at each online CPU in turn and one request made;
///   `rotation_hit` of `rotation_cpus` CPUs received that interrupt.
///
/// Interrupts without `iretq`: handlers count, EOI and resume the `sti; hlt` wait they
/// interrupted (the only place interrupts are enabled); drivers poll their used rings.
///
/// Console echo protocol: the host side of the port named `vmkit.echo` (or
/// `vmkit.echo_port`) echoes every byte it receives, unchanged, in order. The guest opens the
/// port (`VIRTIO_CONSOLE_PORT_OPEN`), sends one line `vmkit-echo 0x<16 hex digits>\n`
/// (30 bytes) and expects exactly those bytes back within `vmkit.echo_timeout_ms`. Without
/// `VIRTIO_CONSOLE_F_MULTIPORT` port 0 is used as is.
pub mod devices {
    /// Prefix of the PCI summary line.
    pub const PCI: &str = "VMKIT-PCI";
    /// Prefix of the per-function PCI line.
    pub const PCI_DEV: &str = "VMKIT-PCI-DEV";
    /// Prefix of the virtio-blk verification line.
    pub const BLK: &str = "VMKIT-VIRTIO-BLK";
    /// Prefix of the virtio-blk benchmark line.
    pub const BLK_BENCH: &str = "VMKIT-VIRTIO-BLK-BENCH";
    /// Prefix of the virtio-console line.
    pub const CONSOLE: &str = "VMKIT-VIRTIO-CONSOLE";
    /// Prefix of the virtio-rng line.
    pub const RNG: &str = "VMKIT-VIRTIO-RNG";
    /// Prefix of the line for a virtio device that could not be driven.
    pub const VIRTIO_ERROR: &str = "VMKIT-VIRTIO-ERROR";
    /// Prefix of the interrupt-distribution line.
    pub const MSIX: &str = "VMKIT-MSIX";
}
