// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The error type of this crate: what can go wrong while *setting up* a device.
//!
//! Guest accesses never produce errors (a device ignores or answers what it does not
//! understand); these are host-side failures, each naming the path or thread involved.

use std::path::PathBuf;

/// Errors from building a device and its host-side backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevicesError {
    /// Another process is listening on the serial socket path.
    #[error("serial socket path {path} is in use by another listener")]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The serial socket could not be created at the path.
    #[error("cannot listen on serial socket {path}: {source}")]
    SocketBind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The serial output file could not be opened for appending or created.
    #[error("cannot create or open serial output file {path}: {source}")]
    CreateFile {
        /// The file path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Raising a device's interrupt failed while the device was built or restored.
    #[error("cannot raise the {device} interrupt: {source}")]
    Interrupt {
        /// The device.
        device: &'static str,
        /// The interrupt implementation's error.
        source: vmkit_device::InterruptError,
    },
    /// A saved device state cannot be loaded into the device model.
    #[error("invalid {device} state: {reason}")]
    InvalidState {
        /// The device.
        device: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A backend thread could not be started.
    #[error("cannot start the {name} thread: {source}")]
    SpawnThread {
        /// The thread's name.
        name: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
}
