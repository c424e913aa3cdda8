// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The GDT (defined in `entry.rs`) and the per-CPU TSS that gives every IDT entry an IST stack.
//!
//! `core` is precompiled with the red zone, so an interrupt must never push onto the
//! interrupted stack: every IDT gate selects an IST stack, which makes the CPU switch stacks
//! unconditionally.

use crate::cpu::GDT_TSS_BASE;
use crate::percpu::{block, IST1_TOP, IST2_TOP, IST3_TOP, MAX_CPUS, TSS_OFFSET};
use core::arch::asm;

/// Size of the GDT: 4 fixed descriptors and one 16-byte TSS descriptor per CPU.
pub const GDT_BYTES: usize = 32 + 16 * MAX_CPUS;
/// Size of a 64-bit TSS.
const TSS_SIZE: usize = 104;

extern "C" {
    static mut vmkit_gdt: [u8; GDT_BYTES];
}

/// Builds this CPU's TSS in its per-CPU block, installs its descriptor and loads TR.
///
/// Called once per CPU with its own index, so no two CPUs write the same bytes. Only the
/// fields the CPU can use are written: IST1..IST3 and the I/O map base. The guest runs at
/// CPL 0 only and its IDT uses no other IST slot, so RSP0..2 and IST4..7 are never read (the
/// block is not zeroed: each store here is an emulated instruction on this host's KVM).
pub fn load_tss(cpu: usize) {
    install_tss(cpu, block(cpu));
}

/// [`load_tss`] for CPU `cpu` whose block is at `base` (== `percpu::block(cpu)`, which the
/// AP entry code already has in hand).
#[inline(always)]
pub fn install_tss(cpu: usize, base: u64) {
    if cpu >= MAX_CPUS {
        panic!("cpu index out of range");
    }
    let tss = base + TSS_OFFSET as u64;
    let limit = (TSS_SIZE - 1) as u64;
    let low = limit | ((base & 0xFF_FFFF) << 16) | (0x89 << 40) | (((base >> 24) & 0xFF) << 56);
    let high = base >> 32;
    let selector = GDT_TSS_BASE + 16 * cpu as u16;
    // SAFETY: the TSS lies in this CPU's own per-CPU block (RAM owned by the guest, mapped by
    // the identity map); IST1..3 sit at byte offsets 36, 44, 52 (unaligned in a packed
    // structure) and the I/O map base at 102. The descriptor slot belongs to this CPU index
    // only. `ltr` loads a valid, available 64-bit TSS descriptor.
    unsafe {
        ((tss + 36) as *mut u64).write_unaligned(base + IST1_TOP as u64);
        ((tss + 44) as *mut u64).write_unaligned(base + IST2_TOP as u64);
        ((tss + 52) as *mut u64).write_unaligned(base + IST3_TOP as u64);
        // I/O map base = TSS size: no I/O permission bitmap.
        ((tss + 102) as *mut u16).write_unaligned(TSS_SIZE as u16);
        let gdt = core::ptr::addr_of_mut!(vmkit_gdt) as *mut u8;
        let slot = gdt.add(selector as usize) as *mut u64;
        slot.write_volatile(low);
        slot.add(1).write_volatile(high);
        asm!("ltr {0:x}", in(reg) selector, options(nostack, preserves_flags));
    }
}
