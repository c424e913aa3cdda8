// SPDX-License-Identifier: Apache-2.0 OR MIT
//! qcow2 images, versions 2 and 3.
//!
//! Supported: cluster sizes 512 B .. 2 MiB, every refcount width (1..64 bits) for reading
//! and writing, backing files of any format and chains of them (copy-on-write of partial
//! clusters), zero clusters, discard, compressed clusters (read: deflate and zstd; a write
//! to a compressed cluster decompresses it into a new cluster), extended L2 entries with
//! subclusters (read and write), external data files (read-only), the dirty bit (an image
//! opened read-write with it set is checked and repaired first), and a consistency check
//! with repair of leaked clusters and wrong refcounts ([`Qcow2Backend::check`]).
//!
//! Not supported: encryption, writing images that have internal snapshots (reading them
//! works) and writing images with an external data file.
//!
//! Metadata is guarded by one mutex; data reads and writes to already allocated clusters
//! run outside it.
//!
//! ```
//! use vmkit_block::qcow2::{self, CreateOptions, Qcow2Backend};
//! use vmkit_block::{open_image, read_at, write_at, OpenOptions, raw::RawBackend};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let base = dir.path().join("base.raw");
//! RawBackend::create(&base, 4 << 20)?;
//! let top = dir.path().join("top.qcow2");
//! // Size and backing format come from the backing file.
//! qcow2::create(&top, &CreateOptions { backing_file: Some("base.raw".into()), ..Default::default() })?;
//! let disk = open_image(&top, OpenOptions::new())?;
//! write_at(&*disk, 1000, b"copy-on-write")?;
//! disk.flush()?;
//! drop(disk);
//! let img = Qcow2Backend::open(&top, &OpenOptions::read_only())?;
//! assert!(img.check()?.is_clean());
//! # Ok(())
//! # }
//! ```

mod check;
mod compress;
mod create;
pub mod header;
mod meta;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::VolatileSlice;

use crate::backend::{check_range, scatter, sub_bufs, total_len, zero_bufs};
use crate::detect::{open_backing, resolve_backing_path, OpenOptions};
use crate::file_io::ImageFile;
use crate::{BlockBackend, BlockError, BlockStatus, CacheMode, ImageFormat};

pub use check::CheckReport;
pub use create::{create, CreateOptions};
use header::{
    Header, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
    OFF_AUTOCLEAR, OFF_INCOMPAT,
};
use meta::{Meta, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};

/// Where the bytes of a guest range come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Reads as zeroes (zero cluster/subcluster, or unallocated without backing file).
    Zero,
    /// Unallocated here: the backing file provides the data.
    Backing,
    /// Allocated at this host offset.
    Data(u64),
    /// Compressed cluster: host offset and stored size of the compressed data.
    Compressed(u64, u64),
}

/// A qcow2 image.
pub struct Qcow2Backend {
    path: PathBuf,
    header: Header,
    file: Arc<ImageFile>,
    data_file: Option<ImageFile>,
    backing: Option<Arc<dyn BlockBackend>>,
    backing_path: Option<PathBuf>,
    meta: Mutex<Meta>,
    read_only: bool,
}

impl std::fmt::Debug for Qcow2Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Backend")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("cluster_size", &self.header.cluster_size())
            .field("size", &self.header.size)
            .field("backing", &self.backing_path)
            .finish()
    }
}

fn format_name(name: &str, image: &Path) -> Result<&'static str, BlockError> {
    ImageFormat::from_name(name)
        .map(ImageFormat::name)
        .map_err(|_| BlockError::unsupported(image, format!("backing file format {name:?}")))
}

