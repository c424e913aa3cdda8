// SPDX-License-Identifier: Apache-2.0 OR MIT
//! vmkit test guest: a freestanding x86_64 program that boots by PVH or the Linux 64-bit boot
//! protocol, brings up every CPU the firmware tables list, checks the APIC topology and
//! reports over COM1, then exits through port 0xF4.
//!
//! Built by the `vmkit-guest` crate's build script for the host target as a `no_std`,
//! `no_main`, statically linked ELF (see `linker.ld`). Module map:
//! - `entry.rs`: PVH note, both entry points, GDT, page tables, `mem*` for `core`
//! - `cpu.rs`: port I/O, MSRs, CPUID, TSC; `serial.rs`: COM1
//! - `gdt.rs`, `idt.rs`, `percpu.rs`: TSS/IST stacks, IDT and trap dispatch, per-CPU blocks
//! - `physmem.rs`, `bootinfo.rs`, `acpi.rs`, `mptable.rs`: pure parsers (host-tested)
//! - `apic.rs`, `smp.rs`, `tsc.rs`: LAPIC, AP bring-up, TSC frequency
//! - `report.rs`: the report lines (parsed by the host crate)
//! - `devices.rs` (after all CPUs are online): `pci.rs` (ECAM/legacy config access,
//!   enumeration, BARs, MSI-X), `irq.rs` (device vectors, IOAPIC, interrupt counting),
//!   `dma.rs` (device memory), `virtio.rs` (both transports, split virtqueues), `blk.rs`,
//!   `console.rs` and the rng in `devices.rs`; `options.rs` parses option values
#![no_std]
#![no_main]

mod acpi;
mod apic;
mod blk;
mod bootinfo;
mod console;
mod cpu;
mod devices;
mod dma;
mod entry;
mod gdt;
mod idt;
mod irq;
mod mptable;
mod options;
mod pci;
mod percpu;
mod physmem;
mod report;
mod virtio;
#[macro_use]
mod serial;
mod smp;
mod tsc;

use bootinfo::BootInfo;
use core::sync::atomic::{AtomicU32, Ordering};
use cpu::{outb, post};
use percpu::MAX_CPUS;
use physmem::{ApicIdSet, PhysMem};
use report::Sink;
use serial::Serial;

// POST code 0x10 (first instruction of either entry point) is written by `entry.rs`.
/// POST code: Rust main entered on the BSP.
const POST_MAIN: u8 = 0x20;
/// POST code: all expected APs online.
const POST_ALL_ONLINE: u8 = 0x30;
/// POST code: about to run the exit sequence.
const POST_EXIT: u8 = 0x40;

/// Exit port (our VMM exits with the byte written; QEMU isa-debug-exit with `(code << 1) | 1`).
const EXIT_PORT: u16 = 0xF4;
/// Exit code: all CPUs online and consistent.
const EXIT_OK: u8 = 0;
/// Exit code: CPU count or topology mismatch.
const EXIT_MISMATCH: u8 = 1;
/// Exit code: Rust panic.
const EXIT_PANIC: u8 = 2;
/// Exit code: CPU exception or unexpected interrupt.
const EXIT_EXCEPTION: u8 = 3;
/// Exit code: a device check failed (see the device report lines).
const EXIT_DEVICE: u8 = 4;

/// Physical memory through the identity map (the first 4 GiB).
struct IdentityMem;

impl IdentityMem {
    /// Reads a `T` at `addr` with one load (the default byte-copy path costs a `rep movsb`,
    /// which this host's KVM emulates one byte at a time).
    fn load<T: Copy>(&self, addr: u64) -> Option<T> {
        let end = addr.checked_add(core::mem::size_of::<T>() as u64)?;
        if end > 1 << 32 {
            return None;
        }
        // SAFETY: inside the identity-mapped first 4 GiB; unaligned read of plain bytes.
        Some(unsafe { (addr as *const T).read_unaligned() })
    }
}

impl PhysMem for IdentityMem {
    fn read_u8(&self, addr: u64) -> Option<u8> {
        self.load(addr)
    }
    fn read_u16(&self, addr: u64) -> Option<u16> {
        self.load(addr)
    }
    fn read_u32(&self, addr: u64) -> Option<u32> {
        self.load(addr)
    }
    fn read_u64(&self, addr: u64) -> Option<u64> {
        self.load(addr)
    }

