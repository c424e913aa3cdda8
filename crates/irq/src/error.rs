// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The crate's error type and the conversion of KVM ioctl failures into
//! [`InterruptError`](vmkit_device::interrupt::InterruptError).

use std::io;

use vmkit_device::interrupt::InterruptError;

/// Errors from setting up the in-kernel interrupt controller and creating a [`crate::KvmIrqChip`].
///
/// Operations behind the [`vmkit_device::interrupt`] traits report
/// [`InterruptError`] instead (they name the failing ioctl in the I/O error message).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IrqError {
    /// An ioctl on the VM failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl (e.g. `KVM_CREATE_IRQCHIP`).
        op: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability this crate cannot work without.
    #[error("KVM lacks {0}, which vmkit-irq needs")]
    MissingCapability(&'static str),
    /// A configuration value is unusable.
    #[error("invalid interrupt controller configuration: {0}")]
    InvalidConfig(String),
    /// A saved interrupt controller state does not fit this VM.
    #[error("invalid interrupt controller state: {0}")]
    InvalidState(String),
    /// An interrupt operation failed while creating the controller.
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
}

/// Wraps a failed ioctl as an [`InterruptError::Io`] whose message names the ioctl and
/// whose kind follows the errno.
pub(crate) fn kvm_io(op: &'static str, e: kvm_ioctls::Error) -> InterruptError {
    let kind = io::Error::from_raw_os_error(e.errno()).kind();
    InterruptError::Io(io::Error::new(kind, format!("{op}: {e}")))
}

/// Builds a closure for `map_err` that wraps a failed ioctl as [`IrqError::Kvm`].
pub(crate) fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> IrqError {
    move |source| IrqError::Kvm { op, source }
}
