// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Guest-write notifications that bypass the vCPU's exit to user space (KVM ioeventfd).
//!
//! A transport (virtio-pci notify BAR, virtio-mmio `QueueNotify`) asks an [`IoEventSpace`]
//! to signal an eventfd whenever the guest writes a given address, optionally only for one
//! value. The write then never reaches the [`crate::Bus`]: the kernel completes it and wakes
//! the device's worker thread. `vmkit-irq` implements this trait on KVM; the recording
//! implementation in [`crate::testing`] lets transports be tested without `/dev/kvm`.

use vmm_sys_util::eventfd::EventFd;

/// Which address space an ioevent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoEventAddress {
    /// A port I/O address.
    Pio(u64),
    /// A guest-physical MMIO address.
    Mmio(u64),
}

/// A value filter for an ioevent: only writes of exactly this width and value signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoEventMatch {
    /// Any write to the address signals.
    Any,
    /// Only a 2-byte write of this value signals.
    U16(u16),
    /// Only a 4-byte write of this value signals.
    U32(u32),
}

/// Errors from registering ioevents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoEventError {
    /// The same address and filter are already registered.
    #[error("ioevent already registered at {0:?}")]
    Exists(IoEventAddress),
    /// No registration matches the one to remove.
    #[error("no ioevent registered at {0:?}")]
    NotFound(IoEventAddress),
    /// The hypervisor refused the registration.
    #[error("ioevent at {address:?}: {source}")]
    Io {
        /// The address being (un)registered.
        address: IoEventAddress,
        /// The error from the hypervisor.
        #[source]
        source: std::io::Error,
    },
}

/// Registers eventfds that are signalled on guest writes (KVM ioeventfd).
pub trait IoEventSpace: Send + Sync {
    /// Signals `event` on guest writes to `address` that pass `filter`.
    fn register(
        &self,
        address: IoEventAddress,
        filter: IoEventMatch,
        event: &EventFd,
    ) -> Result<(), IoEventError>;

    /// Removes a registration made with the same arguments.
    fn unregister(
        &self,
        address: IoEventAddress,
        filter: IoEventMatch,
        event: &EventFd,
    ) -> Result<(), IoEventError>;
}
