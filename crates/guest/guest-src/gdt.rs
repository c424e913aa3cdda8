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
/// Called once per CPU with its own index, so no two CPUs write the same bytes.
pub fn load_tss(cpu: usize) {
    assert!(cpu < MAX_CPUS, "cpu index {cpu} out of range");
    let base = block(cpu);
    let tss = (base + TSS_OFFSET as u64) as *mut u64;
    // The TSS as 13 quadwords (the block is not zeroed, so every byte is written): IST1..3 at
    // byte offsets 36, 44, 52 straddle quadwords, the I/O map base (= size: no bitmap) is the
    // top half of the last word.
    let ist = [
        base + IST1_TOP as u64,
        base + IST2_TOP as u64,
        base + IST3_TOP as u64,
    ];
    let mut words = [0u64; TSS_SIZE / 8];
    for (i, top) in ist.iter().enumerate() {
        let byte = 36 + 8 * i; // 4 mod 8
        words[byte / 8] |= top << 32;
        words[byte / 8 + 1] |= top >> 32;
    }
    words[12] = (TSS_SIZE as u64) << 48;
    let limit = (TSS_SIZE - 1) as u64;
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    let high = base >> 32;
    let selector = GDT_TSS_BASE + 16 * cpu as u16;
    // SAFETY: `tss` points into this CPU's own per-CPU block (RAM owned by the guest, mapped
    // by the identity map); the descriptor slot belongs to this CPU index only. `ltr` loads a
    // valid, available 64-bit TSS descriptor.
    unsafe {
        for (i, w) in words.iter().enumerate() {
            tss.add(i).write(*w);
        }
        let gdt = core::ptr::addr_of_mut!(vmkit_gdt) as *mut u8;
        let slot = gdt.add(selector as usize) as *mut u64;
        slot.write_volatile(low);
        slot.add(1).write_volatile(high);
        asm!("ltr {0:x}", in(reg) selector, options(nostack, preserves_flags));
    }
}
