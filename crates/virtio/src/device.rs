// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The [`VirtioDevice`] trait: what a device model implements to be served by either
//! transport (virtio-mmio or virtio-pci).
//!
//! The transport owns everything the virtio spec puts in the transport: the device-status
//! state machine, feature negotiation windows, queue addresses and sizes, notification
//! (ioeventfd) and interrupt (MSI-X vector or ISR + legacy line) plumbing. The device owns its
//! feature bits, its configuration space and its queues' processing once activated.
//!
//! Lifecycle, driven by the transport:
//! 1. [`VirtioDevice::device_features`] is offered to the driver;
//! 2. at `FEATURES_OK` the transport calls [`VirtioDevice::negotiate_features`] with the
//!    subset of offered bits the driver accepted; an `Err` makes the transport leave
//!    `FEATURES_OK` clear, as the spec requires;
//! 3. at `DRIVER_OK` the transport calls [`VirtioDevice::activate`] with the guest memory,
//!    the queues the driver enabled, their notification eventfds and the interrupt handle;
//!    the device starts its workers (threads, or handlers run by the VMM's event loop);
//! 4. a guest write of 0 to the status register calls [`VirtioDevice::reset`]: the device
//!    stops its workers, drops the queues and returns to its pre-activation state, after
//!    which it can be negotiated and activated again.

use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmkit_migration::Section;
use vmm_sys_util::eventfd::EventFd;

/// The one concrete guest-memory type devices are activated with: vm-memory's mmap-backed
/// memory with a dirty bitmap (the type `vmkit-memory` builds), behind `GuestMemoryAtomic`
/// so that hotplug can swap the region list under running workers.
pub type VirtioMemory = GuestMemoryAtomic<GuestMemoryMmap<AtomicBitmap>>;

/// Virtio device IDs (virtio 1.2, section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// SCSI host.
    pub const SCSI: u32 = 8;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VirtioInterruptType {
    /// The configuration space changed (or `NEEDS_RESET` was set).
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// The interrupt side of a transport, handed to a device at activation.
///
/// virtio-pci maps each type to the MSI-X vector the driver assigned (and sets the ISR);
/// virtio-mmio sets the interrupt status register and raises its line.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises the interrupt. A vector the driver left unassigned (`NO_VECTOR`) or masked is
    /// not delivered (MSI-X records it as pending); that is not an error.
    ///
    /// [`VirtioInterruptType::Config`] also advances the configuration generation. A device
    /// changes its configuration space only inside calls the transport makes (which hold
    /// the transport's lock), then raises `Config`: a driver reading the space under the
    /// same lock never sees a half-changed space with an unchanged generation.
    fn trigger(&self, kind: VirtioInterruptType) -> Result<(), vmkit_device::InterruptError>;

    /// An eventfd that raises the interrupt when written, if the transport has one (an irqfd
    /// behind an MSI-X vector); lets a worker signal without a call into the transport.
    fn notifier(&self, kind: VirtioInterruptType) -> Option<&EventFd> {
        let _ = kind;
        None
    }

    /// Sets `DEVICE_NEEDS_RESET` in the device status and raises the configuration
    /// interrupt: the device hit an error it cannot recover from (virtio 1.2, 2.1.2).
    fn set_needs_reset(&self);
}

/// One queue the driver enabled, as handed to [`VirtioDevice::activate`].
pub struct ActiveQueue {
    /// Index of the queue in the device.
    pub index: u16,
    /// The queue (addresses, size, `EVENT_IDX` already set by the transport).
    pub queue: virtio_queue::Queue,
    /// Signalled when the driver notifies this queue (an ioeventfd where the transport could
    /// register one; otherwise the transport writes it on the notify register's bus exit).
    pub notify: EventFd,
}

/// Everything a device needs to run, handed over at `DRIVER_OK`.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: VirtioMemory,
    /// The queues the driver enabled, in index order (disabled queues are left out).
    pub queues: Vec<ActiveQueue>,
    /// How to raise interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The features both sides agreed on (also passed earlier to
    /// [`VirtioDevice::negotiate_features`]).
    pub acked_features: u64,
}

