// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Local APIC access in x2APIC mode (MSRs 0x800+) or xAPIC mode (MMIO at the APIC base).
//!
//! The BSP picks the mode once ([`init_bsp`]): x2APIC whenever CPUID advertises it (needed for
//! APIC IDs above 254), xAPIC otherwise. Every AP follows the BSP's choice ([`init_ap`]).

use crate::cpu::{cpuid, pause, rdmsr, wrmsr};
use crate::idt::{SPURIOUS_VECTOR, TIMER_VECTOR};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const MSR_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_EXTD: u64 = 1 << 10;
const X2APIC_MSR_BASE: u32 = 0x800;

// Register offsets (xAPIC MMIO offset; the x2APIC MSR is 0x800 + offset / 16).
const REG_ID: u32 = 0x20;
const REG_EOI: u32 = 0xB0;
const REG_SVR: u32 = 0xF0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_DIVIDE: u32 = 0x3E0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TSC_DEADLINE: u32 = 2 << 17;
const MSR_TSC_DEADLINE: u32 = 0x6E0;

const ICR_DELIVERY_PENDING: u32 = 1 << 12;
/// ICR delivery mode INIT, level assert, level triggered.
const ICR_INIT: u32 = (5 << 8) | (1 << 14) | (1 << 15);
/// ICR delivery mode STARTUP (vector in bits 0..7).
const ICR_STARTUP: u32 = 6 << 8;
/// ICR delivery mode fixed, level assert.
const ICR_FIXED: u32 = 1 << 14;
/// ICR destination shorthand "all excluding self".
const ICR_ALL_BUT_SELF: u32 = 3 << 18;

const APIC_BASE_BSP: u64 = 1 << 8;

static X2APIC: AtomicBool = AtomicBool::new(false);
static TSC_DEADLINE: AtomicBool = AtomicBool::new(false);
static MMIO_BASE: AtomicU64 = AtomicU64::new(0xFEE0_0000);
/// IA32_APIC_BASE value for the APs in x2APIC mode (the BSP's, without its BSP flag).
static AP_APIC_BASE: AtomicU64 = AtomicU64::new(0);

/// `true` once the BSP has switched the system to x2APIC mode.
pub fn is_x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

fn read(reg: u32) -> u32 {
    if is_x2apic() {
        rdmsr(X2APIC_MSR_BASE + reg / 16) as u32
    } else {
        let addr = MMIO_BASE.load(Ordering::Relaxed) + u64::from(reg);
        // SAFETY: the LAPIC page is identity-mapped (uncached) by the boot page tables.
        unsafe { (addr as *const u32).read_volatile() }
    }
}

fn write(reg: u32, value: u32) {
    if is_x2apic() {
        wrmsr(X2APIC_MSR_BASE + reg / 16, u64::from(value));
    } else {
        let addr = MMIO_BASE.load(Ordering::Relaxed) + u64::from(reg);
        // SAFETY: the LAPIC page is identity-mapped (uncached) by the boot page tables.
        unsafe { (addr as *mut u32).write_volatile(value) }
    }
}

fn enable_local(x2apic: bool) {
    let mut base = rdmsr(MSR_APIC_BASE) | APIC_BASE_ENABLE;
    if x2apic {
        base |= APIC_BASE_EXTD;
    }
    wrmsr(MSR_APIC_BASE, base);
    // Software-enable the APIC (needed to receive fixed IPIs), spurious vector 0xFF.
    write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
}

/// Chooses the APIC mode for the whole system and enables the BSP's LAPIC: x2APIC if
/// CPUID.1:ECX bit 21 says so. Also notes whether the timer has TSC-deadline mode (bit 24).
pub fn init_bsp() {
    let ecx = cpuid(1, 0).ecx;
    let x2 = ecx & (1 << 21) != 0;
    TSC_DEADLINE.store(ecx & (1 << 24) != 0, Ordering::Relaxed);
    let msr = rdmsr(MSR_APIC_BASE);
    let base = msr & 0x000F_FFFF_FFFF_F000;
    if base != 0 && base < (1 << 32) {
        MMIO_BASE.store(base, Ordering::Relaxed);
    }
    X2APIC.store(x2, Ordering::Relaxed);
    AP_APIC_BASE.store(
        (msr & !APIC_BASE_BSP) | APIC_BASE_ENABLE | APIC_BASE_EXTD,
        Ordering::Relaxed,
    );
    enable_local(x2);
}

