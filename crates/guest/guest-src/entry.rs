// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Boot entry points, the early GDT and the identity page tables.
//!
//! Two ways in:
//! - PVH (`vmkit_pvh_start`, announced by the `XEN_ELFNOTE_PHYS32_ENTRY` note): 32-bit protected
//!   mode, paging off, `%ebx` = physical address of `hvm_start_info`.
//! - Linux 64-bit boot protocol (`vmkit_linux64_start`, the ELF entry point): long mode on the
//!   VMM's identity map, `%rsi` = physical address of `boot_params`.
//!
//! Both write POST code 0x10 first, note the TSC, switch to our own GDT and page tables
//! (identity map of the first 4 GiB with 2 MiB pages, the top GiB uncached for the
//! LAPIC/IOAPIC/PCI MMIO), enable SSE (the precompiled `core` uses it), take the BSP stack and
//! call `vmkit_bsp_main(proto, info)`. There is no `.bss` to clear: zero-initialised statics
//! are loaded with the image (see `linker.ld`).

use crate::cpu::{
    BOOT_PROTO_LINUX64, BOOT_PROTO_PVH, CR0_LONG_MODE, CR4_BOOT, EFER_LME, GDT_CODE32,
    GDT_KERNEL_CS, GDT_KERNEL_DS, MSR_EFER,
};
use crate::gdt::GDT_BYTES;

/// Size of the BSP's boot stack (in `.stacks`, not zeroed).
pub const BSP_STACK_SIZE: usize = 64 * 1024;

