// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Interrupt traits: how a device raises interrupts without knowing the hypervisor.
//!
//! A device holds an [`InterruptLine`] (a legacy pin routed to the IOAPIC/PIC) or a
//! [`MsiVectors`] group (MSI or MSI-X vectors), both obtained from an [`InterruptManager`]
//! when the machine is assembled. `vmkit-irq` implements these on KVM with irqfds and GSI
//! routes; [`crate::testing`] has recording implementations for unit tests.
//!
//! Worker threads that complete I/O should signal through [`MsiVectors::notifier`] /
//! the line's eventfd where one exists: writing an irqfd injects the interrupt in the kernel
//! without a round trip through the VMM.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Errors raised by interrupt implementations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InterruptError {
    /// A vector index outside the group.
    #[error("interrupt vector {index} out of range (group has {len})")]
    InvalidVector {
        /// The requested index.
        index: usize,
        /// Number of vectors in the group.
        len: usize,
    },
    /// A GSI / IRQ number the interrupt controller cannot route.
    #[error("invalid interrupt line {0}")]
    InvalidLine(u32),
    /// The operation does not apply to this kind of interrupt (e.g. `set_level` on an
    /// edge-only line).
    #[error("unsupported interrupt operation: {0}")]
    Unsupported(&'static str),
    /// No more GSIs / routes are available.
    #[error("interrupt routes exhausted: {0}")]
    Exhausted(String),
    /// The underlying eventfd or ioctl failed.
    #[error("interrupt backend I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// How a legacy interrupt line signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TriggerMode {
    /// One interrupt per [`InterruptLine::trigger`].
    Edge,
    /// The line stays asserted while the device has a condition pending.
    Level,
}

/// A legacy interrupt pin (ISA IRQ or PCI INTx) routed to a GSI.
pub trait InterruptLine: Send + Sync {
    /// The mode this line was created with.
    fn trigger_mode(&self) -> TriggerMode;

    /// Edge lines: delivers one interrupt. Level lines: asserts the line; it is deasserted
    /// when the guest acknowledges it, after which [`InterruptLine::resample_event`] fires
    /// and the device calls `trigger` again if its condition is still pending.
    fn trigger(&self) -> Result<(), InterruptError>;

    /// Drives a level-triggered line to `asserted`. Edge lines return
    /// [`InterruptError::Unsupported`].
    fn set_level(&self, asserted: bool) -> Result<(), InterruptError>;

    /// The eventfd that delivers this interrupt when written (an irqfd), if the
    /// implementation has one; worker threads may write it directly.
    fn event(&self) -> Option<&EventFd> {
        None
    }

    /// For level-triggered lines: the eventfd signalled when the guest acknowledged the
    /// interrupt (end of interrupt), if the implementation supports resampling.
    fn resample_event(&self) -> Option<&EventFd> {
        None
    }
}

/// An MSI message: the address/data pair a device writes to raise an interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Message address (low 32 bits in bits 0..32; the high half for 64-bit MSI).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl MsiMessage {
    /// The destination APIC ID encoded in an x86 MSI address, including the extended
    /// destination ID bits 11:5 used by KVM's `KVM_FEATURE_MSI_EXT_DEST_ID` (for APIC IDs
    /// above 255 without interrupt remapping) and the high address half for x2APIC
    /// destinations.
    pub fn x86_destination(&self) -> u32 {
        let low = (self.address as u32 >> 12) & 0xff;
        let ext = (self.address as u32 >> 5) & 0x7f;
        let high = (self.address >> 32) as u32 & 0xffff_ff00;
        high | (ext << 8) | low
    }

    /// The interrupt vector encoded in an x86 MSI data word.
    pub fn x86_vector(&self) -> u8 {
        (self.data & 0xff) as u8
    }
}

/// A group of MSI or MSI-X vectors owned by one device.
///
/// The transport (PCI MSI-X capability, virtio-mmio with MSI) programs each vector's message
/// and mask state as the guest writes them; the device raises vectors with
/// [`MsiVectors::trigger`]. A masked or unconfigured vector must not be delivered; tracking
/// pending bits while masked is the transport's job.
pub trait MsiVectors: Send + Sync {
    /// Number of vectors in the group.
    fn len(&self) -> usize;

    /// Whether the group has no vectors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the message of vector `index` (what the guest programmed).
    fn configure(&self, index: usize, message: MsiMessage) -> Result<(), InterruptError>;

    /// Masks (`true`) or unmasks vector `index`.
    fn set_masked(&self, index: usize, masked: bool) -> Result<(), InterruptError>;

    /// Delivers vector `index`.
    fn trigger(&self, index: usize) -> Result<(), InterruptError>;

    /// The eventfd that delivers vector `index` when written (an irqfd), if any.
    fn notifier(&self, index: usize) -> Option<&EventFd> {
        let _ = index;
        None
    }
}

/// Hands out interrupts to devices while the machine is assembled.
pub trait InterruptManager: Send + Sync {
    /// A legacy line on `gsi` (an IOAPIC input; 0..=15 also reach the PIC).
    fn legacy_line(
        &self,
        gsi: u32,
        mode: TriggerMode,
    ) -> Result<Arc<dyn InterruptLine>, InterruptError>;

    /// A new group of `count` MSI vectors, each initially masked and unconfigured.
    fn msi_vectors(&self, count: usize) -> Result<Arc<dyn MsiVectors>, InterruptError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msi_destination_decoding() {
        // xAPIC destination 0x12 in bits 19:12.
        let m = MsiMessage {
            address: 0xfee1_2000,
            data: 0x41,
        };
        assert_eq!(m.x86_destination(), 0x12);
        assert_eq!(m.x86_vector(), 0x41);
        // Extended destination ID: APIC ID 0x123 = ext 0x01 in bits 11:5, low 0x23.
        let m = MsiMessage {
            address: 0xfee2_3000 | (0x01 << 5),
            data: 0,
        };
        assert_eq!(m.x86_destination(), 0x123);
        // x2APIC destination high bits in the upper address half.
        let m = MsiMessage {
            address: (0x0000_1200u64 << 32) | 0xfee3_4000,
            data: 0,
        };
        assert_eq!(m.x86_destination(), 0x1234);
    }
}
