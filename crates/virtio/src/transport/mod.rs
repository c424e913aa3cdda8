// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Virtio transports: virtio-mmio version 2 ([`VirtioMmio`], a [`vmkit_device::BusDevice`])
//! and modern virtio-pci ([`VirtioPci`], a [`vmkit_pci::PciDevice`]).
//!
//! Both wrap a [`crate::VirtioDevice`] around one transport core: the device status state
//! machine (features refused unless offered and `VIRTIO_F_VERSION_1` accepted, activation at
//! `DRIVER_OK`, `DEVICE_NEEDS_RESET` when activation fails or the device asks for it, full
//! reset on a write of 0), the feature windows, queue configuration (a queue is enabled only
//! when its rings lie in guest memory), one notification eventfd per queue (registered as an
//! ioeventfd through [`vmkit_device::IoEventSpace`] while the device is active, or written by
//! the transport when the notify write reaches the bus), interrupt status and the
//! configuration generation, and a versioned [`TransportState`].

mod common;
mod mmio;
mod pci;

pub use common::{
    QueueSnapshot, TransportState, INTERRUPT_STATUS_CONFIG_CHANGED, INTERRUPT_STATUS_USED_RING,
    NO_VECTOR, TRANSPORT_UNSUPPORTED_FEATURES,
};
pub use mmio::{mmio_regs, VirtioMmio, VirtioMmioState, MMIO_SIZE, MMIO_VENDOR_ID};
pub use pci::{
    cap_type, common_cfg, pci_class, VirtioPci, VirtioPciState, COMMON_CFG_OFFSET, COMMON_CFG_SIZE,
    DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE, ISR_OFFSET, ISR_SIZE, MAX_QUEUES, MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, NOTIFY_SIZE, VIRTIO_BAR,
    VIRTIO_BAR_SIZE, VIRTIO_PCI_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID,
};

use crate::VirtioError;

/// Errors building, saving or restoring a transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The device reports no queues, or more than a transport can address.
    #[error("device has {0} queues (need 1..=65535)")]
    QueueCount(usize),
    /// A queue's maximum size is zero, above 32768 or not a power of two.
    #[error("queue {index}: invalid maximum size {max}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The maximum size the device reported.
        max: u16,
    },
    /// A notification eventfd could not be created.
    #[error("cannot create a queue notification eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The device failed (save, restore, pause, resume, activation of a restored device).
    #[error("device: {0}")]
    Device(#[source] VirtioError),
    /// Saved state does not fit this transport or device.
    #[error("invalid transport state: {0}")]
    InvalidState(String),
    /// A register window that does not fit the address space.
    #[error("register window at {0:#x} wraps the address space")]
    Address(u64),
    /// The PCI function could not be built (configuration space, MSI-X).
    #[error("virtio-pci: {0}")]
    Pci(String),
}
