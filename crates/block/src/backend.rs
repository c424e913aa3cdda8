// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The backend contract every image format implements, and helpers around it.

use std::path::PathBuf;

use vm_memory::VolatileSlice;

use crate::{BlockError, CacheMode};

/// Allocation status of one extent of a disk, as returned by
/// [`BlockBackend::block_status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// First byte of the extent (the `offset` that was asked about).
    pub offset: u64,
    /// Length of the extent: every byte in it has the same status. At least 1 byte and at
    /// most the `len` that was asked for (clipped to the disk size).
    pub len: u64,
    /// The extent is allocated in this image (or, for a chain, somewhere in the chain).
    pub allocated: bool,
    /// The extent is known to read as zeroes.
    pub zero: bool,
}

/// A disk image: raw, qcow2, VPC, VHDX or a caching tier over one of them.
///
/// All methods take `&self` and lock internally, so several virtio queues (threads) can
/// share one backend through an `Arc`. Requests that reach past
/// [`virtual_size`](Self::virtual_size) fail with [`BlockError::OutOfRange`]; writes to a
/// read-only image fail with [`BlockError::ReadOnly`].
///
/// Buffers are [`VolatileSlice`]s, so data moves straight between the image file and guest
/// memory; host buffers use [`read_at`] and [`write_at`].
pub trait BlockBackend: Send + Sync {
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;
    /// Format name: "raw", "qcow2", "vpc", "vhdx", "cache-tier".
    fn format(&self) -> &'static str;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
    /// Reads `sum(bufs.len())` bytes at `offset` into the buffers (guest memory or host
    /// memory).
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError>;
    /// Writes the buffers at `offset`.
    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError>;
    /// Makes every completed write durable, as the [`CacheMode`] defines (a no-op under
    /// [`CacheMode::Unsafe`]).
    fn flush(&self) -> Result<(), BlockError>;
    /// Deallocates the range if possible (reads then return zeroes); where the format
    /// cannot deallocate, writes zeroes instead.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Makes the range read as zeroes; `may_unmap` allows deallocation.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError>;
    /// Allocation status of the extent starting at `offset` (at most `len` bytes).
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError>;
    /// Current cache mode.
    fn cache_mode(&self) -> CacheMode;
    /// Switches the cache mode. Writeback <-> Writethrough works at run time (virtio-blk
    /// `CONFIG_WCE`); other switches may return [`BlockError::InvalidArgument`].
    fn set_cache_mode(&self, mode: CacheMode) -> Result<(), BlockError>;
    /// Backing chain description for `info` (file names and formats), outermost first.
    /// Does not include the image itself.
    fn backing_chain(&self) -> Vec<(PathBuf, &'static str)> {
        Vec::new()
    }
    /// Bytes the image occupies on the host (allocated blocks of its files), if known.
    fn allocated_size(&self) -> Option<u64> {
        None
    }
}

/// Reads `buf.len()` bytes at `offset` from `backend` into a host buffer.
pub fn read_at(backend: &dyn BlockBackend, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
    let slice = VolatileSlice::from(buf);
    backend.read_vectored(offset, &[slice])
}

/// Writes a host buffer at `offset` to `backend`.
pub fn write_at(backend: &dyn BlockBackend, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
    // `VolatileSlice` only converts from `&mut [u8]`; the backend never writes into the
    // buffers of `write_vectored`, but we still copy so no `&[u8]` is ever aliased mutably.
    let mut copy = buf.to_vec();
    let slice = VolatileSlice::from(copy.as_mut_slice());
    backend.write_vectored(offset, &[slice])
}

/// Checks that `offset..offset+len` lies within a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// Total length of a buffer list.
pub fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// The sub-list of `bufs` covering bytes `skip..skip+len` of their concatenation.
///
/// Returns fewer bytes than `len` only if the buffers are shorter than `skip + len`.
pub fn sub_bufs<'a>(bufs: &[VolatileSlice<'a>], skip: u64, len: u64) -> Vec<VolatileSlice<'a>> {
    let mut out = Vec::new();
    let mut skip = skip;
    let mut left = len;
    for b in bufs {
        if left == 0 {
            break;
        }
        let blen = b.len() as u64;
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let take = (blen - skip).min(left);
        // Both values fit in usize: they are bounded by b.len().
        if let Ok(s) = b.subslice(skip as usize, take as usize) {
            out.push(s);
        }
        left -= take;
        skip = 0;
    }
    out
}

/// Copies bytes `skip..skip+dst.len()` of the concatenated `bufs` into `dst`.
pub fn gather(bufs: &[VolatileSlice<'_>], skip: u64, dst: &mut [u8]) {
    let mut pos = 0usize;
    for s in sub_bufs(bufs, skip, dst.len() as u64) {
        let n = s.len();
        if let Some(d) = dst.get_mut(pos..pos + n) {
            s.copy_to(d);
        }
        pos += n;
    }
}

/// Copies `src` into bytes `skip..skip+src.len()` of the concatenated `bufs`.
pub fn scatter(bufs: &[VolatileSlice<'_>], skip: u64, src: &[u8]) {
    let mut pos = 0usize;
    for s in sub_bufs(bufs, skip, src.len() as u64) {
        let n = s.len();
        if let Some(d) = src.get(pos..pos + n) {
            s.copy_from(d);
        }
        pos += n;
    }
}

/// Fills bytes `skip..skip+len` of the concatenated `bufs` with zeroes.
pub fn zero_bufs(bufs: &[VolatileSlice<'_>], skip: u64, len: u64) {
    const ZEROES: [u8; 4096] = [0; 4096];
    for s in sub_bufs(bufs, skip, len) {
        let mut done = 0usize;
        while done < s.len() {
            let n = (s.len() - done).min(ZEROES.len());
            if let Ok(part) = s.subslice(done, n) {
                part.copy_from(&ZEROES[..n]);
            }
            done += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_bufs_spans_buffers() {
        let mut a = [1u8, 2, 3];
        let mut b = [4u8, 5, 6, 7];
        let bufs = [
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
        ];
        let mut out = [0u8; 4];
        gather(&bufs, 1, &mut out);
        assert_eq!(out, [2, 3, 4, 5]);
        scatter(&bufs, 2, &[9, 9]);
        zero_bufs(&bufs, 5, 2);
        let parts = sub_bufs(&bufs, 0, 100);
        assert_eq!(parts.len(), 2);
        let _ = bufs;
        assert_eq!(a, [1, 2, 9]);
        assert_eq!(b, [9, 5, 0, 0]);
    }

    #[test]
    fn range_check() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(1, 10, 10).is_err());
        assert!(check_range(u64::MAX, 2, 10).is_err());
    }
}
