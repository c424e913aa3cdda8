// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The IDT: 256 gates, every one on an IST stack (see `gdt.rs`), and the trap dispatcher.
//!
//! Exceptions (vectors 0..31) and unexpected interrupts print
//! `VMKIT-GUEST panic exception=<n> rip=<hex> err=<hex>` and exit with code 3.
//!
//! No handler returns with `iretq`: this host's KVM instruction emulator cannot execute it in
//! long mode. Interrupts are only enabled inside `percpu::wait_for_interrupt`; a
//! [`WAKE_VECTOR`] interrupt there is acknowledged and the wait resumes on the CPU's normal
//! stack (see `percpu.rs`); [`SPURIOUS_VECTOR`] resumes without EOI. Device vectors
//! (MSI-X, IOAPIC: `irq.rs`) are counted, acknowledged and resume the wait the same way.

use crate::cpu::GDT_KERNEL_CS;
use core::arch::asm;

/// Vector of the IPI that wakes a parked CPU (see `smp.rs`).
pub const WAKE_VECTOR: u8 = 0xF0;
/// LAPIC timer vector (the BSP's bring-up timeouts, see `smp.rs`).
pub const TIMER_VECTOR: u8 = 0xEF;
/// LAPIC spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

const IDT_ENTRIES: usize = 256;
/// Where `linker.ld` places the interrupt stubs (first thing in the image).
pub const ISR_STUBS_ADDR: u64 = 0x10_0000;

core::arch::global_asm!(
    r#"
    .section .text.isr, "ax"
    /* 256 stubs of 16 bytes each: push a zero error code where the CPU pushes none, push the
       vector, go to the common path. */
    .balign 16
    .global vmkit_isr_stubs
vmkit_isr_stubs:
    .set vmkit_vec, 0
    .rept 256
    .balign 16
    .if (vmkit_vec == 8) || ((vmkit_vec >= 10) && (vmkit_vec <= 14)) || (vmkit_vec == 17) || (vmkit_vec == 21) || (vmkit_vec == 29) || (vmkit_vec == 30)
    .else
    pushq $0
    .endif
    pushq $vmkit_vec
    jmp vmkit_isr_common
    .set vmkit_vec, vmkit_vec + 1
    .endr

    .text
    .balign 16
    /* No handler returns to the interrupted code (see the module docs), so no register is
       saved: the frame is what the CPU and the stub pushed, plus one slot that keeps the
       stack 16-byte aligned for the call, as the ABI wants. */
vmkit_isr_common:
    pushq %rax
    movq %rsp, %rdi
    cld
    call vmkit_trap
    ud2

    /* The IDT, complete at build time: the linker script places the stubs at {stubs}, so
       every gate's handler address is a constant (no run-time loop, which would be slow
       when this host's KVM emulates the guest). Interrupt gates, kernel CS, all on IST. */
    .section .data.idt, "aw"
    .balign 16
    .global vmkit_idt
vmkit_idt:
    .set vmkit_vec, 0
    .rept 256
    .set vmkit_h, {stubs} + 16 * vmkit_vec
    .if vmkit_vec == 2
    .set vmkit_ist, 2
    .elseif (vmkit_vec == 8) || (vmkit_vec == 18)
    .set vmkit_ist, 3
    .else
    .set vmkit_ist, 1
    .endif
    .quad (vmkit_h & 0xFFFF) | ({cs} << 16) | (vmkit_ist << 32) | (0x8E << 40) | (((vmkit_h >> 16) & 0xFFFF) << 48)
    .quad vmkit_h >> 32
    .set vmkit_vec, vmkit_vec + 1
    .endr

    /* Its pseudo-descriptor, so that loading it is a single `lidt`. */
    .balign 16
vmkit_idt_ptr:
    .word {idt_limit}
    .quad vmkit_idt
    .global vmkit_idt_ptr
"#,
    stubs = const ISR_STUBS_ADDR,
    cs = const GDT_KERNEL_CS,
    idt_limit = const IDT_ENTRIES * 16 - 1,
    options(att_syntax)
);

/// The interrupt frame as the common stub hands it over, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    /// Alignment slot pushed by the common stub (the interrupted %rax, unused).
    pub pad: u64,
    /// Vector number.
    pub vector: u64,
    /// Error code (0 where the CPU pushes none).
    pub error: u64,
    /// Interrupted RIP.
    pub rip: u64,
    /// Interrupted CS.
    pub cs: u64,
    /// Interrupted RFLAGS.
    pub rflags: u64,
    /// Interrupted RSP.
    pub rsp: u64,
    /// Interrupted SS.
    pub ss: u64,
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Loads the IDT on this CPU.
#[inline(always)]
pub fn load() {
    // SAFETY: `vmkit_idt_ptr` describes the IDT, complete static data built by the assembler.
    unsafe {
        asm!(
            "lidt [rip + vmkit_idt_ptr]",
            options(readonly, nostack, preserves_flags)
        )
    }
}

/// Loads an empty IDT (limit 0): the next exception triple-faults. Used by the exit path.
pub fn load_empty() {
    let ptr = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately makes every later exception a triple fault (machine reset).
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) }
}

#[no_mangle]
extern "C" fn vmkit_trap(frame: &TrapFrame) -> ! {
    let vector = (frame.vector & 0xFF) as u8;
    let frame_addr = frame as *const TrapFrame as u64;
    match vector {
        WAKE_VECTOR | TIMER_VECTOR => {
            crate::apic::eoi();
            crate::percpu::resume_wait(frame.rip, frame_addr);
        }
        SPURIOUS_VECTOR => crate::percpu::resume_wait(frame.rip, frame_addr),
        v if crate::irq::is_device_vector(v) => {
            crate::irq::handle(v, frame_addr);
            crate::percpu::resume_wait(frame.rip, frame_addr);
        }
        _ => {}
    }
    crate::fatal_exception(vector, frame.rip, frame.error)
}