    /// Byte sum from 8-byte loads, the range checked once (fewer emulated instructions than
    /// a byte loop: about one per byte).
    fn checksum(&self, addr: u64, len: u64) -> Option<u8> {
        let end = addr.checked_add(len)?;
        if end > 1 << 32 {
            return None;
        }
        const LO: u64 = 0x00FF_00FF_00FF_00FF;
        let mut sum = 0u8;
        let mut at = addr;
        // Runs of at most 128 words: each adds at most 2 * 255 to a 16-bit lane.
        while end - at >= 8 {
            let words = ((end - at) / 8).min(128);
            let mut lanes = 0u64;
            let mut p = at as *const u64;
            for _ in 0..words {
                // SAFETY: `at + 8 * words <= end <= 4 GiB`: inside the identity map.
                let w = unsafe { p.read_unaligned() };
                lanes += (w & LO) + ((w >> 8) & LO);
                // SAFETY: stays within (one past) the checked range.
                p = unsafe { p.add(1) };
            }
            sum = sum.wrapping_add(fold_lanes(lanes));
            at += words * 8;
        }
        while at < end {
            sum = sum.wrapping_add(self.load::<u8>(at)?);
            at += 1;
        }
        Some(sum)
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        match addr.checked_add(buf.len() as u64) {
            Some(end) if end <= 1 << 32 => {
                // SAFETY: the range lies inside the identity-mapped first 4 GiB; reading RAM or
                // MMIO there has no effect on Rust-visible state.
                unsafe {
                    core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len())
                };
                true
            }
            _ => false,
        }
    }
}

/// Sum (mod 256) of the four 16-bit lanes of `lanes`.
fn fold_lanes(lanes: u64) -> u8 {
    let l = lanes.wrapping_add(lanes >> 32);
    let l = l.wrapping_add(l >> 16);
    l as u8
}

/// Where the expected CPU list came from.
#[derive(Clone, Copy)]
enum CpuSource {
    Acpi,
    MpTable,
    None,
}

impl CpuSource {
    fn name(self) -> &'static str {
        match self {
            CpuSource::Acpi => "acpi",
            CpuSource::MpTable => "mptable",
            CpuSource::None => "none",
        }
    }
}

/// Large per-boot state, kept off the BSP stack: statics are zero-initialised data loaded
/// with the image, so nothing here is zeroed or copied at run time. Used by the BSP only.
struct Statics {
    boot: BootInfo,
    expected: ApicIdSet<MAX_CPUS>,
    online: ApicIdSet<MAX_CPUS>,
}

static mut STATICS: Statics = Statics {
    boot: BootInfo::new(bootinfo::BootProtocol::Pvh),
    expected: ApicIdSet::new(),
    online: ApicIdSet::new(),
};

fn mask_legacy_pic() {
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
}

