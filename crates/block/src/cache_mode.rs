// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Cache modes: how guest writes reach stable storage.

use std::fmt;
use std::str::FromStr;

use crate::BlockError;

/// How writes reach stable storage, and what [`flush`](crate::BlockBackend::flush) does.
///
/// The names and semantics follow QEMU's `cache=` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CacheMode {
    /// Writes complete once the data is in the host page cache; they are not durable until
    /// the guest flushes. `flush` runs `fdatasync` on the image (and, for formats with
    /// metadata, writes dirty metadata first). This is the default and matches a disk with
    /// a volatile write cache (virtio-blk `VIRTIO_BLK_F_FLUSH` with WCE on).
    #[default]
    Writeback,
    /// Every write is durable when it completes: the image is opened with `O_DSYNC` (and
    /// metadata updates are followed by `fdatasync`), so `flush` has nothing left to do but
    /// is still honoured with an `fdatasync`. Matches a disk without a write cache
    /// (WCE off). Can be switched with Writeback at run time.
    Writethrough,
    /// Bypasses the host page cache: the image is opened with `O_DIRECT`. Requests whose
    /// guest buffers, offsets or lengths are not aligned to the logical block size go
    /// through aligned bounce buffers. Data is not durable until `flush`, which runs
    /// `fdatasync` (the device's own cache may still hold it). Not all file systems
    /// support `O_DIRECT` (tmpfs does not): opening then fails with a clear error.
    None,
    /// Like `Writeback`, but `flush` does nothing: nothing is ever made durable on request.
    /// For throw-away guests and tests only; a host crash loses data.
    Unsafe,
}

impl CacheMode {
    /// The QEMU-style name: `writeback`, `writethrough`, `none`, `unsafe`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::None => "none",
            CacheMode::Unsafe => "unsafe",
        }
    }

    /// Whether the file is opened with `O_DIRECT`.
    pub fn direct(self) -> bool {
        self == CacheMode::None
    }

    /// Whether every write must be durable when it completes.
    pub fn write_through(self) -> bool {
        self == CacheMode::Writethrough
    }

    /// Whether `flush` must reach stable storage.
    pub fn flush_syncs(self) -> bool {
        self != CacheMode::Unsafe
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CacheMode {
    type Err = BlockError;

    fn from_str(s: &str) -> Result<Self, BlockError> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "writethrough" => Ok(CacheMode::Writethrough),
            "none" => Ok(CacheMode::None),
            "unsafe" => Ok(CacheMode::Unsafe),
            other => Err(BlockError::InvalidArgument(format!(
                "unknown cache mode {other:?} (expected writeback, writethrough, none or unsafe)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in [
            CacheMode::Writeback,
            CacheMode::Writethrough,
            CacheMode::None,
            CacheMode::Unsafe,
        ] {
            assert_eq!(m.as_str().parse::<CacheMode>().ok(), Some(m));
        }
        assert!("bogus".parse::<CacheMode>().is_err());
        assert!(CacheMode::None.direct());
        assert!(!CacheMode::Unsafe.flush_syncs());
    }
}
