// SPDX-License-Identifier: Apache-2.0 OR MIT
//! CPU primitives: port I/O, MSRs, CPUID, TSC, control registers, and the architectural
//! constants shared with the assembly (selectors, control-register bits).

use core::arch::asm;

/// `vmkit_boot_proto` value for a PVH boot.
pub const BOOT_PROTO_PVH: u32 = 1;
/// `vmkit_boot_proto` value for a Linux 64-bit boot protocol boot.
pub const BOOT_PROTO_LINUX64: u32 = 2;

/// 64-bit kernel code selector.
pub const GDT_KERNEL_CS: u16 = 0x08;
/// Flat data selector.
pub const GDT_KERNEL_DS: u16 = 0x10;
/// 32-bit code selector (SIPI trampoline).
pub const GDT_CODE32: u16 = 0x18;
/// First TSS selector; CPU `i` uses `GDT_TSS_BASE + 16 * i`.
pub const GDT_TSS_BASE: u16 = 0x20;

/// CR0: PG | WP | NE | ET | MP | PE (caches on, x87 emulation off).
pub const CR0_LONG_MODE: u32 = 0x8001_0033;
/// CR4: PAE | OSFXSR | OSXMMEXCPT.
pub const CR4_BOOT: u32 = (1 << 5) | (1 << 9) | (1 << 10);
/// IA32_EFER.
pub const MSR_EFER: u32 = 0xC000_0080;
/// EFER.LME.
pub const EFER_LME: u32 = 1 << 8;

/// POST code port.
pub const POST_PORT: u16 = 0x80;

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("outb %al, %dx", in("dx") port, in("al") value, options(att_syntax, nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("inb %dx, %al", in("dx") port, out("al") v, options(att_syntax, nomem, nostack, preserves_flags))
    }
    v
}

/// Writes a 32-bit value to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("outl %eax, %dx", in("dx") port, in("eax") value, options(att_syntax, nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit value from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("inl %dx, %eax", in("dx") port, out("eax") v, options(att_syntax, nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a `T` (u8/u16/u32/u64) from device memory at physical address `addr` (one access).
///
/// Only for addresses the identity map covers (below 4 GiB) that belong to a device the
/// caller found (PCI BAR, ECAM, virtio-mmio, IOAPIC).
#[inline(always)]
pub fn mmio_read<T: Copy>(addr: u64) -> T {
    // SAFETY: see above; device registers have no Rust-visible memory effects.
    unsafe { (addr as *const T).read_volatile() }
}

/// Writes a `T` (u8/u16/u32/u64) to device memory at physical address `addr` (one access).
#[inline(always)]
pub fn mmio_write<T: Copy>(addr: u64, value: T) {
    // SAFETY: see [`mmio_read`].
    unsafe { (addr as *mut T).write_volatile(value) }
}

/// Writes a POST progress code to port 0x80.
#[inline(always)]
pub fn post(code: u8) {
    outb(POST_PORT, code);
}

/// Reads an MSR.
#[inline(always)]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called for MSRs whose presence was checked (CPUID) or that are architectural.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes an MSR.
#[inline(always)]
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only called for MSRs whose presence was checked (CPUID) or that are architectural.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// Result of one CPUID query.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// Executes CPUID for `leaf`/`subleaf`.
#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    // SAFETY: CPUID is always available in long mode. (The intrinsic is safe on newer
    // toolchains, hence the allow.)
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Highest basic CPUID leaf.
pub fn max_basic_leaf() -> u32 {
    cpuid(0, 0).eax
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Spin-loop hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Disables interrupts.
#[inline(always)]
pub fn cli() {
    // SAFETY: clearing IF only delays interrupt delivery.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Halts with interrupts disabled, forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: halting with IF=0 only stops this CPU.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}
