// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Per-CPU blocks: each CPU owns one block of [`BLOCK_SIZE`] bytes holding its TSS, its
//! interrupt stacks (IST) and its main stack.
//!
//! Layout of a block (offsets):
//! - `0x0000..0x0080`: TSS
//! - `0x0080`: saved stack pointer of a CPU waiting in [`wait_for_interrupt`]
//! - `0x1000..0x2000`: IST1 (exceptions and interrupts)
//! - `0x2000..0x3000`: IST2 (NMI)
//! - `0x3000..0x4000`: IST3 (#DF, #MC)
//! - `0x4000..0x8000`: main stack (APs; the BSP has a larger boot stack of its own)
//!
//! The BSP's block is static (in the image, not zeroed); AP blocks are carved from RAM right
//! after the image, one per expected AP, once the memory map is known (see `smp.rs`). Stack
//! memory is never zeroed, so only the pages actually used get touched.

use core::sync::atomic::{AtomicU64, Ordering};

/// Most CPUs the guest supports (CPU indices `0..MAX_CPUS`, the BSP is index 0).
pub const MAX_CPUS: usize = 1024;
/// log2 of the per-CPU block size.
pub const BLOCK_SHIFT: u32 = 15;
/// Per-CPU block size.
pub const BLOCK_SIZE: usize = 1 << BLOCK_SHIFT;
/// Offset of the TSS in a block.
pub const TSS_OFFSET: usize = 0;
/// Offset of the stack pointer saved by [`wait_for_interrupt`].
pub const WAIT_RSP_OFFSET: usize = 0x80;
/// Top of IST1 (exceptions, interrupts).
pub const IST1_TOP: usize = 0x2000;
/// Top of IST2 (NMI).
pub const IST2_TOP: usize = 0x3000;
/// Top of IST3 (#DF, #MC).
pub const IST3_TOP: usize = 0x4000;

core::arch::global_asm!(
    r#"
    .section .stacks, "aw", @nobits
    .balign {size}
    .global vmkit_bsp_block
vmkit_bsp_block:
    .skip {size}

    /* void vmkit_wait_irq(u64 block): save the callee-saved registers and the stack pointer
       in the per-CPU block, then `sti; hlt`. The interrupt handler does not return with
       iretq (this host's KVM emulator cannot execute it in long mode): it acknowledges the
       interrupt and jumps to vmkit_wait_resume, which returns from vmkit_wait_irq with
       interrupts disabled. */
    .text
    .balign 16
    .global vmkit_wait_irq
vmkit_wait_irq:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, {wait_rsp}(%rdi)
    sti
    .global vmkit_wait_hlt
vmkit_wait_hlt:
    hlt
    cli
    .global vmkit_wait_resume
vmkit_wait_resume:
    movq {wait_rsp}(%rdi), %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret
"#,
    size = const BLOCK_SIZE,
    wait_rsp = const WAIT_RSP_OFFSET,
    options(att_syntax)
);

extern "C" {
    static vmkit_bsp_block: u8;
    static vmkit_wait_hlt: u8;
    fn vmkit_wait_irq(block: u64);
    fn vmkit_wait_resume(block: u64) -> !;
}

/// Enables interrupts and halts until one interrupt has been handled; returns with
/// interrupts disabled. `cpu` must be the calling CPU's index.
pub fn wait_for_interrupt(cpu: usize) {
    // SAFETY: `block(cpu)` is this CPU's own block; the IDT and TSS are loaded, and the handler
    // resumes through `vmkit_wait_resume` with the stack pointer saved here.
    unsafe { vmkit_wait_irq(block(cpu)) }
}

/// If `rip` (the interrupted instruction pointer) is the `hlt` of [`wait_for_interrupt`],
/// resumes that wait on the CPU whose IST stack holds `frame_addr`. Returns otherwise.
pub fn resume_wait(rip: u64, frame_addr: u64) {
    let hlt = core::ptr::addr_of!(vmkit_wait_hlt) as u64;
    if rip == hlt || rip == hlt + 1 {
        let block = frame_addr & !(BLOCK_SIZE as u64 - 1);
        // SAFETY: the frame lies on an IST stack inside the interrupted CPU's own block
        // (blocks are BLOCK_SIZE-aligned), where `vmkit_wait_irq` saved a valid stack pointer.
        unsafe { vmkit_wait_resume(block) }
    }
}

/// Base of the AP blocks: AP with CPU index `i >= 1` owns `[base + (i-1)*BLOCK_SIZE, +BLOCK_SIZE)`
/// and takes `base + i*BLOCK_SIZE` as its initial stack pointer (computed in the AP entry).
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static vmkit_ap_area: AtomicU64 = AtomicU64::new(0);

/// Physical (== virtual) address of CPU `cpu`'s block.
pub fn block(cpu: usize) -> u64 {
    if cpu == 0 {
        core::ptr::addr_of!(vmkit_bsp_block) as u64
    } else {
        vmkit_ap_area.load(Ordering::Relaxed) + ((cpu as u64 - 1) << BLOCK_SHIFT)
    }
}

/// CPU index of the CPU whose per-CPU block holds `addr` (an address on one of its IST
/// stacks, e.g. an interrupt frame), or `None` if it lies in no block.
pub fn cpu_of_addr(addr: u64) -> Option<usize> {
    let block_of = addr & !(BLOCK_SIZE as u64 - 1);
    if block_of == block(0) {
        return Some(0);
    }
    let area = vmkit_ap_area.load(Ordering::Relaxed);
    if area == 0 || block_of < area {
        return None;
    }
    let cpu = ((block_of - area) >> BLOCK_SHIFT) as usize + 1;
    (cpu < MAX_CPUS).then_some(cpu)
}
