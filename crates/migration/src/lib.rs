// SPDX-License-Identifier: Apache-2.0 OR MIT
//! State traits and the versioned state encoding shared by every stateful vmkit component.
//!
//! Three small traits describe what a component can do for snapshot and migration:
//! [`Pausable`] (stop touching guest state), [`Snapshot`] (produce a typed state value) and
//! [`Restore`] (a *constructor* from such a value — there is never a half-initialised
//! object waiting for `restore` to be called).
//!
//! State values are plain data types that implement [`VersionedState`]: a component name, a
//! version number and serde derives. They are encoded as CBOR (RFC 8949), a self-describing
//! format: fields are stored by name, so adding a field with `#[serde(default)]` keeps old
//! encodings readable without any code, and [`VersionedState::upgrade`] rewrites older
//! layouts step by step when a change is more than an addition. Encodings from a *newer*
//! version than the running code are refused with a clear error rather than misread.
//!
//! A whole machine is saved as a [`SnapshotTree`]: sections keyed by component id (e.g.
//! `"vcpu/3"`, `"devices/serial0"`), each carrying its own name and version, stored in a file
//! with a magic, a format version and a CRC.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use vmkit_migration::{decode, encode, VersionedState};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct CounterState {
//!     value: u64,
//! }
//!
//! impl VersionedState for CounterState {
//!     const NAME: &'static str = "example/counter";
//!     const VERSION: u16 = 1;
//! }
//!
//! let bytes = encode(&CounterState { value: 7 })?;
//! let back: CounterState = decode(&bytes)?;
//! assert_eq!(back, CounterState { value: 7 });
//! # Ok::<(), vmkit_migration::MigrationError>(())
//! ```

mod encoding;
mod tree;

pub use ciborium::Value;
pub use encoding::{decode, decode_section, encode, encode_section, Section};
pub use tree::SnapshotTree;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors from saving, encoding, decoding and restoring state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// A state value could not be encoded.
    #[error("cannot encode state of {name}: {reason}")]
    Encode {
        /// Component name.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Bytes could not be decoded as the expected state.
    #[error("cannot decode state of {name}: {reason}")]
    Decode {
        /// Component name that was expected.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The encoding belongs to another component.
    #[error("state belongs to component {found:?}, expected {expected:?}")]
    WrongComponent {
        /// Name that was expected.
        expected: &'static str,
        /// Name found in the encoding.
        found: String,
    },
    /// The encoding is from a newer version than this build understands.
    #[error("state of {name} has version {found}, newer than the supported version {supported}")]
    NewerVersion {
        /// Component name.
        name: &'static str,
        /// Version found.
        found: u16,
        /// Newest version this build supports.
        supported: u16,
    },
    /// An older version for which no upgrade path exists.
    #[error("state of {name} has version {version}, which this build can no longer upgrade")]
    UnsupportedVersion {
        /// Component name.
        name: &'static str,
        /// Version found.
        version: u16,
    },
    /// A snapshot lacks a section.
    #[error("snapshot has no section {0:?}")]
    MissingSection(String),
    /// A snapshot file or stream is damaged.
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
    /// A state value decoded, but its contents are not acceptable (e.g. out-of-range fields).
    #[error("invalid state of {name}: {reason}")]
    InvalidState {
        /// Component name.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a snapshot file failed.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A component failed to pause, resume, save or restore.
    #[error("{component}: {source}")]
    Component {
        /// Which component.
        component: String,
        /// Its error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A component that can stop and restart its activity on guest state.
///
/// While paused, a component does not modify guest memory or its own device state (workers
/// parked, vCPUs out of `KVM_RUN`), so that a snapshot taken then is consistent. Pausing a
/// paused component and resuming a running one are no-ops.
pub trait Pausable {
    /// Stops the component's activity.
    fn pause(&self) -> Result<(), MigrationError>;
    /// Resumes the component's activity.
    fn resume(&self) -> Result<(), MigrationError>;
}

/// A versioned, serialisable state value.
///
/// `NAME` identifies the component kind (it is checked on decode); `VERSION` is bumped on
/// every change of the serialised form that `#[serde(default)]` cannot absorb, and
/// [`VersionedState::upgrade`] then learns the step from the previous version.
pub trait VersionedState: Serialize + DeserializeOwned {
    /// Component kind, e.g. `"vmkit-vcpu/x86_64"`.
    const NAME: &'static str;
    /// Current version of the encoding.
    const VERSION: u16;

    /// Rewrites a value encoded at version `from` into the form of version `from + 1`.
    ///
    /// Called repeatedly until the value reaches [`VersionedState::VERSION`]. The default
    /// accepts no older versions.
    fn upgrade(from: u16, value: Value) -> Result<Value, MigrationError> {
        let _ = value;
        Err(MigrationError::UnsupportedVersion {
            name: Self::NAME,
            version: from,
        })
    }
}

/// A component that can produce its state.
pub trait Snapshot {
    /// The state type.
    type State: VersionedState;
    /// Saves the component's state. The component should be paused.
    fn save(&self) -> Result<Self::State, MigrationError>;
}

/// A component that can be constructed from a saved state.
pub trait Restore: Snapshot + Sized {
    /// What the constructor needs besides the state (file descriptors, guest memory, ...).
    type Args;
    /// Builds the component from `state`. Validation failures are errors, never panics.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, MigrationError>;
}
