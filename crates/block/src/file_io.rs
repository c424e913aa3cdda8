// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Positioned, vectored I/O on an image file, shared by every format.
//!
//! [`ImageFile`] wraps a [`File`] with the path (for error messages) and the cache mode:
//! `O_DIRECT` for [`CacheMode::None`] (with aligned bounce buffers whenever a request or its
//! buffers are not aligned), an `fdatasync` after every write for
//! [`CacheMode::Writethrough`], and a no-op flush for [`CacheMode::Unsafe`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use vm_memory::VolatileSlice;

use crate::backend::{sub_bufs, total_len};
use crate::{BlockError, CacheMode};

/// Alignment used for `O_DIRECT` requests and bounce buffers (covers 512 B and 4 KiB
/// logical block devices alike).
pub const DIRECT_ALIGN: u64 = 4096;

/// Most iovecs passed to one `preadv`/`pwritev` call (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;

fn mode_to_u8(m: CacheMode) -> u8 {
    match m {
        CacheMode::Writeback => 0,
        CacheMode::Writethrough => 1,
        CacheMode::None => 2,
        CacheMode::Unsafe => 3,
    }
}

fn u8_to_mode(v: u8) -> CacheMode {
    match v {
        1 => CacheMode::Writethrough,
        2 => CacheMode::None,
        3 => CacheMode::Unsafe,
        _ => CacheMode::Writeback,
    }
}

/// An open image file.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
    read_only: bool,
    direct: bool,
    mode: AtomicU8,
    /// Serialises read-modify-write cycles of unaligned `O_DIRECT` writes.
    rmw: Mutex<()>,
}

