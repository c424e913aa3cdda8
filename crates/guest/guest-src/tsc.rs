// SPDX-License-Identifier: Apache-2.0 OR MIT
//! TSC frequency, for the bring-up timeouts.
//!
//! Sources, first that works: the hypervisor timing leaf 0x40000010 (VMware convention, also
//! set by QEMU/KVM), KVM's pvclock scale (kvmclock MSR), CPUID 0x15 (crystal ratio), CPUID 0x16
//! (base MHz); else [`FALLBACK_KHZ`]. The fallback is deliberately high: a too-high frequency
//! only makes timeouts longer, a too-low one would give up on slow APs too early.

use crate::cpu::{cpuid, max_basic_leaf, pause, wrmsr};

/// Assumed TSC frequency when nothing tells us (4 GHz).
pub const FALLBACK_KHZ: u64 = 4_000_000;

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// CPUID 0x40000010.
    HypervisorLeaf,
    /// kvmclock (pvclock `tsc_to_system_mul`/`tsc_shift`).
    KvmClock,
    /// CPUID 0x15.
    Crystal,
    /// CPUID 0x16.
    BaseFrequency,
    /// [`FALLBACK_KHZ`].
    Assumed,
}

impl Source {
    /// Short name for diagnostics.
    pub fn name(self) -> &'static str {
        match self {
            Source::HypervisorLeaf => "cpuid40000010",
            Source::KvmClock => "kvmclock",
            Source::Crystal => "cpuid15",
            Source::BaseFrequency => "cpuid16",
            Source::Assumed => "assumed",
        }
    }
}

#[repr(C, align(64))]
struct PvClock([u32; 16]);

static mut PVCLOCK: PvClock = PvClock([0; 16]);

fn hypervisor_base() -> Option<(u32, [u8; 12])> {
    if cpuid(1, 0).ecx & (1 << 31) == 0 {
        return None;
    }
    let r = cpuid(0x4000_0000, 0);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    sig[8..12].copy_from_slice(&r.edx.to_le_bytes());
    Some((r.eax, sig))
}

fn kvmclock_khz(max: u32, sig: &[u8; 12]) -> Option<u64> {
    if sig != b"KVMKVMKVM\0\0\0" || max < 0x4000_0001 {
        return None;
    }
    if cpuid(0x4000_0001, 0).eax & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let area = core::ptr::addr_of_mut!(PVCLOCK) as *mut u32;
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, area as u64 | 1);
    let mut result = None;
    for _ in 0..1_000_000 {
        // SAFETY: `area` is our static, 64-byte aligned pvclock structure; the hypervisor
        // updates it (version odd while writing), we only read it.
        let (v1, mul, shift, v2) = unsafe {
            let v1 = area.read_volatile();
            let mul = area.add(6).read_volatile();
            let shift = (area.add(7).read_volatile() & 0xFF) as u8 as i8;
            let v2 = area.read_volatile();
            (v1, mul, shift, v2)
        };
        if v1 != 0 && v1 & 1 == 0 && v1 == v2 && mul != 0 {
            // ns = ((tsc << shift) * mul) >> 32  =>  kHz = 1e6 * 2^32 / (mul * 2^shift).
            // (u64 only: u128 division would call into compiler-builtins.)
            let num: u64 = 1_000_000u64 << 32;
            let khz = if shift >= 0 {
                (shift < 32)
                    .then(|| u64::from(mul) << shift)
                    .and_then(|d| num.checked_div(d))
            } else {
                num.checked_shl((-shift) as u32)
                    .filter(|n| n >> (-shift) as u32 == num)
                    .and_then(|n| n.checked_div(u64::from(mul)))
            };
            result = khz.filter(|k| *k > 0);
            break;
        }
        pause();
    }
    // Stop the hypervisor from writing into our memory.
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
    result
}

/// Determines the TSC frequency in kHz.
pub fn calibrate() -> (u64, Source) {
    if let Some((max, sig)) = hypervisor_base() {
        if max >= 0x4000_0010 {
            let khz = u64::from(cpuid(0x4000_0010, 0).eax);
            if khz != 0 {
                return (khz, Source::HypervisorLeaf);
            }
        }
        if let Some(khz) = kvmclock_khz(max, &sig) {
            return (khz, Source::KvmClock);
        }
    }
    let max = max_basic_leaf();
    if max >= 0x15 {
        let r = cpuid(0x15, 0);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            return (
                u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax) / 1000,
                Source::Crystal,
            );
        }
    }
    if max >= 0x16 {
        let mhz = u64::from(cpuid(0x16, 0).eax & 0xFFFF);
        if mhz != 0 {
            return (mhz * 1000, Source::BaseFrequency);
        }
    }
    (FALLBACK_KHZ, Source::Assumed)
}
