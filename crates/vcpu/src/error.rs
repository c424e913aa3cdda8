// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The crate's error type.

use crate::cpuid::CpuidError;
use crate::lapic::LapicError;
use crate::msr::MsrError;
use crate::regs::RegsError;

/// Errors from creating, configuring, saving and restoring vCPUs and from the vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// CPUID policy error.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// MSR error.
    #[error(transparent)]
    Msr(#[from] MsrError),
    /// Boot register error.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// LAPIC error.
    #[error(transparent)]
    Lapic(#[from] LapicError),
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: {ioctl} failed: {source}")]
    Ioctl {
        /// vCPU index.
        index: u32,
        /// The ioctl.
        ioctl: &'static str,
        /// The error.
        source: vmm_sys_util::errno::Error,
    },
    /// `KVM_CREATE_VCPU` failed.
    #[error("KVM_CREATE_VCPU for vCPU {index} (APIC ID {apic_id}) failed: {source}")]
    Create {
        /// vCPU index.
        index: u32,
        /// APIC ID used as KVM vCPU id.
        apic_id: u32,
        /// The error.
        source: vmm_sys_util::errno::Error,
    },
    /// A vCPU operation got an error naming an MSR/LAPIC/... detail.
    #[error("vCPU {index}: {source}")]
    OnVcpu {
        /// vCPU index.
        index: u32,
        /// The error.
        source: Box<VcpuError>,
    },
    /// A state cannot be restored into this vCPU.
    #[error("vCPU {index}: cannot restore state: {reason}")]
    Restore {
        /// vCPU index.
        index: u32,
        /// Why.
        reason: String,
    },
    /// A saved state failed validation or decoding.
    #[error(transparent)]
    State(#[from] vmkit_migration::MigrationError),
    /// The operation needs the vCPUs paused.
    #[error("the vCPUs must be paused for {0}")]
    NotPaused(&'static str),
    /// The operation would wait for the calling thread itself.
    #[error("{0} called from a vCPU thread would wait for itself")]
    FromVcpuThread(&'static str),
    /// Registering the kick signal handler failed.
    #[error("cannot register the vCPU kick signal handler for signal {signal}: {source}")]
    Signal {
        /// Signal number.
        signal: i32,
        /// The error.
        source: vmm_sys_util::errno::Error,
    },
    /// Spawning a vCPU thread failed.
    #[error("cannot spawn thread for vCPU {index}: {source}")]
    Spawn {
        /// vCPU index.
        index: u32,
        /// The error.
        source: std::io::Error,
    },
    /// The vCPU list given to the manager is unusable.
    #[error("invalid vCPU set: {0}")]
    InvalidVcpuSet(String),
}

impl VcpuError {
    pub(crate) fn on(self, index: u32) -> Self {
        match self {
            e @ (Self::Ioctl { .. }
            | Self::Create { .. }
            | Self::OnVcpu { .. }
            | Self::Restore { .. }) => e,
            e => Self::OnVcpu {
                index,
                source: Box::new(e),
            },
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = VcpuError> = std::result::Result<T, E>;