/// A heap buffer aligned to [`DIRECT_ALIGN`].
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<Self> {
        let size = len.max(1);
        let layout = std::alloc::Layout::from_size_align(size, DIRECT_ALIGN as usize)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "bounce buffer"));
        }
        Ok(AlignedBuf { ptr, len, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to an allocation of at least `len` initialised (zeroed)
        // bytes owned by `self`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with `layout` by `alloc_zeroed` and not freed before.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn is_aligned(v: u64) -> bool {
    v % DIRECT_ALIGN == 0
}

impl ImageFile {
    /// Opens `path` for the given cache mode.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, BlockError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if cache.direct() {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|e| {
            if cache.direct() && e.raw_os_error() == Some(libc::EINVAL) {
                BlockError::io(
                    path,
                    "open with O_DIRECT (cache=none; the file system may not support it)",
                    e,
                )
            } else {
                BlockError::io(path, "open", e)
            }
        })?;
        Ok(Self::from_file(file, path, read_only, cache))
    }

    /// Wraps an already open file. `cache.direct()` must match how it was opened.
    pub fn from_file(file: File, path: &Path, read_only: bool, cache: CacheMode) -> Self {
        ImageFile {
            file,
            path: path.to_path_buf(),
            read_only,
            direct: cache.direct(),
            mode: AtomicU8::new(mode_to_u8(cache)),
            rmw: Mutex::new(()),
        }
    }

    /// Creates (or truncates) `path` for writing, with the default cache mode.
    pub fn create(path: &Path) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| BlockError::io(path, "create", e))?;
        Ok(Self::from_file(file, path, false, CacheMode::Writeback))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The current cache mode.
    pub fn cache_mode(&self) -> CacheMode {
        u8_to_mode(self.mode.load(Ordering::Relaxed))
    }

    /// Switches between Writeback, Writethrough and Unsafe (which only change what happens
    /// after a write and on flush). Switching into or out of `None` (`O_DIRECT`) is refused.
    pub fn set_cache_mode(&self, mode: CacheMode) -> Result<(), BlockError> {
        if mode.direct() != self.direct {
            return Err(BlockError::InvalidArgument(format!(
                "cannot switch cache mode from {} to {} on an open image (O_DIRECT is fixed at open)",
                self.cache_mode(),
                mode
            )));
        }
        self.mode.store(mode_to_u8(mode), Ordering::Relaxed);
        Ok(())
    }

    fn err(&self, op: &'static str, e: io::Error) -> BlockError {
        BlockError::io(&self.path, op, e)
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            Err(BlockError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Current file length (block devices included).
    pub fn len(&self) -> Result<u64, BlockError> {
        // SAFETY: lseek on an fd we own; it moves only the file position, which this type
        // never uses (all I/O is positioned).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
        if r < 0 {
            return Err(self.err("lseek(SEEK_END)", io::Error::last_os_error()));
        }
        Ok(r as u64)
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> Result<bool, BlockError> {
        Ok(self.len()? == 0)
    }

    /// Bytes allocated on the host file system for this file.
    pub fn allocated_bytes(&self) -> Result<u64, BlockError> {
        self.file
            .metadata()
            .map(|m| m.blocks().saturating_mul(512))
            .map_err(|e| self.err("fstat", e))
    }

    /// Sets the file length.
    pub fn set_len(&self, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        self.file.set_len(len).map_err(|e| self.err("ftruncate", e))
    }

    /// `fdatasync` unless the cache mode is Unsafe.
    pub fn flush(&self) -> Result<(), BlockError> {
        if self.read_only || !self.cache_mode().flush_syncs() {
            return Ok(());
        }
        self.sync()
    }

    /// `fdatasync`, whatever the cache mode.
    pub fn sync(&self) -> Result<(), BlockError> {
        self.file.sync_data().map_err(|e| self.err("fdatasync", e))
    }

    fn after_write(&self) -> Result<(), BlockError> {
        if self.cache_mode().write_through() {
            self.sync()
        } else {
            Ok(())
        }
    }

    fn direct_ok(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> bool {
        if !self.direct {
            return true;
        }
        is_aligned(offset)
            && bufs.iter().all(|b| {
                is_aligned(b.len() as u64) && is_aligned(b.ptr_guard().as_ptr() as usize as u64)
            })
    }

    /// Reads into `bufs` at `offset`. Bytes past the end of the file read as zeroes.
    pub fn read_vectored_at(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
    ) -> Result<(), BlockError> {
        if self.direct_ok(offset, bufs) {
            self.preadv_all(offset, bufs)
        } else {
            self.read_bounced(offset, bufs)
        }
    }

    /// Writes `bufs` at `offset`.
    pub fn write_vectored_at(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
    ) -> Result<(), BlockError> {
        self.check_writable()?;
        if self.direct_ok(offset, bufs) {
            self.pwritev_all(offset, bufs)?;
        } else {
            self.write_bounced(offset, bufs)?;
        }
        self.after_write()
    }

    /// Reads `buf.len()` bytes at `offset` into a host buffer (zeroes past EOF).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let s = VolatileSlice::from(buf);
        self.read_vectored_at(offset, &[s])
    }

    /// Writes a host buffer at `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let mut copy = buf.to_vec();
        let s = VolatileSlice::from(copy.as_mut_slice());
        self.write_vectored_at(offset, &[s])
    }

    fn read_bounced(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let len = total_len(bufs);
        let start = offset - offset % DIRECT_ALIGN;
        let end = offset
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(DIRECT_ALIGN))
            .ok_or_else(|| BlockError::InvalidArgument("read range overflows".into()))?;
        let blen = usize::try_from(end - start)
            .map_err(|_| BlockError::InvalidArgument("request too large".into()))?;
        let mut bounce =
            AlignedBuf::new(blen).map_err(|e| self.err("allocate bounce buffer", e))?;
        let data = bounce.as_mut_slice();
        {
            let s = VolatileSlice::from(&mut data[..]);
            self.preadv_all(start, &[s])?;
        }
        let skip = (offset - start) as usize;
        crate::backend::scatter(bufs, 0, &data[skip..skip + len as usize]);
        Ok(())
    }

    fn write_bounced(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let len = total_len(bufs);
        let start = offset - offset % DIRECT_ALIGN;
        let end = offset
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(DIRECT_ALIGN))
            .ok_or_else(|| BlockError::InvalidArgument("write range overflows".into()))?;
        let blen = usize::try_from(end - start)
            .map_err(|_| BlockError::InvalidArgument("request too large".into()))?;
        let mut bounce =
            AlignedBuf::new(blen).map_err(|e| self.err("allocate bounce buffer", e))?;
        let data = bounce.as_mut_slice();
        let partial = start != offset || end != offset + len;
        let _guard = if partial {
            Some(self.rmw.lock().unwrap_or_else(|p| p.into_inner()))
        } else {
            None
        };
        if partial {
            let s = VolatileSlice::from(&mut data[..]);
            self.preadv_all(start, &[s])?;
        }
        let skip = (offset - start) as usize;
        crate::backend::gather(bufs, 0, &mut data[skip..skip + len as usize]);
        // Do not grow the file by the alignment padding beyond the last written byte.
        let file_len = self.len()?;
        let s = VolatileSlice::from(&mut data[..]);
        self.pwritev_all(start, &[s])?;
        let new_end = offset + len;
        if end > file_len && new_end < end {
            self.file
                .set_len(file_len.max(new_end))
                .map_err(|e| self.err("ftruncate", e))?;
        }
        Ok(())
    }

    fn preadv_all(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        if let [one] = bufs {
            return self.pread_one(offset, one);
        }
        let len = total_len(bufs);
        let mut done = 0u64;
        while done < len {
            let part = sub_bufs(bufs, done, len - done);
            let guards: Vec<_> = part
                .iter()
                .take(IOV_MAX)
                .map(|b| b.ptr_guard_mut())
                .collect();
            let iov: Vec<libc::iovec> = guards
                .iter()
                .map(|g| libc::iovec {
                    iov_base: g.as_ptr().cast(),
                    iov_len: g.len(),
                })
                .collect();
            let pos = offset
                .checked_add(done)
                .and_then(|p| i64::try_from(p).ok())
                .ok_or_else(|| BlockError::InvalidArgument("file offset overflows".into()))?;
            // SAFETY: each iovec points to memory of a VolatileSlice whose guard is alive in
            // `guards` for the duration of the call; the slices are valid for `iov_len`
            // bytes of writes (VolatileSlice invariant) and the kernel writes only into
            // them. The fd is owned by `self.file`.
            let r = unsafe {
                libc::preadv(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    pos,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.err("preadv", e));
            }
            if r == 0 {
                // End of file: the rest reads as zeroes.
                crate::backend::zero_bufs(bufs, done, len - done);
                return Ok(());
            }
            done += r as u64;
        }
        Ok(())
    }

    /// `preadv_all` for one buffer: plain `pread`, no iovec arrays to allocate (the
    /// common case of a small request).
    fn pread_one(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError> {
        let guard = buf.ptr_guard_mut();
        let len = guard.len();
        let mut done = 0usize;
        while done < len {
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| i64::try_from(p).ok())
                .ok_or_else(|| BlockError::InvalidArgument("file offset overflows".into()))?;
            // SAFETY: `guard` keeps the VolatileSlice's memory valid for `len` bytes of
            // writes for the whole call; `done < len`, so the pointer and the length stay
            // inside it. The kernel writes only into that range. The fd is owned by
            // `self.file`.
            let r = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    len - done,
                    pos,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.err("pread", e));
            }
            if r == 0 {
                // End of file: the rest reads as zeroes.
                crate::backend::zero_bufs(
                    std::slice::from_ref(buf),
                    done as u64,
                    (len - done) as u64,
                );
                return Ok(());
            }
            done += r as usize;
        }
        Ok(())
    }

    /// `pwritev_all` for one buffer: plain `pwrite`.
    fn pwrite_one(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError> {
        let guard = buf.ptr_guard();
        let len = guard.len();
        let mut done = 0usize;
        while done < len {
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| i64::try_from(p).ok())
                .ok_or_else(|| BlockError::InvalidArgument("file offset overflows".into()))?;
            // SAFETY: `guard` keeps the VolatileSlice's memory valid for `len` bytes of
            // reads for the whole call; `done < len`, so the pointer and the length stay
            // inside it. pwrite only reads from it. The fd is owned by `self.file`.
            let r = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    len - done,
                    pos,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.err("pwrite", e));
            }
            if r == 0 {
                return Err(self.err("pwrite", io::Error::from(io::ErrorKind::WriteZero)));
            }
            done += r as usize;
        }
        Ok(())
    }

    fn pwritev_all(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        if let [one] = bufs {
            return self.pwrite_one(offset, one);
        }
        let len = total_len(bufs);
        let mut done = 0u64;
        while done < len {
            let part = sub_bufs(bufs, done, len - done);
            let guards: Vec<_> = part.iter().take(IOV_MAX).map(|b| b.ptr_guard()).collect();
            let iov: Vec<libc::iovec> = guards
                .iter()
                .map(|g| libc::iovec {
                    iov_base: g.as_ptr() as *mut libc::c_void,
                    iov_len: g.len(),
                })
                .collect();
            let pos = offset
                .checked_add(done)
                .and_then(|p| i64::try_from(p).ok())
                .ok_or_else(|| BlockError::InvalidArgument("file offset overflows".into()))?;
            // SAFETY: each iovec points to memory of a VolatileSlice whose guard is alive in
            // `guards` for the duration of the call and valid for `iov_len` bytes of reads;
            // pwritev only reads from them. The fd is owned by `self.file`.
            let r = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    pos,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.err("pwritev", e));
            }
            if r == 0 {
                return Err(self.err("pwritev", io::Error::from(io::ErrorKind::WriteZero)));
            }
            done += r as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        loop {
            // SAFETY: plain syscall on an fd we own; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if r == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                    return Ok(false)
                }
                _ => return Err(e),
            }
        }
    }

    /// Deallocates `offset..offset+len` (`FALLOC_FL_PUNCH_HOLE`); the range then reads as
    /// zeroes. Returns `false` if the file system cannot punch holes (nothing was done).
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        self.check_writable()?;
        if len == 0 {
            return Ok(true);
        }
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map_err(|e| self.err("fallocate(PUNCH_HOLE)", e))
    }

    /// Makes `offset..offset+len` read as zeroes without writing data: `ZERO_RANGE`
    /// (keeps the blocks allocated) or, if `may_unmap` or `ZERO_RANGE` is unsupported, a
    /// punched hole. Returns `false` if neither works (nothing was done).
    pub fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> Result<bool, BlockError> {
        self.check_writable()?;
        if len == 0 {
            return Ok(true);
        }
        let file_len = self.len()?;
        if !may_unmap {
            let mode = if offset.saturating_add(len) > file_len {
                libc::FALLOC_FL_ZERO_RANGE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            if self
                .fallocate(mode, offset, len)
                .map_err(|e| self.err("fallocate(ZERO_RANGE)", e))?
            {
                return self.after_write().map(|_| true);
            }
        }
        if offset.saturating_add(len) > file_len {
            // Punching keeps the size: grow the file first so the range exists.
            self.file
                .set_len(offset + len)
                .map_err(|e| self.err("ftruncate", e))?;
        }
        let ok = self.punch_hole(offset, len)?;
        if ok {
            self.after_write()?;
        }
        Ok(ok)
    }

    /// Writes explicit zeroes over `offset..offset+len`.
    pub fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        const CHUNK: u64 = 1 << 20;
        let mut buf = AlignedBuf::new(CHUNK.min(len.max(1)) as usize)
            .map_err(|e| self.err("allocate zero buffer", e))?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            let data = buf.as_mut_slice();
            let s = VolatileSlice::from(&mut data[..n]);
            self.write_vectored_at(offset + done, &[s])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Whether `offset` lies in data (`true`) or a hole (`false`), and where that extent
    /// ends (`SEEK_DATA` / `SEEK_HOLE`). Past EOF is a hole to `u64::MAX`. File systems
    /// without hole reporting show the whole file as data.
    pub fn extent_at(&self, offset: u64) -> Result<(bool, u64), BlockError> {
        let file_len = self.len()?;
        if offset >= file_len {
            return Ok((false, u64::MAX));
        }
        let Ok(off) = i64::try_from(offset) else {
            return Ok((false, u64::MAX));
        };
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on an fd we own; changes only the file position, which this type
        // never uses (all I/O is positioned).
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data after offset: hole to EOF.
                Some(libc::ENXIO) => Ok((false, file_len)),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((true, file_len)),
                _ => Err(self.err("lseek(SEEK_DATA)", e)),
            };
        }
        if data as u64 > offset {
            return Ok((false, data as u64));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        if hole < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    Ok((true, file_len))
                }
                _ => Err(self.err("lseek(SEEK_HOLE)", e)),
            };
        }
        Ok((true, (hole as u64).max(offset + 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_past_eof_is_zero_and_holes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = ImageFile::create(&p).unwrap();
        f.write_at(0, &[7u8; 100]).unwrap();
        let mut buf = [1u8; 200];
        f.read_at(50, &mut buf).unwrap();
        assert!(buf[..50].iter().all(|&b| b == 7));
        assert!(buf[50..].iter().all(|&b| b == 0));
        f.set_len(1 << 20).unwrap();
        let (data, end) = f.extent_at(0).unwrap();
        assert!(data);
        assert!(end >= 100);
        let (data, _) = f.extent_at(512 * 1024).unwrap();
        assert!(!data);
        if f.punch_hole(0, 4096).unwrap() {
            f.read_at(0, &mut buf).unwrap();
            assert!(buf[..100].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [0u8; 16]).unwrap();
        let f = ImageFile::open(&p, true, CacheMode::Writeback).unwrap();
        assert!(matches!(f.write_at(0, &[1]), Err(BlockError::ReadOnly)));
        assert!(f.set_cache_mode(CacheMode::None).is_err());
        f.set_cache_mode(CacheMode::Writethrough).unwrap();
    }
}