#[no_mangle]
extern "C" fn vmkit_bsp_main(proto: u32, info: u64) -> ! {
    post(POST_MAIN);
    let t_main = cpu::rdtsc();
    gdt::load_tss(0);
    idt::load();
    mask_legacy_pic();
    // INIT the other CPUs right away (only the BSP's APIC mode is needed for that): each AP's
    // host thread handles its INIT while the BSP reads the boot information and the tables.
    // The STARTUP follows once the BSP has the CPU list (`smp::start_aps`).
    apic::init_bsp();
    smp::send_init();
    let t_init = cpu::rdtsc();

    // SAFETY: only the BSP touches STATICS, and only here (one boot, one call).
    let statics = unsafe { &mut *core::ptr::addr_of_mut!(STATICS) };
    let mem = IdentityMem;
    let read = match proto {
        cpu::BOOT_PROTO_PVH => statics.boot.read_pvh(&mem, info),
        cpu::BOOT_PROTO_LINUX64 => statics.boot.read_linux(&mem, info),
        _ => panic!("unknown boot protocol"),
    };
    match read {
        Ok(()) => {}
        Err(bootinfo::BootInfoError::BadPvhMagic(_)) => panic!("bad hvm_start_info magic"),
        Err(bootinfo::BootInfoError::Unreadable(_)) => panic!("boot information unreadable"),
    }
    let boot: &BootInfo = &statics.boot;

    // Fault injection for testing the handlers: vmkit.fault=panic|ud2.
    match boot.option("vmkit.fault") {
        Some(b"panic") => panic!("fault injected by vmkit.fault=panic"),
        // SAFETY: deliberately raises #UD to test the exception path.
        Some(b"ud2") => unsafe { core::arch::asm!("ud2") },
        _ => {}
    }
    let debug = boot.option("vmkit.debug") == Some(b"1");
    if debug {
        smp::time_aps();
    }
    let t_boot = cpu::rdtsc();

    let expected = &mut statics.expected;
    let madt = acpi::discover_cpus(&mem, boot.rsdp, expected);
    let source = if madt.is_some() {
        CpuSource::Acpi
    } else if mptable::discover_cpus(&mem, expected) {
        CpuSource::MpTable
    } else {
        expected.clear();
        CpuSource::None
    };

    let t_tables = cpu::rdtsc();
    if expected.overflowed() {
        panic!("the firmware tables list more CPUs than the guest supports (1024)");
    }

    if matches!(source, CpuSource::None) {
        // No firmware tables: expect just the BSP.
        expected.insert(apic::id());
    }

    // Everything needed from low memory has been read: the trampoline may go to 0x8000 now.
    // Start the APs first; what the BSP still needs for waiting (its own record, the TSC
    // frequency for the timeouts) is done while they come up.
    let expected: &'static ApicIdSet<MAX_CPUS> = expected;
    let started = smp::start_aps(boot, expected);
    let t_sipi = cpu::rdtsc();
    let bsp = smp::record_bsp();
    let (tsc_khz, tsc_source) = tsc::calibrate();
    let t_tsc = cpu::rdtsc();
    let waited = smp::wait_online(&started, tsc_khz);
    if waited.all_online {
        post(POST_ALL_ONLINE);
    }
    let t_online = cpu::rdtsc();
    smp::finish_wait();

    // Checking the records and reporting come after "all online".
    let online = &mut statics.online;
    let outcome = smp::collect(&started, online);
    let t_collect = cpu::rdtsc();
    let expected_n = expected.len() as u32;
    let code = if outcome.cpus == expected_n && outcome.consistent {
        EXIT_OK
    } else {
        EXIT_MISMATCH
    };

    {
        let mut s = Serial::lock();
        report::write_boot_line(&mut s, boot.protocol.name(), boot.cmdline());
        report::write_cpus_line(
            &mut s,
            outcome.cpus,
            expected_n,
            online.as_slice(),
            apic::is_x2apic(),
        );
        report::write_topo_line(&mut s, bsp.smt_bits, bsp.core_bits, outcome.consistent);
    }
    if debug {
        let (ran, posted) = smp::ping_aps(outcome.max_cpu, tsc_khz, 1000);
        let us = |ticks: u64| ticks.saturating_mul(1000) / tsc_khz.max(1);
        let mut s = Serial::lock();
        s.put_str(report::PREFIX);
        s.put_str(" debug cpu_source=");
        s.put_str(source.name());
        s.put_str(" tsc_khz=");
        s.put_dec(tsc_khz);
        s.put_str(" tsc_source=");
        s.put_str(tsc_source.name());
        s.put_str(" entry_us=");
        s.put_dec(us(t_main.wrapping_sub(entry::entry_tsc())));
        s.put_str(" init_us=");
        s.put_dec(us(t_init - t_main));
        s.put_str(" bootinfo_us=");
        s.put_dec(us(t_boot - t_init));
        s.put_str(" tables_us=");
        s.put_dec(us(t_tables - t_boot));
        s.put_str(" sipi_us=");
        s.put_dec(us(t_sipi - t_tables));
        s.put_str(" tsc_us=");
        s.put_dec(us(t_tsc - t_sipi));
        s.put_str(" bringup_us=");
        s.put_dec(us(waited.elapsed_tsc));
        s.put_str(" entry_to_online_us=");
        s.put_dec(us(t_online.wrapping_sub(entry::entry_tsc())));
        s.put_str(" collect_us=");
        s.put_dec(us(t_collect - t_online));
        s.put_str(" sipi_resends=");
        s.put_dec(u64::from(waited.resends));
        if let Some(t) = outcome.mismatch {
            s.put_str(" mismatch=");
            s.put_dec(u64::from(t.apic_id));
            s.put_str("/");
            match t.x2apic_id {
                Some(x) => s.put_dec(u64::from(x)),
                None => s.put_str("-"),
            }
            s.put_str("/");
            s.put_dec(u64::from(t.initial_apic_id));
        }
        if let Some(t) = smp::ap_times(&started, outcome.max_cpu) {
            s.put_str(" ap_first_us=");
            s.put_dec(us(t.first_start));
            s.put_str(" ap_last_us=");
            s.put_dec(us(t.last_start));
            s.put_str(" ap_run_us=");
            s.put_dec(us(t.mean_run));
        }
        s.put_str(" jobs=");
        s.put_dec(u64::from(ran));
        s.put_str("/");
        s.put_dec(u64::from(posted));
        s.put_str("\n");
    }
    // Devices come after every CPU is online (and after the boot report): PCI, virtio,
    // interrupts. `vmkit.devices=0` skips them.
    let mut code = code;
    if boot.option("vmkit.devices") != Some(b"0") {
        let ok = devices::run(
            boot,
            madt.as_ref(),
            started.area_end(),
            tsc_khz,
            online.as_slice(),
        );
        if !ok && code == EXIT_OK {
            code = EXIT_DEVICE;
        }
    }
    report::write_exit_line(&mut Serial::lock(), code);
    exit(code)
}

