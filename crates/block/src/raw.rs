// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Raw images: the file (or block device) is the disk, byte for byte.

use std::path::Path;

use vm_memory::VolatileSlice;

use crate::backend::{check_range, total_len};
use crate::file_io::ImageFile;
use crate::{BlockBackend, BlockError, BlockStatus, CacheMode};

/// A raw image file or block device.
///
/// Reads and writes go straight between the file and the caller's buffers with
/// `preadv`/`pwritev`; discard punches holes, write-zeroes uses `FALLOC_FL_ZERO_RANGE`
/// (or a hole when unmapping is allowed), and block status comes from
/// `SEEK_DATA`/`SEEK_HOLE`. The virtual size is the file size when it was opened.
#[derive(Debug)]
pub struct RawBackend {
    file: ImageFile,
    size: u64,
}

impl RawBackend {
    /// Opens a raw image.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, BlockError> {
        let file = ImageFile::open(path, read_only, cache)?;
        Self::from_image_file(file)
    }

    /// Wraps an open [`ImageFile`].
    pub fn from_image_file(file: ImageFile) -> Result<Self, BlockError> {
        let size = file.len()?;
        Ok(RawBackend { file, size })
    }

    /// Creates a raw image of `size` bytes (sparse).
    pub fn create(path: &Path, size: u64) -> Result<(), BlockError> {
        let f = ImageFile::create(path)?;
        f.set_len(size)?;
        f.sync()
    }

    /// The underlying file.
    pub fn image_file(&self) -> &ImageFile {
        &self.file
    }
}

impl BlockBackend for RawBackend {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> &'static str {
        "raw"
    }

    fn is_read_only(&self) -> bool {
        self.file.is_read_only()
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        check_range(offset, total_len(bufs), self.size)?;
        self.file.read_vectored_at(offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, total_len(bufs), self.size)?;
        self.file.write_vectored_at(offset, bufs)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.file.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        if self.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if self.file.zero_range(offset, len, may_unmap)? {
            return Ok(());
        }
        self.file.write_zero_bytes(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        check_range(offset, len.min(1), self.size)?;
        if offset >= self.size {
            return Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        let max = len.min(self.size - offset).max(1);
        let (data, end) = self.file.extent_at(offset)?;
        let n = end.saturating_sub(offset).clamp(1, max);
        Ok(BlockStatus {
            offset,
            len: n,
            allocated: data,
            zero: !data,
        })
    }

    fn cache_mode(&self) -> CacheMode {
        self.file.cache_mode()
    }

    fn set_cache_mode(&self, mode: CacheMode) -> Result<(), BlockError> {
        self.file.set_cache_mode(mode)
    }

    fn allocated_size(&self) -> Option<u64> {
        self.file.allocated_bytes().ok()
    }
}