/// Enables this AP's LAPIC in the mode the BSP chose. In x2APIC mode this is a single
/// IA32_APIC_BASE write (no read first: each MSR access is an exit), with the BSP's base
/// address.
#[inline(always)]
pub fn init_ap() {
    if is_x2apic() {
        wrmsr(MSR_APIC_BASE, AP_APIC_BASE.load(Ordering::Relaxed));
        wrmsr(
            X2APIC_MSR_BASE + REG_SVR / 16,
            0x100 | u64::from(SPURIOUS_VECTOR),
        );
    } else {
        enable_local(false);
    }
}

/// This CPU's APIC ID (32 bits in x2APIC mode, 8 bits in xAPIC mode).
#[inline(always)]
pub fn id() -> u32 {
    let v = read(REG_ID);
    if is_x2apic() {
        v
    } else {
        v >> 24
    }
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

fn send(dest: u32, low: u32) {
    if is_x2apic() {
        wrmsr(
            X2APIC_MSR_BASE + REG_ICR_LOW / 16,
            (u64::from(dest) << 32) | u64::from(low),
        );
    } else {
        write(REG_ICR_HIGH, dest << 24);
        write(REG_ICR_LOW, low);
        for _ in 0..1_000_000 {
            if read(REG_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
                break;
            }
            pause();
        }
    }
}

/// Sends INIT to every other CPU.
pub fn send_init_all_but_self() {
    send(0, ICR_INIT | ICR_ALL_BUT_SELF);
}

/// Sends STARTUP with `vector` (start at `vector << 12`) to every other CPU.
pub fn send_sipi_all_but_self(vector: u8) {
    send(0, ICR_STARTUP | ICR_ALL_BUT_SELF | u32::from(vector));
}

/// Sends STARTUP with `vector` to the CPU with APIC ID `dest`.
pub fn send_sipi(dest: u32, vector: u8) {
    send(dest, ICR_STARTUP | u32::from(vector));
}

/// Sends a fixed interrupt with `vector` to the CPU with APIC ID `dest`.
pub fn send_fixed(dest: u32, vector: u8) {
    send(dest, ICR_FIXED | u32::from(vector));
}

/// `true` if the LAPIC timer has TSC-deadline mode (noted by [`init_bsp`]).
fn tsc_deadline_supported() -> bool {
    TSC_DEADLINE.load(Ordering::Relaxed)
}

/// Arms this CPU's LAPIC timer to raise [`TIMER_VECTOR`] once, `ticks` TSC ticks from now.
/// Uses TSC-deadline mode when available; otherwise one-shot mode assuming a 1 GHz timer
/// clock (KVM's), converted with `tsc_khz`, which at worst fires late.
pub fn arm_timer(now: u64, ticks: u64, tsc_khz: u64) {
    if tsc_deadline_supported() {
        write(REG_LVT_TIMER, LVT_TSC_DEADLINE | u32::from(TIMER_VECTOR));
        wrmsr(MSR_TSC_DEADLINE, now.saturating_add(ticks.max(1)));
    } else {
        let ns = ticks.saturating_mul(1_000_000) / tsc_khz.max(1);
        write(REG_TIMER_DIVIDE, 0xB); // divide by 1
        write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
        write(REG_TIMER_INITIAL, ns.clamp(1, u64::from(u32::MAX)) as u32);
    }
}

/// Stops and masks this CPU's LAPIC timer.
pub fn disarm_timer() {
    if tsc_deadline_supported() {
        wrmsr(MSR_TSC_DEADLINE, 0);
    } else {
        write(REG_TIMER_INITIAL, 0);
    }
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
}
