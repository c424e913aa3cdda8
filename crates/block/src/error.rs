// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The error type shared by every backend of this crate.

use std::path::PathBuf;

/// Errors of block backends, image probing and image tools.
///
/// Messages name the file (where one is involved) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A system call on an image file failed.
    #[error("{op} failed{}: {source}", path_suffix(.path))]
    Io {
        /// The file, when the failing operation concerned one.
        path: Option<PathBuf>,
        /// What was being done ("pread", "fdatasync", "open", ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A request reaches past the end of the virtual disk.
    #[error("request at offset {offset} of {len} bytes is outside the disk of {size} bytes")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the disk.
        size: u64,
    },
    /// A write, discard or metadata change was attempted on a read-only image.
    #[error("the image is read-only")]
    ReadOnly,
    /// The image metadata is inconsistent or malformed.
    #[error("{}: corrupt image: {reason}", .path.display())]
    Corrupt {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image is valid but uses a feature this crate does not implement.
    #[error("{}: unsupported: {reason}", .path.display())]
    Unsupported {
        /// The image file.
        path: PathBuf,
        /// The feature.
        reason: String,
    },
    /// The backing file (or external data file) of an image cannot be opened.
    #[error("{}: cannot open its backing file {}: {source}", .image.display(), .backing.display())]
    Backing {
        /// The image naming the backing file.
        image: PathBuf,
        /// The backing file, as resolved.
        backing: PathBuf,
        /// Why it failed.
        #[source]
        source: Box<BlockError>,
    },
    /// A caller-supplied argument is invalid (bad option, misaligned size, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" on {}", p.display()),
        None => String::new(),
    }
}

impl BlockError {
    /// Shorthand for an [`BlockError::Io`] error on `path`.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        BlockError::Io {
            path: Some(path.into()),
            op,
            source,
        }
    }

    /// Shorthand for a [`BlockError::Corrupt`] error.
    pub fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        BlockError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for an [`BlockError::Unsupported`] error.
    pub fn unsupported(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        BlockError::Unsupported {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, BlockError>;