core::arch::global_asm!(
    r#"
    /* ---------------------------------------------------------------- PVH ELF note */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz */
    .long 4                         /* descsz */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long vmkit_pvh_start

    /* ---------------------------------------------------------------- boot data */
    .section .data.boot, "aw"
    .balign 8
    /* TSC at the first instruction (for the vmkit.debug=1 phase timings). */
    .global vmkit_entry_tsc
vmkit_entry_tsc:
    .quad 0

    /* GDT: null, 64-bit code, data, 32-bit code, then one 16-byte TSS descriptor per CPU
       (filled in at run time). Accessed bits preset so the CPU never writes descriptors. */
    .section .data.gdt, "aw"
    .balign 16
    .global vmkit_gdt
vmkit_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cf9b000000ffff
    .fill ({gdt_bytes} - 32), 1, 0
    .balign 16
    .global vmkit_gdt_ptr
vmkit_gdt_ptr:
    .word {gdt_bytes} - 1
    .quad vmkit_gdt

    /* Identity page tables: PML4 -> one PDPT -> four PDs of 2 MiB pages (0..4 GiB).
       The last GiB (0xC000_0000..) is mapped with PCD|PWT: it holds the LAPIC, IOAPIC and
       the 32-bit PCI hole. */
    .section .data.pagetables, "aw"
    .balign 4096
    .global vmkit_pml4
vmkit_pml4:
    .quad vmkit_pdpt + 0x3
    .fill 511, 8, 0
    .global vmkit_pdpt
vmkit_pdpt:
    .quad vmkit_pd + 0x0003
    .quad vmkit_pd + 0x1003
    .quad vmkit_pd + 0x2003
    .quad vmkit_pd + 0x3003
    .fill 508, 8, 0
    .global vmkit_pd
vmkit_pd:
    .set vmkit_pg, 0
    .rept 1536
    .quad (vmkit_pg << 21) | 0x83
    .set vmkit_pg, vmkit_pg + 1
    .endr
    .rept 512
    .quad (vmkit_pg << 21) | 0x9b
    .set vmkit_pg, vmkit_pg + 1
    .endr

    /* ---------------------------------------------------------------- stacks */
    .section .stacks, "aw", @nobits
    .balign 4096
vmkit_bsp_stack:
    .skip {bsp_stack}
    .global vmkit_bsp_stack_top
vmkit_bsp_stack_top:

    /* ---------------------------------------------------------------- PVH entry */
    /* Both entries keep (protocol, boot information address) in %edi/%rsi, the arguments
       of vmkit_bsp_main, and touch as little as possible: this host's KVM emulates every
       guest instruction (~0.5 us each). */
    .section .text.entry, "ax"
    .code32
    .global vmkit_pvh_start
vmkit_pvh_start:
    movb $0x10, %al
    outb %al, $0x80
    rdtsc
    movl %eax, vmkit_entry_tsc
    movl %edx, vmkit_entry_tsc + 4
    cli
    cld
    movl %ebx, %esi
    movl ${proto_pvh}, %edi
    lgdt vmkit_gdt_ptr
    movl %cr4, %eax
    orl ${cr4}, %eax
    movl %eax, %cr4
    movl $vmkit_pml4, %eax
    movl %eax, %cr3
    movl ${efer}, %ecx
    rdmsr
    orl ${lme}, %eax
    wrmsr
    movl ${cr0}, %eax
    movl %eax, %cr0
    ljmpl ${cs}, $vmkit_pvh64

    /* ---------------------------------------------------------------- Linux64 entry */
    .code64
    .balign 16
    .global vmkit_linux64_start
vmkit_linux64_start:
    movb $0x10, %al
    outb %al, $0x80
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, vmkit_entry_tsc(%rip)
    cli
    cld
    movl ${proto_linux}, %edi
    lgdt vmkit_gdt_ptr(%rip)
    movq %cr4, %rax
    orq ${cr4}, %rax
    movq %rax, %cr4
    leaq vmkit_pml4(%rip), %rax
    movq %rax, %cr3
    movl ${cr0}, %eax
    movq %rax, %cr0
    leaq vmkit_bsp_stack_top(%rip), %rsp
    pushq ${cs}
    leaq vmkit_common64(%rip), %rax
    pushq %rax
    lretq

    /* ---------------------------------------------------------------- common 64-bit */
    /* Nothing to zero: zero-initialised statics are part of the loaded image (linker.ld). */
    .balign 16
vmkit_pvh64:
    /* Coming from 32-bit code, the upper half of %rsi is undefined. */
    movl %esi, %esi
vmkit_common64:
    movl ${ds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    leaq vmkit_bsp_stack_top(%rip), %rsp
    call vmkit_bsp_main
1:  cli
    hlt
    jmp 1b

    /* ---------------------------------------------------------------- mem* for core */
    /* Quadword string operations for the bulk: this host's KVM emulates guest code, one
       string-instruction iteration at a time, so moving 8 bytes per iteration matters. */
    .text
    .balign 16
    .global memcpy
memcpy:
    movq %rdi, %rax
    movq %rdx, %rcx
    shrq $3, %rcx
    rep movsq
    movq %rdx, %rcx
    andq $7, %rcx
    rep movsb
    ret

    .balign 16
    .global memmove
    /* Overlapping with the destination above the source: backwards, the odd bytes at the
       end first, then quadwords (each read before it is written, highest first). */
memmove:
    movq %rdi, %rax
    movq %rdx, %rcx
    cmpq %rsi, %rdi
    jbe 2f
    leaq -1(%rsi, %rdx), %rsi
    leaq -1(%rdi, %rdx), %rdi
    andq $7, %rcx
    std
    rep movsb
    subq $7, %rsi
    subq $7, %rdi
    movq %rdx, %rcx
    shrq $3, %rcx
    rep movsq
    cld
    ret
2:  shrq $3, %rcx
    rep movsq
    movq %rdx, %rcx
    andq $7, %rcx
    rep movsb
    ret

    .balign 16
    .global memset
memset:
    movq %rdi, %r8
    movzbl %sil, %eax
    movabsq $0x0101010101010101, %r9
    imulq %r9, %rax
    movq %rdx, %rcx
    shrq $3, %rcx
    rep stosq
    movq %rdx, %rcx
    andq $7, %rcx
    rep stosb
    movq %r8, %rax
    ret

    .balign 16
    .global memcmp
    .global bcmp
    /* Eight bytes per step while they are equal, then bytewise to find the difference. */
memcmp:
bcmp:
    xorl %eax, %eax
3:  cmpq $8, %rdx
    jb 5f
    movq (%rdi), %rcx
    cmpq (%rsi), %rcx
    jne 6f
    addq $8, %rdi
    addq $8, %rsi
    subq $8, %rdx
    jmp 3b
5:  testq %rdx, %rdx
    jz 7f
6:  movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    subl %ecx, %eax
    jnz 7f
    incq %rdi
    incq %rsi
    decq %rdx
    jnz 6b
7:  ret
"#,
    gdt_bytes = const GDT_BYTES,
    bsp_stack = const BSP_STACK_SIZE,
    proto_pvh = const BOOT_PROTO_PVH,
    proto_linux = const BOOT_PROTO_LINUX64,
    cr4 = const CR4_BOOT,
    cr0 = const CR0_LONG_MODE,
    efer = const MSR_EFER,
    lme = const EFER_LME,
    cs = const GDT_KERNEL_CS,
    ds = const GDT_KERNEL_DS,
    options(att_syntax)
);

extern "C" {
    /// TSC value at the first instruction of either entry point.
    static vmkit_entry_tsc: u64;
}

/// TSC value read by the first instructions of the entry point.
pub fn entry_tsc() -> u64 {
    // SAFETY: written once by the entry code before any Rust code runs, read-only afterwards.
    unsafe { core::ptr::addr_of!(vmkit_entry_tsc).read_volatile() }
}

// The 32-bit code selector is only used by the SIPI trampoline; keep the GDT layout in one
// place (cpu.rs) and make sure it matches the literal descriptors above.
const _: () = assert!(GDT_KERNEL_CS == 0x08 && GDT_KERNEL_DS == 0x10 && GDT_CODE32 == 0x18);
