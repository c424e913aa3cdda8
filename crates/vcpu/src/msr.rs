// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Model-specific registers: the boot set, and the list saved with the vCPU state.
//!
//! [`boot_msrs`] is what every vCPU gets before it first runs (the values a firmware or the
//! Linux boot protocol expect: SYSENTER/SYSCALL MSRs cleared, TSC 0, fast strings on, MTRRs
//! enabled with write-back as the default type).
//!
//! The state list starts from `KVM_GET_MSR_INDEX_LIST` ([`state_msr_candidates`]), minus the
//! MSRs that must never be written back ([`NEVER_RESTORE`], notably `IA32_ARCH_CAPABILITIES`,
//! which this project's host KVM refuses to set), and is then narrowed per vCPU by
//! [`probe_state_msrs`] to the ones that actually read back and write back.

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::VcpuFd;

/// MSR indices used by this crate.
pub mod index {
    /// Time stamp counter.
    pub const IA32_TSC: u32 = 0x10;
    /// Local APIC base (set through `kvm_sregs::apic_base`, not through `KVM_SET_MSRS`).
    pub const IA32_APIC_BASE: u32 = 0x1b;
    /// Read-only CPU vulnerability enumeration; never written.
    pub const IA32_ARCH_CAPABILITIES: u32 = 0x10a;
    /// SYSENTER code segment.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// SYSENTER stack pointer.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER entry point.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// Miscellaneous enables (bit 0: fast strings).
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// Default memory type and MTRR enable.
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    /// TSC-deadline timer target.
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    /// Extended feature enables (set through `kvm_sregs::efer`).
    pub const IA32_EFER: u32 = 0xc000_0080;
    /// SYSCALL segment selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// 64-bit SYSCALL entry point.
    pub const LSTAR: u32 = 0xc000_0082;
    /// Compatibility-mode SYSCALL entry point.
    pub const CSTAR: u32 = 0xc000_0083;
    /// RFLAGS mask applied by SYSCALL.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// Base swapped in by SWAPGS.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// `IA32_MISC_ENABLE` bit 0: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE` bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_TYPE_WRBACK: u64 = 6;

/// MSRs never put into a saved state nor written on restore.
///
/// `IA32_ARCH_CAPABILITIES` is a read-only feature MSR whose guest value KVM derives from
/// the VM; setting it fails on this project's host KVM (nested `kvm_pvm`).
pub const NEVER_RESTORE: &[u32] = &[index::IA32_ARCH_CAPABILITIES];

/// Errors from reading and writing MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    IndexList(vmm_sys_util::errno::Error),
    /// `KVM_GET_MSRS` failed as a whole.
    #[error("KVM_GET_MSRS failed: {0}")]
    Get(vmm_sys_util::errno::Error),
    /// `KVM_SET_MSRS` failed as a whole.
    #[error("KVM_SET_MSRS failed: {0}")]
    Set(vmm_sys_util::errno::Error),
    /// KVM read only part of a batch: the MSR at the stop position is not readable.
    #[error("KVM_GET_MSRS could not read MSR {0:#x}")]
    Unreadable(u32),
    /// KVM wrote only part of a batch: the MSR at the stop position was refused.
    #[error("KVM_SET_MSRS refused MSR {index:#x} (value {value:#x})")]
    Refused {
        /// The refused MSR.
        index: u32,
        /// The value that was refused.
        value: u64,
    },
    /// The FAM wrapper could not be built.
    #[error("cannot build the kvm_msrs structure: {0}")]
    Fam(String),
}