impl Qcow2Backend {
    /// Opens a qcow2 image (backing files through [`crate::open_image`]'s probing).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self, BlockError> {
        let chain = vec![path.canonicalize().unwrap_or_else(|_| path.to_path_buf())];
        Self::open_in_chain(path, opts, &chain)
    }

    /// Opens an image read-write for [`repair`](Self::repair) even if it is marked
    /// corrupt or dirty (without repairing it on open). Backing files are not opened.
    pub fn open_for_repair(path: &Path) -> Result<Self, BlockError> {
        let chain = vec![path.canonicalize().unwrap_or_else(|_| path.to_path_buf())];
        let opts = OpenOptions {
            no_backing: true,
            ..OpenOptions::new()
        };
        Self::open_impl(path, &opts, &chain, true)
    }

    /// Opens `path` as a member of a backing chain (`chain` ends with `path` itself).
    pub(crate) fn open_in_chain(
        path: &Path,
        opts: &OpenOptions,
        chain: &[PathBuf],
    ) -> Result<Self, BlockError> {
        Self::open_impl(path, opts, chain, false)
    }

    fn open_impl(
        path: &Path,
        opts: &OpenOptions,
        chain: &[PathBuf],
        for_repair: bool,
    ) -> Result<Self, BlockError> {
        let file = ImageFile::open(path, opts.read_only, opts.cache)?;
        let file_len = file.len()?;
        // The cluster size is needed before the whole header cluster can be read.
        let mut head = vec![0u8; 104.min(file_len as usize)];
        file.read_at(0, &mut head)?;
        if head.len() < 24 {
            return Err(BlockError::corrupt(
                path,
                "file too short for a qcow2 header",
            ));
        }
        let cluster_bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(BlockError::corrupt(
                path,
                format!("cluster_bits {cluster_bits} outside 9..=21 (512 B .. 2 MiB)"),
            ));
        }
        let hlen = (1u64 << cluster_bits).min(file_len) as usize;
        let mut hbuf = vec![0u8; hlen];
        file.read_at(0, &mut hbuf)?;
        let header = Header::parse(&hbuf, path, file_len)?;
        let cs = header.cluster_size();

        if !opts.read_only {
            if header.incompatible & INCOMPAT_CORRUPT != 0 && !for_repair {
                return Err(BlockError::corrupt(
                    path,
                    "the image is marked corrupt; open it read-only or repair it with check --repair",
                ));
            }
            if header.nb_snapshots > 0 {
                return Err(BlockError::unsupported(
                    path,
                    format!(
                        "writing an image with {} internal snapshots (open it read-only)",
                        header.nb_snapshots
                    ),
                ));
            }
            if header.incompatible & INCOMPAT_DATA_FILE != 0 {
                return Err(BlockError::unsupported(
                    path,
                    "writing an image with an external data file (open it read-only)",
                ));
            }
        }

        // L1 table.
        let mut l1raw = vec![0u8; header.l1_size as usize * 8];
        file.read_at(header.l1_table_offset, &mut l1raw)?;
        let l1: Vec<u64> = l1raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        // Refcount table.
        let rt_bytes = u64::from(header.refcount_table_clusters) * cs;
        let mut rtraw = vec![0u8; rt_bytes as usize];
        file.read_at(header.refcount_table_offset, &mut rtraw)?;
        let reftable: Vec<u64> = rtraw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();

        let file = Arc::new(file);
        let meta = Meta::new(
            file.clone(),
            path,
            header.cluster_bits,
            header.extended_l2(),
            header.refcount_order,
            l1,
            header.l1_table_offset,
            reftable,
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters),
            file_len,
        );

        // External data file (read-only).
        let data_file = match &header.data_file {
            Some(name) => {
                let p = resolve_backing_path(path, &name.to_string_lossy());
                Some(
                    ImageFile::open(&p, true, opts.cache).map_err(|e| BlockError::Backing {
                        image: path.to_path_buf(),
                        backing: p.clone(),
                        source: Box::new(e),
                    })?,
                )
            }
            None => None,
        };

        // Backing file.
        let mut backing = None;
        let mut backing_path = None;
        if let Some(name) = &header.backing_file {
            let bpath = resolve_backing_path(path, &name.to_string_lossy());
            if !opts.no_backing {
                let fmt = match &header.backing_format {
                    Some(f) => Some(format_name(f, path)?),
                    None => None,
                };
                let b = open_backing(&bpath, fmt, opts, chain).map_err(|e| match e {
                    e @ BlockError::Backing { .. } => e,
                    e => BlockError::Backing {
                        image: path.to_path_buf(),
                        backing: bpath.clone(),
                        source: Box::new(e),
                    },
                })?;
                backing = Some(b);
            }
            backing_path = Some(bpath);
        }

        let backend = Qcow2Backend {
            path: path.to_path_buf(),
            header,
            file,
            data_file,
            backing,
            backing_path,
            meta: Mutex::new(meta),
            read_only: opts.read_only,
        };

        if !opts.read_only {
            let h = &backend.header;
            if h.incompatible & INCOMPAT_DIRTY != 0 && !for_repair {
                log::warn!(
                    "{}: image was not closed cleanly (dirty bit); repairing refcounts",
                    path.display()
                );
                let report = backend.repair()?;
                if !report.is_clean() {
                    return Err(BlockError::corrupt(
                        path,
                        format!("dirty image could not be repaired: {}", report.summary()),
                    ));
                }
                let new = h.incompatible & !INCOMPAT_DIRTY;
                backend.file.write_at(OFF_INCOMPAT, &new.to_be_bytes())?;
            }
            // Autoclear bits we do not maintain (bitmaps) become invalid once we write.
            if h.version == 3 && h.autoclear & !AUTOCLEAR_DATA_FILE_RAW != 0 {
                let keep = h.autoclear & AUTOCLEAR_DATA_FILE_RAW;
                backend.file.write_at(OFF_AUTOCLEAR, &keep.to_be_bytes())?;
            }
            backend.file.flush()?;
        }
        Ok(backend)
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing file's path (resolved), if the image has one.
    pub fn backing_path(&self) -> Option<&Path> {
        self.backing_path.as_deref()
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Subcluster size (the cluster size without extended L2).
    fn sc(&self) -> u64 {
        if self.header.extended_l2() {
            self.cs() / 32
        } else {
            self.cs()
        }
    }

    fn corrupt(&self, r: String) -> BlockError {
        BlockError::corrupt(&self.path, r)
    }

    /// Decodes where byte `in_off` of guest cluster `gc` comes from, and for how many
    /// bytes (to the end of its subcluster / cluster) that holds.
    fn decode(
        &self,
        meta: &Meta,
        gc: u64,
        entry: u64,
        bitmap: u64,
        in_off: u64,
    ) -> Result<(Source, u64), BlockError> {
        let cs = self.cs();
        let unalloc = if self.backing.is_some() {
            Source::Backing
        } else {
            Source::Zero
        };
        if entry & OFLAG_COMPRESSED != 0 {
            let x = 62 - (self.header.cluster_bits - 8);
            let coff = entry & ((1u64 << x) - 1);
            let nsec = ((entry >> x) & ((1u64 << (self.header.cluster_bits - 8)) - 1)) + 1;
            let csize = (nsec * 512).saturating_sub(coff & 511);
            if self.data_file.is_some() {
                return Err(self.corrupt(format!(
                    "guest cluster {gc}: compressed cluster in an image with an external data file"
                )));
            }
            if coff < cs || coff >= meta.file_len {
                return Err(self.corrupt(format!(
                    "guest cluster {gc}: compressed data at 0x{coff:x} lies outside the file"
                )));
            }
            return Ok((Source::Compressed(coff, csize), cs - in_off));
        }
        let host = entry & L2E_OFFSET_MASK;
        if host % cs != 0 {
            return Err(self.corrupt(format!(
                "guest cluster {gc}: data cluster offset 0x{host:x} is not cluster aligned"
            )));
        }
        // QEMU may leave the last cluster partly unwritten (past EOF reads as zeroes),
        // but a cluster that starts past the end of the file is bogus.
        if host != 0 && self.data_file.is_none() && host >= meta.file_len.next_multiple_of(cs) {
            return Err(self.corrupt(format!(
                "guest cluster {gc}: data cluster 0x{host:x} lies past the end of the file ({} bytes)",
                meta.file_len
            )));
        }
        if !self.header.extended_l2() {
            let src = if entry & OFLAG_ZERO != 0 {
                Source::Zero
            } else if host == 0 {
                unalloc
            } else {
                Source::Data(host + in_off)
            };
            return Ok((src, cs - in_off));
        }
        let sc = self.sc();
        let i = in_off / sc;
        let alloc = (bitmap >> i) & 1 != 0;
        let zero = (bitmap >> (32 + i)) & 1 != 0;
        if alloc && zero {
            return Err(self.corrupt(format!(
                "guest cluster {gc}: subcluster {i} is both allocated and zero"
            )));
        }
        if bitmap & 0xffff_ffff != 0 && host == 0 {
            return Err(self.corrupt(format!(
                "guest cluster {gc}: subclusters allocated in an unallocated cluster"
            )));
        }
        let left = (i + 1) * sc - in_off;
        let src = if alloc {
            Source::Data(host + in_off)
        } else if zero {
            Source::Zero
        } else {
            unalloc
        };
        Ok((src, left))
    }

    /// Maps the guest range to sources (under the metadata lock).
    fn map_range(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, Source)>, BlockError> {
        let cs = self.cs();
        let mut out: Vec<(u64, u64, Source)> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let gc = pos / cs;
            let in_off = pos % cs;
            let (entry, bitmap) = meta.l2_entry(gc)?;
            let (src, run) = self.decode(meta, gc, entry, bitmap, in_off)?;
            let n = run.min(end - pos);
            let merged = match (out.last_mut(), src) {
                (Some((_, l, Source::Zero)), Source::Zero)
                | (Some((_, l, Source::Backing)), Source::Backing) => {
                    *l += n;
                    true
                }
                (Some((_, l, Source::Data(h))), Source::Data(h2)) if *h + *l == h2 => {
                    *l += n;
                    true
                }
                _ => false,
            };
            if !merged {
                out.push((pos, n, src));
            }
            pos += n;
        }
        Ok(out)
    }

    /// Reads guest bytes `[g, g+len)` that come from `src` into `bufs` at `skip`.
    fn read_source(
        &self,
        g: u64,
        len: u64,
        src: Source,
        bufs: &[VolatileSlice<'_>],
        skip: u64,
    ) -> Result<(), BlockError> {
        match src {
            Source::Zero => {
                zero_bufs(bufs, skip, len);
                Ok(())
            }
            Source::Backing => self.read_backing(g, len, bufs, skip),
            Source::Data(host) => {
                let part = sub_bufs(bufs, skip, len);
                match &self.data_file {
                    Some(f) => f.read_vectored_at(host, &part),
                    None => self.file.read_vectored_at(host, &part),
                }
            }
            Source::Compressed(coff, csize) => {
                let cs = self.cs();
                let mut cluster = vec![0u8; cs as usize];
                self.read_compressed(coff, csize, &mut cluster)?;
                let start = (g % cs) as usize;
                let data = cluster
                    .get(start..start + len as usize)
                    .ok_or_else(|| self.corrupt("compressed read out of cluster".into()))?;
                scatter(bufs, skip, data);
                Ok(())
            }
        }
    }

    fn read_compressed(&self, coff: u64, csize: u64, out: &mut [u8]) -> Result<(), BlockError> {
        let file_len = self.file.len()?;
        let avail = file_len.saturating_sub(coff).min(csize);
        let mut raw = vec![0u8; avail as usize];
        self.file.read_at(coff, &mut raw)?;
        compress::decompress(self.header.compression, &raw, out, &self.path, coff)
    }

    fn read_backing(
        &self,
        g: u64,
        len: u64,
        bufs: &[VolatileSlice<'_>],
        skip: u64,
    ) -> Result<(), BlockError> {
        let Some(b) = &self.backing else {
            zero_bufs(bufs, skip, len);
            return Ok(());
        };
        let bsize = b.virtual_size();
        let inside = bsize.saturating_sub(g).min(len);
        if inside > 0 {
            b.read_vectored(g, &sub_bufs(bufs, skip, inside))?;
        }
        if inside < len {
            zero_bufs(bufs, skip + inside, len - inside);
        }
        Ok(())
    }

    /// Reads guest range `[g, g+len)` into a host buffer using the current mapping
    /// (used for copy-on-write; called with the lock held).
    fn read_guest_locked(&self, meta: &mut Meta, g: u64, out: &mut [u8]) -> Result<(), BlockError> {
        if out.is_empty() {
            return Ok(());
        }
        let len = out.len() as u64;
        let map = self.map_range(meta, g, len)?;
        let slice = VolatileSlice::from(out);
        let bufs = [slice];
        for (pos, n, src) in map {
            self.read_source(pos, n, src, &bufs, pos - g)?;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            Err(BlockError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Writes `len` bytes of guest cluster `gc` starting at `in_off`, taking the data from
    /// `bufs` at `skip` (or zeroes when `bufs` is `None`). Allocates and copies on write as
    /// needed. Called with the lock held.
    fn cow_write(
        &self,
        meta: &mut Meta,
        gc: u64,
        in_off: u64,
        len: u64,
        data: Option<(&[VolatileSlice<'_>], u64)>,
    ) -> Result<(), BlockError> {
        let cs = self.cs();
        let sc = self.sc();
        let ext = self.header.extended_l2();
        let (entry, bitmap) = meta.l2_entry(gc)?;
        let compressed = entry & OFLAG_COMPRESSED != 0;
        let old_host = if compressed {
            0
        } else {
            entry & L2E_OFFSET_MASK
        };
        if old_host != 0 && entry & OFLAG_COPIED == 0 {
            return Err(self.corrupt(format!(
                "guest cluster {gc}: data cluster 0x{old_host:x} is shared (COPIED flag clear) in an image without snapshots"
            )));
        }
        // The region rewritten: whole subclusters (whole clusters without extended L2,
        // and always for compressed clusters, which become fully allocated).
        let (ra, rb) = if compressed || !ext {
            (0, cs)
        } else {
            (in_off / sc * sc, (in_off + len).div_ceil(sc) * sc)
        };
        let fresh = old_host == 0;
        let host = if fresh {
            meta.alloc_clusters(1)?
        } else {
            old_host
        };
        if meta.data_overlaps_metadata(host + ra, rb - ra) {
            return Err(self.corrupt(format!(
                "guest cluster {gc}: data cluster 0x{host:x} overlaps image metadata"
            )));
        }
        let g0 = gc * cs;
        // Copy-on-write head and tail from the current content. A fresh cluster lies
        // past the old end of the file and already reads as zeroes, so zero sources are
        // skipped there.
        let mut head = vec![0u8; (in_off - ra) as usize];
        let mut tail = vec![0u8; (rb - in_off - len) as usize];
        let head_zero = fresh && self.region_is_zero(meta, gc, entry, bitmap, ra, in_off)?;
        let tail_zero = fresh && self.region_is_zero(meta, gc, entry, bitmap, in_off + len, rb)?;
        if !head_zero {
            self.read_guest_locked(meta, g0 + ra, &mut head)?;
        }
        if !tail_zero {
            self.read_guest_locked(meta, g0 + in_off + len, &mut tail)?;
        }
        let mut zero_data;
        let mut iov: Vec<VolatileSlice<'_>> = Vec::new();
        let mut write_off = host + ra;
        if !head_zero {
            iov.push(VolatileSlice::from(head.as_mut_slice()));
        } else {
            write_off = host + in_off;
        }
        match data {
            Some((bufs, skip)) => iov.extend(sub_bufs(bufs, skip, len)),
            None => {
                zero_data = vec![0u8; len as usize];
                iov.push(VolatileSlice::from(zero_data.as_mut_slice()));
            }
        }
        if !tail_zero {
            iov.push(VolatileSlice::from(tail.as_mut_slice()));
        }
        self.file.write_vectored_at(write_off, &iov)?;
        drop(iov);

        // Point the L2 entry at the data, then drop the old compressed data.
        let new_entry = host | OFLAG_COPIED;
        let new_bitmap = if !ext {
            0
        } else if compressed {
            0xffff_ffff
        } else {
            let mask = sc_mask(ra / sc, rb / sc);
            (bitmap | mask) & !(mask << 32)
        };
        meta.set_l2_entry(gc, new_entry, new_bitmap)?;
        if compressed {
            self.free_compressed(meta, entry)?;
        }
        Ok(())
    }

    /// Whether guest bytes `[a, b)` of cluster `gc` read as zeroes without I/O.
    fn region_is_zero(
        &self,
        meta: &Meta,
        gc: u64,
        entry: u64,
        bitmap: u64,
        a: u64,
        b: u64,
    ) -> Result<bool, BlockError> {
        let mut pos = a;
        while pos < b {
            let (src, run) = self.decode(meta, gc, entry, bitmap, pos)?;
            if src != Source::Zero {
                return Ok(false);
            }
            pos += run;
        }
        Ok(true)
    }

    fn free_compressed(&self, meta: &mut Meta, entry: u64) -> Result<(), BlockError> {
        let cs = self.cs();
        let x = 62 - (self.header.cluster_bits - 8);
        let coff = entry & ((1u64 << x) - 1);
        let nsec = ((entry >> x) & ((1u64 << (self.header.cluster_bits - 8)) - 1)) + 1;
        let start = coff & !511;
        let end = start + nsec * 512;
        for c in start / cs..end.div_ceil(cs) {
            meta.free_cluster(c)?;
        }
        Ok(())
    }

    /// Releases the host storage behind an L2 entry (normal or compressed).
    fn free_entry(&self, meta: &mut Meta, entry: u64) -> Result<(), BlockError> {
        if entry & OFLAG_COMPRESSED != 0 {
            self.free_compressed(meta, entry)
        } else {
            let host = entry & L2E_OFFSET_MASK;
            if host != 0 {
                meta.free_cluster(host / self.cs())?;
            }
            Ok(())
        }
    }

    /// Zeroes `[in_off, in_off+len)` of guest cluster `gc` (lock held).
    fn zero_in_cluster(
        &self,
        meta: &mut Meta,
        gc: u64,
        in_off: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), BlockError> {
        let cs = self.cs();
        let (entry, bitmap) = meta.l2_entry(gc)?;
        if self.region_is_zero(meta, gc, entry, bitmap, in_off, in_off + len)? {
            return Ok(());
        }
        let has_backing = self.backing.is_some();
        let compressed = entry & OFLAG_COMPRESSED != 0;
        let host = if compressed {
            0
        } else {
            entry & L2E_OFFSET_MASK
        };
        if !self.header.extended_l2() {
            if len < cs {
                return self.cow_write(meta, gc, in_off, len, None);
            }
            if self.header.version >= 3 {
                let keep = !may_unmap && host != 0 && entry & OFLAG_COPIED != 0;
                let new = if keep {
                    host | OFLAG_COPIED | OFLAG_ZERO
                } else if has_backing {
                    OFLAG_ZERO
                } else {
                    0
                };
                meta.set_l2_entry(gc, new, 0)?;
                if !keep {
                    self.free_entry(meta, entry)?;
                }
                return Ok(());
            }
            // Version 2 has no zero flag.
            if !has_backing && (may_unmap || host == 0) {
                meta.set_l2_entry(gc, 0, 0)?;
                return self.free_entry(meta, entry);
            }
            return self.cow_write(meta, gc, in_off, len, None);
        }
        // Extended L2: whole subclusters get the zero bit, partial ones are written.
        let sc = self.sc();
        let first_full = in_off.div_ceil(sc);
        let end_full = (in_off + len) / sc;
        if first_full >= end_full || compressed {
            if compressed && in_off == 0 && len == cs {
                meta.set_l2_entry(gc, 0, 0xffff_ffff << 32)?;
                return self.free_entry(meta, entry);
            }
            return self.cow_write(meta, gc, in_off, len, None);
        }
        let head = first_full * sc - in_off;
        let tail = in_off + len - end_full * sc;
        if head > 0 {
            self.cow_write(meta, gc, in_off, head, None)?;
        }
        if tail > 0 {
            self.cow_write(meta, gc, end_full * sc, tail, None)?;
        }
        let (entry, bitmap) = meta.l2_entry(gc)?;
        let host = entry & L2E_OFFSET_MASK;
        let mask = sc_mask(first_full, end_full);
        let alloc = bitmap & 0xffff_ffff & !mask;
        let zero = (bitmap >> 32) | mask;
        let mut new_entry = entry;
        let mut free = false;
        if alloc == 0 && host != 0 && may_unmap {
            new_entry = 0;
            free = true;
        }
        meta.set_l2_entry(gc, new_entry, alloc | (zero << 32))?;
        if free {
            meta.free_cluster(host / cs)?;
        }
        Ok(())
    }

    /// Checks the image's metadata (read-only).
    pub fn check(&self) -> Result<CheckReport, BlockError> {
        let mut meta = self.lock();
        check::check(self, &mut meta, false)
    }

    /// Checks the image and fixes leaked clusters, wrong refcounts and wrong COPIED
    /// flags. Returns the report of a fresh check after the repair.
    pub fn repair(&self) -> Result<CheckReport, BlockError> {
        self.check_writable()?;
        let mut meta = self.lock();
        let pass = check::check(self, &mut meta, true)?;
        meta.drop_caches();
        let mut after = check::check(self, &mut meta, false)?;
        after.fixed = pass.fixed;
        // Only v3 headers have feature bits.
        let cur = if self.header.version >= 3 {
            self.read_incompat()?
        } else {
            0
        };
        if after.is_clean() && cur & (INCOMPAT_CORRUPT | INCOMPAT_DIRTY) != 0 {
            self.file.write_at(
                OFF_INCOMPAT,
                &(cur & !(INCOMPAT_CORRUPT | INCOMPAT_DIRTY)).to_be_bytes(),
            )?;
        }
        self.file.flush()?;
        Ok(after)
    }

    fn read_incompat(&self) -> Result<u64, BlockError> {
        let mut b = [0u8; 8];
        self.file.read_at(OFF_INCOMPAT, &mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

/// Bits `a..b` of a 32-bit subcluster mask.
fn sc_mask(a: u64, b: u64) -> u64 {
    let hi = if b >= 32 {
        0xffff_ffff
    } else {
        (1u64 << b) - 1
    };
    let lo = (1u64 << a) - 1;
    hi & !lo
}

impl BlockBackend for Qcow2Backend {
    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let len = total_len(bufs);
        check_range(offset, len, self.header.size)?;
        let map = {
            let mut meta = self.lock();
            self.map_range(&mut meta, offset, len)?
        };
        for (pos, n, src) in map {
            self.read_source(pos, n, src, bufs, pos - offset)?;
        }
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        self.check_writable()?;
        let len = total_len(bufs);
        check_range(offset, len, self.header.size)?;
        let cs = self.cs();
        let mut pos = 0u64;
        // Runs of clusters already allocated contiguously are written with one pwritev.
        let mut run: Option<(u64, u64, u64)> = None; // (buf skip, host, len)
        while pos < len {
            let g = offset + pos;
            let gc = g / cs;
            let in_off = g % cs;
            let n = (cs - in_off).min(len - pos);
            let mut meta = self.lock();
            let (entry, bitmap) = meta.l2_entry(gc)?;
            let direct = self.direct_target(&meta, entry, bitmap, in_off, n);
            match direct {
                Some(host) if !meta.data_overlaps_metadata(host, n) => {
                    drop(meta);
                    run = match run {
                        Some((s, h, l)) if h + l == host => Some((s, h, l + n)),
                        Some((s, h, l)) => {
                            self.file.write_vectored_at(h, &sub_bufs(bufs, s, l))?;
                            Some((pos, host, n))
                        }
                        None => Some((pos, host, n)),
                    };
                }
                _ => {
                    if let Some((s, h, l)) = run.take() {
                        drop(meta);
                        self.file.write_vectored_at(h, &sub_bufs(bufs, s, l))?;
                        meta = self.lock();
                    }
                    // The metadata may have changed while the lock was dropped.
                    let (entry, bitmap) = meta.l2_entry(gc)?;
                    if self.fresh_full(entry, bitmap, in_off, n) {
                        pos += self.write_fresh_clusters(&mut meta, gc, bufs, pos, len)?;
                        continue;
                    }
                    self.cow_write(&mut meta, gc, in_off, n, Some((bufs, pos)))?;
                }
            }
            pos += n;
        }
        if let Some((s, h, l)) = run {
            self.file.write_vectored_at(h, &sub_bufs(bufs, s, l))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        let _meta = self.lock();
        self.file.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(offset, len, self.header.size)?;
        let cs = self.cs();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let gc = pos / cs;
            let in_off = pos % cs;
            let mut meta = self.lock();
            if self.backing.is_none() && !meta.has_l2_table(gc) {
                // The whole L2 range is unallocated and reads as zeroes already.
                let span = meta.l2_entries() * cs;
                pos = (pos / span + 1).saturating_mul(span).min(end);
                continue;
            }
            let n = (cs - in_off).min(end - pos);
            self.zero_in_cluster(&mut meta, gc, in_off, n, may_unmap)?;
            pos += n;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        let size = self.header.size;
        if offset >= size {
            return Err(BlockError::OutOfRange { offset, len, size });
        }
        let len = len.min(size - offset).max(1);
        let map = {
            let mut meta = self.lock();
            // Map at most a few thousand clusters ahead.
            let window = len.min(self.cs() * 4096);
            self.map_range(&mut meta, offset, window)?
        };
        let Some(&(_, _, first)) = map.first() else {
            return Err(BlockError::OutOfRange { offset, len, size });
        };
        let same = |a: Source, b: Source| {
            matches!(
                (a, b),
                (Source::Zero, Source::Zero)
                    | (Source::Backing, Source::Backing)
                    | (Source::Data(_), Source::Data(_))
                    | (Source::Compressed(..), Source::Compressed(..))
                    | (Source::Data(_), Source::Compressed(..))
                    | (Source::Compressed(..), Source::Data(_))
            )
        };
        let extent: u64 = map
            .iter()
            .take_while(|(_, _, s)| same(*s, first))
            .map(|(_, n, _)| *n)
            .sum();
        let (allocated, zero, extent) = match first {
            Source::Zero => (
                // Explicit zeroes in this image, or unallocated and no backing file.
                self.backing.is_some() || self.lock_is_allocated(offset)?,
                true,
                extent,
            ),
            Source::Data(_) | Source::Compressed(..) => (true, false, extent),
            Source::Backing => {
                let b = self
                    .backing
                    .as_ref()
                    .ok_or_else(|| self.corrupt("backing source without a backing file".into()))?;
                if offset >= b.virtual_size() {
                    (false, true, extent)
                } else {
                    let st = b.block_status(offset, extent.min(b.virtual_size() - offset))?;
                    (st.allocated, st.zero, st.len)
                }
            }
        };
        Ok(BlockStatus {
            offset,
            len: extent.clamp(1, len),
            allocated,
            zero,
        })
    }

    fn cache_mode(&self) -> CacheMode {
        self.file.cache_mode()
    }

    fn set_cache_mode(&self, mode: CacheMode) -> Result<(), BlockError> {
        self.file.set_cache_mode(mode)
    }

    fn backing_chain(&self) -> Vec<(PathBuf, &'static str)> {
        let mut v = Vec::new();
        if let (Some(p), Some(b)) = (&self.backing_path, &self.backing) {
            v.push((p.clone(), b.format()));
            v.extend(b.backing_chain());
        } else if let Some(p) = &self.backing_path {
            v.push((p.clone(), "unknown"));
        }
        v
    }

    fn allocated_size(&self) -> Option<u64> {
        let own = self.file.allocated_bytes().ok()?;
        let data = match &self.data_file {
            Some(f) => f.allocated_bytes().ok()?,
            None => 0,
        };
        Some(own + data)
    }
}

impl Qcow2Backend {
    /// Host offset for a write of `n` bytes at `in_off` into a cluster that needs no
    /// metadata change, if that is the case.
    fn direct_target(
        &self,
        meta: &Meta,
        entry: u64,
        bitmap: u64,
        in_off: u64,
        n: u64,
    ) -> Option<u64> {
        if entry & OFLAG_COMPRESSED != 0 || entry & OFLAG_COPIED == 0 || self.data_file.is_some() {
            return None;
        }
        let host = entry & L2E_OFFSET_MASK;
        let cs = self.cs();
        if host == 0 || host % cs != 0 || host >= meta.file_len.next_multiple_of(cs) {
            return None;
        }
        if !self.header.extended_l2() {
            if entry & OFLAG_ZERO != 0 {
                return None;
            }
            return Some(host + in_off);
        }
        let sc = self.sc();
        let mask = sc_mask(in_off / sc, (in_off + n).div_ceil(sc));
        if bitmap & mask == mask && (bitmap >> 32) & mask == 0 {
            Some(host + in_off)
        } else {
            None
        }
    }

    /// Whether a write of `n` bytes at `in_off` into a cluster with this L2 entry covers
    /// the whole cluster and finds no host cluster to reuse or free: it can then take a
    /// fresh cluster without copy-on-write ([`Self::write_fresh_clusters`]).
    fn fresh_full(&self, entry: u64, bitmap: u64, in_off: u64, n: u64) -> bool {
        if in_off != 0 || n != self.cs() || self.data_file.is_some() {
            return false;
        }
        if self.header.extended_l2() {
            // Unallocated: no host cluster and no allocated subcluster (zero bits may be
            // set; the write replaces them).
            entry == 0 && bitmap & 0xffff_ffff == 0
        } else {
            // Unallocated, or a v3 zero cluster without a preallocated host cluster.
            entry == 0 || entry == OFLAG_ZERO
        }
    }

    /// Writes the run of whole guest clusters starting at `gc` (bytes `pos..` of `bufs`,
    /// at most `len - pos`) that [`Self::fresh_full`] accepts, into newly allocated
    /// contiguous host clusters: one refcount update per refcount block, one data write
    /// and one L2 update per L2 table, in that order (refcounts are raised before anything
    /// points at the clusters). Returns the bytes written (at least one cluster). Called
    /// with the lock held; the first cluster must already be known to qualify.
    fn write_fresh_clusters(
        &self,
        meta: &mut Meta,
        gc: u64,
        bufs: &[VolatileSlice<'_>],
        pos: u64,
        len: u64,
    ) -> Result<u64, BlockError> {
        /// Largest run allocated at once (64 MiB with 64 KiB clusters).
        const MAX_RUN: u64 = 1024;
        let cs = self.cs();
        let mut k = 1u64;
        while k < MAX_RUN && pos + (k + 1) * cs <= len {
            let (e, b) = meta.l2_entry(gc + k)?;
            if !self.fresh_full(e, b, 0, cs) {
                break;
            }
            k += 1;
        }
        let bytes = k * cs;
        let host = meta.alloc_clusters(k)?;
        if meta.data_overlaps_metadata(host, bytes) {
            return Err(self.corrupt(format!(
                "guest cluster {gc}: new data clusters at 0x{host:x} overlap image metadata"
            )));
        }
        self.file
            .write_vectored_at(host, &sub_bufs(bufs, pos, bytes))?;
        let bitmap = if self.header.extended_l2() {
            0xffff_ffff
        } else {
            0
        };
        meta.set_l2_range(gc, k, host | OFLAG_COPIED, cs, bitmap)?;
        Ok(bytes)
    }

    /// Whether guest byte `offset` is a zero cluster/subcluster recorded in this image
    /// (as opposed to unallocated).
    fn lock_is_allocated(&self, offset: u64) -> Result<bool, BlockError> {
        let cs = self.cs();
        let mut meta = self.lock();
        let (entry, bitmap) = meta.l2_entry(offset / cs)?;
        if !self.header.extended_l2() {
            return Ok(entry & OFLAG_ZERO != 0);
        }
        let i = (offset % cs) / self.sc();
        Ok((bitmap >> (32 + i)) & 1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_at, write_at};

    /// Whole-cluster writes into unallocated clusters take the batched path: one run of
    /// contiguous host clusters, refcounts and L2 entries written per block / table.
    /// Standard L2 with 512-byte clusters: a 300 KiB write crosses many L2 tables (64
    /// entries each) and refcount blocks (256 entries with 16-bit refcounts), and new
    /// refcount blocks are allocated in the middle of the run. Extended L2 with 16 KiB
    /// clusters (1024 entries per table, 2048 per 64-bit refcount block): two 20 MiB
    /// writes cross both.
    #[test]
    fn batched_allocation_crosses_tables() {
        for ext in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("b.qcow2");
            let (cluster_size, refcount_bits, len, second) = if ext {
                (16384, 64, 20 << 20, 40 << 20)
            } else {
                (512, 16, 300 << 10, 4 << 20)
            };
            create(
                &p,
                &CreateOptions {
                    cluster_size,
                    refcount_bits,
                    extended_l2: ext,
                    ..CreateOptions::new(64 << 20)
                },
            )
            .unwrap();
            let img = Qcow2Backend::open(&p, &OpenOptions::new()).unwrap();
            let cs = img.cs();
            let data: Vec<u8> = (0..len as u32).map(|i| (i % 253) as u8 + 1).collect();
            // Unaligned start: a partial head cluster, then whole clusters, then a tail.
            let off = 3 * cs + 100;
            write_at(&img, off, &data).unwrap();
            // A second run that must not reuse the first one's clusters.
            write_at(&img, second, &data).unwrap();
            let mut back = vec![0u8; data.len()];
            read_at(&img, off, &mut back).unwrap();
            assert!(back == data, "ext={ext}: first run reads back");
            read_at(&img, second, &mut back).unwrap();
            assert!(back == data, "ext={ext}: second run reads back");
            let mut before = vec![1u8; 100];
            read_at(&img, 3 * cs, &mut before).unwrap();
            assert!(before.iter().all(|&b| b == 0), "ext={ext}: head stays zero");
            // The whole clusters of the first write are fully allocated, in ascending
            // host order (runs are contiguous; L2 tables and refcount blocks allocated on
            // the way sit between runs).
            let mut meta = img.lock();
            let last_gc = (off + data.len() as u64) / cs - 1;
            let mut prev = 0;
            for gc in 4..last_gc {
                let (e, b) = meta.l2_entry(gc).unwrap();
                let host = e & L2E_OFFSET_MASK;
                assert_eq!(e, host | OFLAG_COPIED, "ext={ext} gc={gc}");
                assert!(
                    host > prev,
                    "ext={ext} gc={gc}: 0x{host:x} after 0x{prev:x}"
                );
                assert_eq!(b, if ext { 0xffff_ffff } else { 0 });
                prev = host;
            }
            drop(meta);
            let rep = img.check().unwrap();
            assert!(rep.is_clean(), "ext={ext}: {}", rep.summary());
            drop(img);
            // Reopened from disk (no cached metadata), the data is the same.
            let img = Qcow2Backend::open(&p, &OpenOptions::read_only()).unwrap();
            read_at(&img, off, &mut back).unwrap();
            assert!(back == data, "ext={ext}: reads back after reopen");
            assert!(img.check().unwrap().is_clean());
        }
    }
}
