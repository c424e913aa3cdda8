// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Local APIC set-up through `KVM_GET_LAPIC` / `KVM_SET_LAPIC`.
//!
//! With an in-kernel irqchip every vCPU gets LINT0 = ExtINT (the legacy PIC's output) and
//! LINT1 = NMI, as on a PC ([`configure_lint`]). The register helpers read and write 32-bit
//! registers in the 1 KiB `kvm_lapic_state` blob by offset.
//!
//! Whether the guest switches to x2APIC mode is its own business; the APIC base MSR keeps
//! KVM's reset value, which is the architectural one ([`default_apic_base`]): base
//! 0xFEE0_0000, globally enabled, BSP flag on vCPU 0 only.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Size of the register page KVM exchanges.
pub const LAPIC_STATE_SIZE: usize = 1024;

/// APIC ID register.
pub const APIC_ID: usize = 0x20;
/// Version register.
pub const APIC_LVR: usize = 0x30;
/// Task priority register.
pub const APIC_TASKPRI: usize = 0x80;
/// Spurious interrupt vector register.
pub const APIC_SPIV: usize = 0xf0;
/// LVT timer.
pub const APIC_LVTT: usize = 0x320;
/// LVT LINT0.
pub const APIC_LVT0: usize = 0x350;
/// LVT LINT1.
pub const APIC_LVT1: usize = 0x360;

/// Delivery mode field of an LVT entry (bits 10:8).
pub const DELIVERY_MODE_MASK: u32 = 0x700;
/// Delivery mode fixed.
pub const DELIVERY_MODE_FIXED: u32 = 0x000;
/// Delivery mode NMI.
pub const DELIVERY_MODE_NMI: u32 = 0x400;
/// Delivery mode ExtINT.
pub const DELIVERY_MODE_EXTINT: u32 = 0x700;
/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;

/// Architectural APIC base address.
pub const APIC_DEFAULT_PHYS_BASE: u64 = 0xfee0_0000;
/// `IA32_APIC_BASE` bit 8: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// `IA32_APIC_BASE` bit 10: x2APIC mode.
pub const APIC_BASE_X2APIC: u64 = 1 << 10;
/// `IA32_APIC_BASE` bit 11: APIC globally enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

/// Errors from LAPIC access.
#[derive(Debug, thiserror::Error)]
pub enum LapicError {
    /// A register offset outside the page or not 16-byte aligned.
    #[error("LAPIC register offset {0:#x} is not a 16-byte aligned offset inside the 1 KiB register page")]
    BadOffset(usize),
    /// `KVM_GET_LAPIC` failed (no in-kernel irqchip?).
    #[error("KVM_GET_LAPIC failed (does the VM have an in-kernel irqchip?): {0}")]
    Get(vmm_sys_util::errno::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("KVM_SET_LAPIC failed: {0}")]
    Set(vmm_sys_util::errno::Error),
}

fn check(offset: usize) -> Result<(), LapicError> {
    if offset % 16 != 0 || offset + 4 > LAPIC_STATE_SIZE {
        return Err(LapicError::BadOffset(offset));
    }
    Ok(())
}

/// Reads the 32-bit register at `offset`.
pub fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> Result<u32, LapicError> {
    check(offset)?;
    let mut b = [0u8; 4];
    for (dst, src) in b.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *dst = *src as u8;
    }
    Ok(u32::from_le_bytes(b))
}

/// Writes the 32-bit register at `offset`.
pub fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) -> Result<(), LapicError> {
    check(offset)?;
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as std::os::raw::c_char;
    }
    Ok(())
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in `lapic` (pure).
pub fn set_lint(lapic: &mut kvm_lapic_state) -> Result<(), LapicError> {
    let lint0 = get_reg(lapic, APIC_LVT0)?;
    set_reg(
        lapic,
        APIC_LVT0,
        (lint0 & !DELIVERY_MODE_MASK) | DELIVERY_MODE_EXTINT,
    )?;
    let lint1 = get_reg(lapic, APIC_LVT1)?;
    set_reg(
        lapic,
        APIC_LVT1,
        (lint1 & !DELIVERY_MODE_MASK) | DELIVERY_MODE_NMI,
    )?;
    Ok(())
}