/// An MSR entry with `data`.
pub fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSR values every vCPU gets before it first runs.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    use index::*;
    vec![
        entry(IA32_SYSENTER_CS, 0),
        entry(IA32_SYSENTER_ESP, 0),
        entry(IA32_SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(CSTAR, 0),
        entry(KERNEL_GS_BASE, 0),
        entry(SYSCALL_MASK, 0),
        entry(LSTAR, 0),
        entry(IA32_TSC, 0),
        entry(IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(IA32_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
}

/// The MSRs KVM says are worth saving (`KVM_GET_MSR_INDEX_LIST`), minus [`NEVER_RESTORE`].
pub fn state_msr_candidates(kvm: &kvm_ioctls::Kvm) -> Result<Vec<u32>, MsrError> {
    let list = kvm.get_msr_index_list().map_err(MsrError::IndexList)?;
    Ok(filter_candidates(list.as_slice()))
}

/// `indices` without [`NEVER_RESTORE`] and without duplicates, in order (pure).
pub fn filter_candidates(indices: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::with_capacity(indices.len());
    for &i in indices {
        if !NEVER_RESTORE.contains(&i) && !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn fam(entries: &[kvm_msr_entry]) -> Result<Msrs, MsrError> {
    Msrs::from_entries(entries).map_err(|e| MsrError::Fam(format!("{e:?}")))
}

/// Reads the MSRs in `indices`, skipping those KVM cannot read. Returns the readable ones
/// with their values, in order.
pub fn read_available(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, MsrError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let chunk_len = rest.len().min(KVM_MAX_MSR_ENTRIES);
        let chunk: Vec<kvm_msr_entry> = rest[..chunk_len].iter().map(|&i| entry(i, 0)).collect();
        let mut msrs = fam(&chunk)?;
        let n = vcpu.get_msrs(&mut msrs).map_err(MsrError::Get)?;
        let n = n.min(chunk_len);
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: skip that one and go on.
        let consumed = if n < chunk_len { n + 1 } else { n };
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// Reads exactly the MSRs in `indices`; an unreadable one is an error naming it.
pub fn read_all(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, MsrError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk.iter().map(|&i| entry(i, 0)).collect();
        let mut msrs = fam(&entries)?;
        let n = vcpu.get_msrs(&mut msrs).map_err(MsrError::Get)?;
        if n < chunk.len() {
            return Err(MsrError::Unreadable(chunk[n]));
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

/// Writes all `entries`; a refused one is an error naming it.
pub fn write_all(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), MsrError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = fam(chunk)?;
        let n = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
        if n < chunk.len() {
            let refused = chunk[n];
            return Err(MsrError::Refused {
                index: refused.index,
                value: refused.data,
            });
        }
    }
    Ok(())
}

/// Narrows `candidates` to the MSRs of `vcpu` that read back and accept their own value
/// back: the list [`crate::Vcpu::save_state`] saves.
///
/// Meant for a vCPU that has its CPUID set but has not run yet (writing a value back is then
/// harmless; the boot MSRs are set afterwards). The TSC is kept without a write probe.
pub fn probe_state_msrs(vcpu: &VcpuFd, candidates: &[u32]) -> Result<Vec<u32>, MsrError> {
    let readable = read_available(vcpu, candidates)?;
    let mut keep = Vec::with_capacity(readable.len());
    let mut rest: &[kvm_msr_entry] = &readable;
    while !rest.is_empty() {
        // Entries that must not be probed by writing are accepted as they are.
        if rest[0].index == index::IA32_TSC {
            keep.push(rest[0].index);
            rest = &rest[1..];
            continue;
        }
        let len = rest
            .iter()
            .take(KVM_MAX_MSR_ENTRIES)
            .position(|e| e.index == index::IA32_TSC)
            .unwrap_or(rest.len().min(KVM_MAX_MSR_ENTRIES));
        let msrs = fam(&rest[..len])?;
        let n = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?.min(len);
        keep.extend(rest[..n].iter().map(|e| e.index));
        let consumed = if n < len { n + 1 } else { n };
        if n < len {
            log::debug!(
                "MSR {:#x} reads but does not write back; left out of the vCPU state",
                rest[n].index
            );
        }
        rest = &rest[consumed..];
    }
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_set_has_the_documented_values() {
        let m = boot_msrs();
        let get = |i: u32| m.iter().find(|e| e.index == i).map(|e| e.data);
        use index::*;
        for i in [
            IA32_SYSENTER_CS,
            IA32_SYSENTER_ESP,
            IA32_SYSENTER_EIP,
            STAR,
            LSTAR,
            CSTAR,
            SYSCALL_MASK,
            KERNEL_GS_BASE,
            IA32_TSC,
        ] {
            assert_eq!(get(i), Some(0), "{i:#x}");
        }
        assert_eq!(get(IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(IA32_MTRR_DEF_TYPE), Some(0x806));
        assert!(get(IA32_ARCH_CAPABILITIES).is_none());
    }

    #[test]
    fn candidates_never_include_arch_capabilities() {
        let f = filter_candidates(&[0x10, 0x10a, 0x174, 0x10, 0x6e0]);
        assert_eq!(f, vec![0x10, 0x174, 0x6e0]);
    }
}
