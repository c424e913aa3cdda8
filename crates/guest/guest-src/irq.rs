// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Device interrupts: IDT vector allocation, per-vector and per-CPU counting, the IOAPIC.
//!
//! This host's KVM cannot execute `iretq`, so no handler returns to interrupted code (see
//! `idt.rs`). Interrupts are only ever enabled inside `percpu::wait_for_interrupt` (`sti;
//! hlt`): parked APs sit there, and the BSP goes there when it waits for an interrupt on
//! purpose ([`wait_bsp`]). A device vector's handler ([`handle`]) counts the interrupt
//! (per vector, per receiving CPU, and whether it reached the CPU it was programmed for),
//! signals EOI and resumes the wait. Drivers therefore never depend on an interrupt to make
//! progress: they poll their used rings (the BSP runs with interrupts off) and the counts
//! tell whether, and where, the device's interrupts arrived. An interrupt for the BSP stays
//! pending in its LAPIC until the BSP next waits.

use crate::apic;
use crate::cpu::{mmio_read, mmio_write, rdtsc};
use crate::percpu::{cpu_of_addr, MAX_CPUS};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// First IDT vector handed to devices.
pub const FIRST_DEVICE_VECTOR: u8 = 0x40;
/// One past the last device vector (the LAPIC timer is 0xEF).
pub const END_DEVICE_VECTOR: u8 = 0xE0;
/// "Any CPU" marker for [`set_target`].
const ANY_CPU: u32 = u32::MAX;

static NEXT_VECTOR: AtomicU32 = AtomicU32::new(FIRST_DEVICE_VECTOR as u32);
static VEC_COUNT: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
static VEC_TARGET: [AtomicU32; 256] = [const { AtomicU32::new(ANY_CPU) }; 256];
/// Base address of the virtio-mmio device behind an IOAPIC vector (0: none): the handler
/// acknowledges its interrupt status so that the next used buffer raises a new edge.
static VEC_MMIO_ACK: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
static CPU_COUNT: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static WRONG_CPU: AtomicU32 = AtomicU32::new(0);

/// Allocates `n` consecutive device vectors; returns the first.
pub fn alloc_vectors(n: u32) -> Option<u8> {
    let mut cur = NEXT_VECTOR.load(Ordering::Relaxed);
    loop {
        let end = cur.checked_add(n)?;
        if n == 0 || end > u32::from(END_DEVICE_VECTOR) {
            return None;
        }
        match NEXT_VECTOR.compare_exchange(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return Some(cur as u8),
            Err(now) => cur = now,
        }
    }
}

/// Notes that `vector` is programmed to reach the CPU with APIC ID `apic_id`.
pub fn set_target(vector: u8, apic_id: u32) {
    VEC_TARGET[usize::from(vector)].store(apic_id, Ordering::Relaxed);
}

/// Notes that `vector` belongs to the virtio-mmio device at `base` (see [`VEC_MMIO_ACK`]).
pub fn set_mmio_ack(vector: u8, base: u64) {
    VEC_MMIO_ACK[usize::from(vector)].store(base, Ordering::Relaxed);
}

/// `true` for vectors [`handle`] deals with.
pub fn is_device_vector(v: u8) -> bool {
    (FIRST_DEVICE_VECTOR..END_DEVICE_VECTOR).contains(&v)
}

/// Interrupts counted on `vector`.
pub fn count(vector: u8) -> u32 {
    VEC_COUNT[usize::from(vector)].load(Ordering::Acquire)
}

/// Interrupts counted on `n` vectors from `first`.
pub fn count_range(first: u8, n: u32) -> u64 {
    (0..n)
        .filter_map(|i| VEC_COUNT.get(usize::from(first) + i as usize))
        .map(|c| u64::from(c.load(Ordering::Acquire)))
        .sum()
}

/// Device interrupts received by CPU index `cpu`.
pub fn cpu_count(cpu: usize) -> u32 {
    CPU_COUNT.get(cpu).map_or(0, |c| c.load(Ordering::Acquire))
}

/// Device interrupts that arrived on a CPU other than the one their vector was programmed
/// for.
pub fn wrong_cpu() -> u32 {
    WRONG_CPU.load(Ordering::Acquire)
}

/// Counts a device interrupt (called from the trap dispatcher with interrupts off) and
/// signals EOI. The caller resumes the interrupted wait.
pub fn handle(vector: u8, frame_addr: u64) {
    let v = usize::from(vector);
    let mmio = VEC_MMIO_ACK[v].load(Ordering::Relaxed);
    if mmio != 0 {
        let status: u32 = mmio_read(mmio + 0x60);
        mmio_write(mmio + 0x64, status);
    }
    let target = VEC_TARGET[v].load(Ordering::Relaxed);
    if target != ANY_CPU && target != apic::id() {
        WRONG_CPU.fetch_add(1, Ordering::AcqRel);
    }
    if let Some(c) = cpu_of_addr(frame_addr).and_then(|cpu| CPU_COUNT.get(cpu)) {
        c.fetch_add(1, Ordering::AcqRel);
    }
    VEC_COUNT[v].fetch_add(1, Ordering::AcqRel);
    apic::eoi();
}

/// On the BSP: enables interrupts and sleeps until one arrives or `ticks` TSC ticks pass
/// (LAPIC timer); returns with interrupts off. Pending device interrupts are taken (and
/// counted) first.
pub fn wait_bsp(ticks: u64, tsc_khz: u64) {
    apic::arm_timer(rdtsc(), ticks, tsc_khz);
    crate::percpu::wait_for_interrupt(0);
    apic::disarm_timer();
}

/// Default IOAPIC MMIO base.
pub const IOAPIC_DEFAULT_BASE: u64 = 0xFEC0_0000;

/// Programs the IOAPIC redirection entry of `gsi` (found among `ioapics`: `(base, gsi_base)`
/// pairs; the default IOAPIC at GSI 0 when the list is empty): fixed delivery of `vector` to
/// the CPU with APIC ID `dest` (physical mode), edge triggered, active high, unmasked.
/// Returns `false` if no IOAPIC serves `gsi` or `dest` does not fit in 8 bits.
pub fn ioapic_route(ioapics: &[(u64, u32)], gsi: u32, vector: u8, dest: u32) -> bool {
    let default = [(IOAPIC_DEFAULT_BASE, 0)];
    let list = if ioapics.is_empty() {
        &default[..]
    } else {
        ioapics
    };
    if dest > 0xFF {
        return false;
    }
    for &(base, gsi_base) in list {
        let Some(pin) = gsi.checked_sub(gsi_base) else {
            continue;
        };
        let reg = |r: u32| -> u32 {
            mmio_write(base, r);
            mmio_read(base + 0x10)
        };
        // IOAPIC version register: bits 16..24 = highest redirection entry.
        let max = (reg(1) >> 16) & 0xFF;
        if pin > max {
            continue;
        }
        let index = 0x10 + 2 * pin;
        mmio_write(base, index + 1);
        mmio_write(base + 0x10, dest << 24);
        mmio_write(base, index);
        mmio_write(base + 0x10, u32::from(vector));
        return true;
    }
    false
}