/// Programs LINT0 = ExtINT and LINT1 = NMI in the vCPU's in-kernel LAPIC.
pub fn configure_lint(vcpu: &VcpuFd) -> Result<(), LapicError> {
    let mut lapic = vcpu.get_lapic().map_err(LapicError::Get)?;
    set_lint(&mut lapic)?;
    vcpu.set_lapic(&lapic).map_err(LapicError::Set)
}

/// The architectural reset value of `IA32_APIC_BASE`: xAPIC mode, enabled, BSP flag on the
/// bootstrap processor.
pub fn default_apic_base(bsp: bool) -> u64 {
    APIC_DEFAULT_PHYS_BASE | APIC_BASE_ENABLE | if bsp { APIC_BASE_BSP } else { 0 }
}

/// The 1 KiB register page as bytes.
pub fn to_bytes(lapic: &kvm_lapic_state) -> Vec<u8> {
    lapic.regs.iter().map(|&b| b as u8).collect()
}

/// A register page from exactly [`LAPIC_STATE_SIZE`] bytes.
pub fn from_bytes(bytes: &[u8]) -> Option<kvm_lapic_state> {
    if bytes.len() != LAPIC_STATE_SIZE {
        return None;
    }
    let mut lapic = kvm_lapic_state::default();
    for (dst, src) in lapic.regs.iter_mut().zip(bytes) {
        *dst = *src as std::os::raw::c_char;
    }
    Some(lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_round_trip_and_bounds() {
        let mut l = kvm_lapic_state::default();
        set_reg(&mut l, APIC_SPIV, 0x1ff).unwrap();
        assert_eq!(get_reg(&l, APIC_SPIV).unwrap(), 0x1ff);
        assert_eq!(l.regs[APIC_SPIV] as u8, 0xff);
        assert_eq!(l.regs[APIC_SPIV + 1] as u8, 0x01);
        set_reg(&mut l, 0x3f0, 0xdead_beef).unwrap();
        assert_eq!(get_reg(&l, 0x3f0).unwrap(), 0xdead_beef);
        assert!(get_reg(&l, 0x400).is_err());
        assert!(get_reg(&l, 0x22).is_err());
        assert!(set_reg(&mut l, usize::MAX - 15, 0).is_err());
    }

    #[test]
    fn lint_modes() {
        let mut l = kvm_lapic_state::default();
        set_reg(&mut l, APIC_LVT0, LVT_MASKED | 0x30).unwrap();
        set_reg(&mut l, APIC_LVT1, LVT_MASKED).unwrap();
        set_lint(&mut l).unwrap();
        assert_eq!(
            get_reg(&l, APIC_LVT0).unwrap(),
            LVT_MASKED | 0x30 | DELIVERY_MODE_EXTINT
        );
        assert_eq!(
            get_reg(&l, APIC_LVT1).unwrap(),
            LVT_MASKED | DELIVERY_MODE_NMI
        );
    }

    #[test]
    fn apic_base_defaults() {
        assert_eq!(default_apic_base(true), 0xfee0_0900);
        assert_eq!(default_apic_base(false), 0xfee0_0800);
    }

    #[test]
    fn bytes_round_trip() {
        let mut l = kvm_lapic_state::default();
        set_reg(&mut l, APIC_ID, 0x0500_0000).unwrap();
        let b = to_bytes(&l);
        assert_eq!(b.len(), LAPIC_STATE_SIZE);
        let back = from_bytes(&b).unwrap();
        assert_eq!(get_reg(&back, APIC_ID).unwrap(), 0x0500_0000);
        assert!(from_bytes(&b[1..]).is_none());
    }
}