/// Runs the exit sequence: exit port, i8042 reset, triple fault.
fn exit(code: u8) -> ! {
    post(POST_EXIT);
    outb(EXIT_PORT, code);
    outb(0x64, 0xFE);
    idt::load_empty();
    // SAFETY: with an empty IDT any exception triple-faults: the machine resets (or stops,
    // under QEMU -no-reboot). `ud2` rather than `int3`: this host's KVM emulator fails on
    // `int3` (an emulation error that leaves QEMU hanging) but delivers #UD.
    unsafe { core::arch::asm!("ud2") };
    cpu::halt_forever()
}

/// APIC ID + 1 of the CPU that is panicking (0: none).
static PANIC_OWNER: AtomicU32 = AtomicU32::new(0);

/// Makes this CPU the panicking one; another CPU already panicking halts this one. A nested
/// panic on the owning CPU exits at once with `code`.
fn enter_panic(code: u8) {
    let me = apic::id().wrapping_add(1);
    match PANIC_OWNER.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(owner) if owner == me => exit(code),
        Err(_) => cpu::halt_forever(),
    }
}

/// Reports a CPU exception (or unexpected interrupt) and exits with code 3.
pub(crate) fn fatal_exception(vector: u8, rip: u64, error: u64) -> ! {
    enter_panic(EXIT_EXCEPTION);
    {
        let mut s = Serial::lock_for_panic();
        report::write_exception_line(&mut s, vector, rip, error);
        report::write_exit_line(&mut s, EXIT_EXCEPTION);
    }
    exit(EXIT_EXCEPTION)
}

/// Prints `VMKIT-GUEST panic <message> at <file>:<line>` and exits with code 2.
///
/// Only messages without arguments are printed verbatim: formatting arguments would run
/// `core::fmt`'s integer code, which uses SSE instructions this host's KVM emulator rejects.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    enter_panic(EXIT_PANIC);
    {
        let mut s = Serial::lock_for_panic();
        s.put_str(report::PREFIX);
        s.put_str(" panic ");
        s.put_str(
            info.message()
                .as_str()
                .unwrap_or("(message with arguments)"),
        );
        if let Some(loc) = info.location() {
            s.put_str(" at ");
            s.put_str(loc.file());
            s.put_str(":");
            s.put_dec(u64::from(loc.line()));
        }
        s.put_str("\n");
        report::write_exit_line(&mut s, EXIT_PANIC);
    }
    exit(EXIT_PANIC)
}

/// `core` is precompiled with unwinding tables that name this symbol; with `panic=abort`
/// nothing ever unwinds, so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