/// Why a device refused an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VirtioError {
    /// The driver accepted a feature combination the device cannot honour.
    #[error("feature combination {0:#x} not supported")]
    Features(u64),
    /// A queue the device needs was not enabled, or has a bad size.
    #[error("queue {index}: {reason}")]
    Queue {
        /// The queue index.
        index: u16,
        /// What is wrong with it.
        reason: String,
    },
    /// Activation failed for a reason outside the driver's control (thread spawn, backend).
    #[error("activation failed: {0}")]
    Activate(String),
    /// Saved state could not be produced or applied.
    #[error("device state: {0}")]
    State(String),
    /// Host I/O error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A virtio device model, served by a transport.
///
/// Implementations are `Send` (the transport moves them behind a lock); every method is
/// called with the transport's lock held, never concurrently. None of them may panic on
/// anything the guest controls: configuration accesses outside the device's configuration
/// space read as zero and are ignored on write.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`device_type`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the number of queues is the length.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Feature bits offered to the driver, including transport bits the device supports
    /// (`VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_EVENT_IDX`, `VIRTIO_RING_F_INDIRECT_DESC`).
    fn device_features(&self) -> u64;

    /// The driver accepted `features` (a subset of [`VirtioDevice::device_features`]) and
    /// set `FEATURES_OK`. An `Err` refuses the combination.
    fn negotiate_features(&mut self, features: u64) -> Result<(), VirtioError>;

    /// Reads device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space at `offset` (e.g. virtio-blk `writeback`).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device. On `Err` the transport sets `DEVICE_NEEDS_RESET`.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError>;

    /// Stops the device's workers, waits for them to finish the requests in flight, drops
    /// the queues and returns to the state before negotiation. Must succeed on a device
    /// that was never activated.
    fn reset(&mut self);

    /// Device-specific state for a snapshot (configuration, negotiated features, anything a
    /// restored device needs), as a versioned section
    /// ([`vmkit_migration::encode_section`]). Queue state is saved by the transport. Only
    /// called while the device is paused or not activated.
    fn save_state(&self) -> Result<Section, VirtioError>;

    /// Applies state from [`VirtioDevice::save_state`] to a freshly built device, before the
    /// transport activates it with the restored queues.
    fn restore_state(&mut self, state: &Section) -> Result<(), VirtioError>;

    /// Stops processing queues without dropping them (snapshot, migration). Default: the
    /// device has nothing running outside `activate`/`reset`.
    fn pause(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }

    /// Resumes after [`VirtioDevice::pause`].
    fn resume(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }

    /// The ring positions `(next_avail, next_used)` of active queue `index`, for a snapshot;
    /// called only while the device is paused (or after it stopped on its own).
    ///
    /// The default `None` tells the transport to read the used ring's `idx` from guest
    /// memory and take it for both positions. That is exact for a device that, once paused,
    /// has completed every chain it popped; and right for one that holds popped chains and
    /// completes them in the order it popped them (a console receive queue waiting for
    /// input): the restored device pops the held chains again. A device that completes
    /// out of order and keeps chains in flight while paused must return its positions here
    /// (and restore its in-flight chains itself).
    fn queue_positions(&self, index: u16) -> Option<(u16, u16)> {
        let _ = index;
        None
    }
}

/// Feature bits common to every device (virtio 1.2, section 6).
pub mod features {
    /// Indirect descriptors (`VIRTIO_RING_F_INDIRECT_DESC`).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` notification suppression (`VIRTIO_RING_F_EVENT_IDX`).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// A virtio 1.x (modern) device (`VIRTIO_F_VERSION_1`).
    pub const VERSION_1: u64 = 1 << 32;
    /// The device may access memory only through the platform IOMMU
    /// (`VIRTIO_F_ACCESS_PLATFORM`).
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}
