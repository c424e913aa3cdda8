// SPDX-License-Identifier: Apache-2.0 OR MIT
//! VPC / VHD images (Microsoft Virtual PC, Hyper-V generation 1): fixed and dynamic.
//!
//! A **fixed** VHD is the raw disk followed by a 512-byte [footer](footer::Footer). A
//! **dynamic** VHD starts with a copy of the footer, then a
//! [dynamic header](dynamic::DynHeader) ("cxsparse") naming the block allocation table
//! (BAT), a big-endian array with one 32-bit sector number per block (all ones =
//! unallocated). Each allocated block is a sector bitmap (one bit per 512-byte sector;
//! 0 reads as zeroes) followed by the block's data; the footer follows the last block.
//!
//! New blocks are appended where the trailing footer was: the footer is rewritten after
//! the new block, then the bitmap and data are written, and only then the BAT entry, so a
//! crash never leaves a BAT entry pointing at unwritten space. Discard and write-zeroes
//! punch holes in (or zero) allocated data; blocks are never returned to the unallocated
//! state (VHD has no free-space tracking).
//!
//! The virtual size follows QEMU's rule ([`footer::Footer::virtual_size`]): the CHS
//! geometry for images from Virtual PC and QEMU's classic creator, `current_size` for
//! Hyper-V and friends. [`VpcBackend::create`] rounds the size up to a CHS geometry unless
//! [`VpcCreateOptions::force_size`] is set, exactly as `qemu-img create -f vpc` does.
//!
//! Differencing disks (type 4) are refused with [`BlockError::Unsupported`].
//!
//! ```
//! use vmkit_block::vpc::{VpcBackend, VpcCreateOptions};
//! use vmkit_block::{read_at, write_at, BlockBackend, CacheMode};
//!
//! # fn main() -> Result<(), vmkit_block::BlockError> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("disk.vhd");
//! VpcBackend::create(&path, 10 << 20, &VpcCreateOptions::default())?;
//! let disk = VpcBackend::open(&path, false, CacheMode::Writeback)?;
//! assert_eq!(disk.virtual_size(), 10_514_432); // CHS-rounded, like qemu-img
//! write_at(&disk, 3 << 20, b"hello")?;
//! let mut buf = [0u8; 5];
//! read_at(&disk, 3 << 20, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! disk.flush()?;
//! # Ok(())
//! # }
//! ```

pub mod dynamic;
pub mod footer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use vm_memory::VolatileSlice;

use crate::backend::{check_range, sub_bufs, total_len, zero_bufs};
use crate::file_io::ImageFile;
use crate::{BlockBackend, BlockError, BlockStatus, CacheMode};

use dynamic::{DynHeader, BAT_UNALLOCATED, DEFAULT_BLOCK_SIZE, DYN_HEADER_SIZE, MAX_BLOCK_SIZE};
use footer::{
    chs_geometry, chs_rounded_sectors, DiskType, Footer, FOOTER_SIZE, MAX_SECTORS, NO_DATA_OFFSET,
    VHD_EPOCH,
};

const SECTOR: u64 = 512;

/// Kind of VHD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VpcSubformat {
    /// Preallocated: the data, then the footer.
    Fixed,
    /// Sparse: blocks allocated on first write.
    #[default]
    Dynamic,
}

/// Options of [`VpcBackend::create`].
#[derive(Clone, Debug)]
pub struct VpcCreateOptions {
    /// Fixed or dynamic.
    pub subformat: VpcSubformat,
    /// Block size of a dynamic disk (power of two, 512 B .. 1 GiB; default 2 MiB, the
    /// only size Virtual PC and QEMU write).
    pub block_size: u32,
    /// Keep the requested size exactly (rounded up to 512 bytes) instead of rounding it
    /// up to a CHS geometry. The footer then names the creator "qem2", which QEMU (and
    /// this crate) read as "the size is `current_size`".
    pub force_size: bool,
}

impl Default for VpcCreateOptions {
    fn default() -> Self {
        VpcCreateOptions {
            subformat: VpcSubformat::Dynamic,
            block_size: DEFAULT_BLOCK_SIZE,
            force_size: false,
        }
    }
}

/// What a block's sector bitmap says.
#[derive(Clone, Debug)]
enum Bitmap {
    /// Every sector of the block holds data.
    Full,
    /// Some sectors read as zeroes: the bitmap bytes (MSB first, bit set = data).
    Partial(Arc<Vec<u8>>),
}

impl Bitmap {
    fn from_bytes(bytes: Vec<u8>, sectors: u64) -> Bitmap {
        let full_bytes = (sectors / 8) as usize;
        let rest = (sectors % 8) as u32;
        let mut full = bytes
            .get(..full_bytes)
            .is_some_and(|b| b.iter().all(|&x| x == 0xff));
        if full && rest > 0 {
            let mask = !(0xffu8 >> rest);
            full = bytes.get(full_bytes).is_some_and(|&b| b & mask == mask);
        }
        if full {
            Bitmap::Full
        } else {
            Bitmap::Partial(Arc::new(bytes))
        }
    }

    fn is_set(&self, sector: u64) -> bool {
        match self {
            Bitmap::Full => true,
            Bitmap::Partial(b) => b
                .get((sector / 8) as usize)
                .is_some_and(|&x| x & (0x80 >> (sector % 8)) != 0),
        }
    }
}

fn set_bit(bytes: &mut [u8], sector: u64) {
    if let Some(x) = bytes.get_mut((sector / 8) as usize) {
        *x |= 0x80 >> (sector % 8);
    }
}

/// Mutable metadata of a dynamic disk.
#[derive(Debug)]
struct DynMeta {
    /// BAT in host order.
    bat: Vec<u32>,
    /// Where the next block goes (the trailing footer's position).
    next_free: u64,
}

#[derive(Debug)]
struct Dynamic {
    block_size: u64,
    bitmap_size: u64,
    bat_offset: u64,
    meta: RwLock<DynMeta>,
    /// Sector bitmaps read so far (by block index).
    bitmaps: Mutex<HashMap<u32, Bitmap>>,
}

/// A VHD image (fixed or dynamic) opened for I/O.
#[derive(Debug)]
pub struct VpcBackend {
    file: ImageFile,
    size: u64,
    footer: Footer,
    dynamic: Option<Dynamic>,
}

/// One piece of a request that stays inside one block.
struct Chunk {
    block: u64,
    in_block: u64,
    len: u64,
    /// Offset of this piece inside the request.
    skip: u64,
}

fn chunks(offset: u64, len: u64, block_size: u64) -> impl Iterator<Item = Chunk> {
    let mut pos = offset;
    let end = offset + len;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let block = pos / block_size;
        let in_block = pos % block_size;
        let n = (block_size - in_block).min(end - pos);
        let c = Chunk {
            block,
            in_block,
            len: n,
            skip: pos - offset,
        };
        pos += n;
        Some(c)
    })
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut out = [0u8; N];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .is_ok();
    if !ok {
        // Fall back to the clock and the process id: unique enough for a disk id.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seed = t ^ (u128::from(std::process::id()) << 64);
        for (i, b) in out.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    out
}

fn poisoned<T>(r: std::sync::LockResult<T>) -> T {
    r.unwrap_or_else(|p| p.into_inner())
}

impl VpcBackend {
    /// Creates a VHD of (at least) `size` bytes at `path`, replacing any file there.
    ///
    /// Unless `opts.force_size` is set, the size is rounded up to a CHS geometry as
    /// `qemu-img create -f vpc` does; [`virtual_size`](BlockBackend::virtual_size) of the
    /// opened image tells the result. Sizes above 2040 GiB are refused.
    pub fn create(path: &Path, size: u64, opts: &VpcCreateOptions) -> Result<(), BlockError> {
        let requested = size.div_ceil(SECTOR);
        let (total, geo, app) = if opts.force_size {
            (requested, chs_geometry(requested), *b"qem2")
        } else {
            let (t, g) = chs_rounded_sectors(requested);
            (t, g, *b"vmkt")
        };
        if total > MAX_SECTORS {
            return Err(BlockError::InvalidArgument(format!(
                "{}: VHD disks hold at most 2040 GiB, {size} bytes requested",
                path.display()
            )));
        }
        let bytes = total * SECTOR;
        let block_size = opts.block_size;
        if opts.subformat == VpcSubformat::Dynamic
            && (block_size < 512 || !block_size.is_power_of_two() || block_size > MAX_BLOCK_SIZE)
        {
            return Err(BlockError::InvalidArgument(format!(
                "VHD block size {block_size} must be a power of two between 512 and {MAX_BLOCK_SIZE}"
            )));
        }
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(VHD_EPOCH) as u32)
            .unwrap_or(0);
        let mut footer = Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: NO_DATA_OFFSET,
            timestamp,
            creator_app: app,
            creator_version: 0x0001_0000,
            creator_os: u32::from_be_bytes(*b"Wi2k"),
            original_size: bytes,
            current_size: bytes,
            cylinders: geo.0,
            heads: geo.1,
            sectors_per_track: geo.2,
            disk_type: DiskType::Fixed,
            checksum: 0,
            uuid: random_bytes::<16>(),
            saved_state: 0,
        };
        let f = ImageFile::create(path)?;
        match opts.subformat {
            VpcSubformat::Fixed => {
                f.set_len(bytes)?;
                f.write_at(bytes, &footer.to_bytes())?;
            }
            VpcSubformat::Dynamic => {
                footer.disk_type = DiskType::Dynamic;
                footer.data_offset = FOOTER_SIZE as u64;
                let entries = bytes.div_ceil(u64::from(block_size));
                let entries32 = u32::try_from(entries).map_err(|_| {
                    BlockError::InvalidArgument(format!(
                        "{size} bytes need {entries} VHD blocks of {block_size} bytes, more than a BAT holds"
                    ))
                })?;
                let table_offset = (FOOTER_SIZE + DYN_HEADER_SIZE) as u64;
                let table_bytes = (entries * 4).next_multiple_of(SECTOR);
                let header = DynHeader::new(table_offset, entries32, block_size);
                let fb = footer.to_bytes();
                f.write_at(0, &fb)?;
                f.write_at(FOOTER_SIZE as u64, &header.to_bytes())?;
                let bat = vec![0xffu8; table_bytes as usize];
                f.write_at(table_offset, &bat)?;
                f.write_at(table_offset + table_bytes, &fb)?;
            }
        }
        f.sync()
    }

    /// Opens the VHD at `path`. Nothing is written during open.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, BlockError> {
        let file = ImageFile::open(path, read_only, cache)?;
        Self::from_image_file(file)
    }

    /// Opens a VHD from an already open [`ImageFile`].
    pub fn from_image_file(file: ImageFile) -> Result<Self, BlockError> {
        let path = file.path().to_path_buf();
        let corrupt = |reason: String| BlockError::corrupt(&path, reason);
        let file_len = file.len()?;
        if file_len < FOOTER_SIZE as u64 {
            return Err(corrupt(format!(
                "file is {file_len} bytes, too short for a VHD footer"
            )));
        }
        let mut buf = [0u8; FOOTER_SIZE];
        file.read_at(file_len - FOOTER_SIZE as u64, &mut buf)?;
        let (footer, footer_at_end) = match Footer::parse(&buf) {
            Ok(f) => (f, true),
            Err(tail_err) => {
                // Dynamic disks keep a copy of the footer at offset 0.
                file.read_at(0, &mut buf)?;
                match Footer::parse(&buf) {
                    Ok(f) if f.disk_type != DiskType::Fixed => (f, false),
                    _ => return Err(corrupt(format!("{tail_err} (at the end of the file)"))),
                }
            }
        };
        if footer.disk_type == DiskType::Differencing {
            return Err(BlockError::unsupported(
                &path,
                "differencing VHD images are not supported",
            ));
        }
        let size = footer.virtual_size();
        if size / SECTOR > MAX_SECTORS {
            return Err(BlockError::unsupported(
                &path,
                format!("VHD virtual size {size} is above the 2040 GiB limit of the format"),
            ));
        }
        let data_limit = if footer_at_end {
            file_len - FOOTER_SIZE as u64
        } else {
            file_len
        };
        let dynamic = match footer.disk_type {
            DiskType::Fixed => {
                if size > data_limit {
                    return Err(corrupt(format!(
                        "fixed VHD of {size} bytes but the file holds only {data_limit} bytes of data (truncated?)"
                    )));
                }
                None
            }
            _ => Some(Self::open_dynamic(&file, &footer, size, data_limit)?),
        };
        Ok(VpcBackend {
            file,
            size,
            footer,
            dynamic,
        })
    }

    fn open_dynamic(
        file: &ImageFile,
        footer: &Footer,
        size: u64,
        data_limit: u64,
    ) -> Result<Dynamic, BlockError> {
        let path = file.path().to_path_buf();
        let corrupt = |reason: String| BlockError::corrupt(&path, reason);
        let hoff = footer.data_offset;
        let hend = hoff
            .checked_add(DYN_HEADER_SIZE as u64)
            .filter(|&e| e <= data_limit && hoff >= FOOTER_SIZE as u64)
            .ok_or_else(|| {
                corrupt(format!(
                    "dynamic header offset {hoff:#x} lies outside the file ({data_limit} data bytes)"
                ))
            })?;
        let mut hb = [0u8; DYN_HEADER_SIZE];
        file.read_at(hoff, &mut hb)?;
        let header = DynHeader::parse(&hb).map_err(&corrupt)?;
        let block_size = u64::from(header.block_size);
        let bitmap_size = header.bitmap_size();
        let entries = u64::from(header.max_table_entries);
        if entries * block_size < size {
            return Err(corrupt(format!(
                "BAT of {entries} blocks of {block_size} bytes is too small for a disk of {size} bytes"
            )));
        }
        let toff = header.table_offset;
        let tbytes = entries * 4;
        let tend = toff
            .checked_add(tbytes)
            .filter(|&e| e <= data_limit && toff >= FOOTER_SIZE as u64)
            .ok_or_else(|| {
                corrupt(format!(
                    "BAT at {toff:#x} with {entries} entries lies outside the file ({data_limit} data bytes)"
                ))
            })?;
        if toff < hend && hoff < tend {
            return Err(corrupt(format!(
                "BAT at {toff:#x} overlaps the dynamic header at {hoff:#x}"
            )));
        }
        let tbytes_usize = usize::try_from(tbytes)
            .map_err(|_| corrupt(format!("BAT of {entries} entries is too large")))?;
        let mut raw = vec![0u8; tbytes_usize];
        file.read_at(toff, &mut raw)?;
        let bat = dynamic::parse_bat(&raw);
        drop(raw);
        // Metadata: the footer copy, the dynamic header and the BAT.
        let meta_ranges = [
            (0u64, FOOTER_SIZE as u64),
            (hoff, hend),
            (toff, tend.next_multiple_of(SECTOR)),
        ];
        let span = bitmap_size + block_size;
        let mut blocks: Vec<(u64, u64, usize)> = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            if e == BAT_UNALLOCATED {
                continue;
            }
            let start = u64::from(e) * SECTOR;
            let end = start + span;
            if end > data_limit {
                return Err(corrupt(format!(
                    "BAT entry {i} points at sector {e} (offset {start:#x}): the block ends past the data area ({data_limit} bytes)"
                )));
            }
            if let Some((ms, me)) = meta_ranges.iter().find(|(ms, me)| start < *me && *ms < end) {
                return Err(corrupt(format!(
                    "BAT entry {i} (offset {start:#x}) overlaps image metadata at {ms:#x}..{me:#x}"
                )));
            }
            blocks.push((start, end, i));
        }
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            if let [a, b] = w {
                if b.0 < a.1 {
                    return Err(corrupt(format!(
                        "BAT entries {} and {} point at overlapping blocks ({:#x} and {:#x})",
                        a.2, b.2, a.0, b.0
                    )));
                }
            }
        }
        let meta_end = meta_ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let next_free = data_limit
            .max(meta_end)
            .max(blocks.last().map(|b| b.1).unwrap_or(0))
            .next_multiple_of(SECTOR);
        Ok(Dynamic {
            block_size,
            bitmap_size,
            bat_offset: toff,
            meta: RwLock::new(DynMeta { bat, next_free }),
            bitmaps: Mutex::new(HashMap::new()),
        })
    }

    /// Fixed or dynamic.
    pub fn subformat(&self) -> VpcSubformat {
        if self.dynamic.is_some() {
            VpcSubformat::Dynamic
        } else {
            VpcSubformat::Fixed
        }
    }

    /// Block size of a dynamic disk (`None` for fixed disks).
    pub fn block_size(&self) -> Option<u64> {
        self.dynamic.as_ref().map(|d| d.block_size)
    }

    /// The footer as read at open.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.file.is_read_only() {
            Err(BlockError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn sectors_per_block(d: &Dynamic) -> u64 {
        d.block_size / SECTOR
    }

    /// The sector bitmap of allocated block `idx` whose BAT entry is `entry`.
    fn bitmap(&self, d: &Dynamic, idx: u32, entry: u32) -> Result<Bitmap, BlockError> {
        if let Some(b) = poisoned(d.bitmaps.lock()).get(&idx) {
            return Ok(b.clone());
        }
        let mut bytes = vec![0u8; d.bitmap_size as usize];
        self.file.read_at(u64::from(entry) * SECTOR, &mut bytes)?;
        let bm = Bitmap::from_bytes(bytes, Self::sectors_per_block(d));
        poisoned(d.bitmaps.lock()).insert(idx, bm.clone());
        Ok(bm)
    }

    fn data_offset(d: &Dynamic, entry: u32, in_block: u64) -> u64 {
        u64::from(entry) * SECTOR + d.bitmap_size + in_block
    }

    fn read_dynamic(
        &self,
        d: &Dynamic,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
    ) -> Result<(), BlockError> {
        let len = total_len(bufs);
        let meta = poisoned(d.meta.read());
        for c in chunks(offset, len, d.block_size) {
            let idx = c.block as usize;
            let entry = meta.bat.get(idx).copied().unwrap_or(BAT_UNALLOCATED);
            if entry == BAT_UNALLOCATED {
                zero_bufs(bufs, c.skip, c.len);
                continue;
            }
            let bm = self.bitmap(d, idx as u32, entry)?;
            match bm {
                Bitmap::Full => {
                    let part = sub_bufs(bufs, c.skip, c.len);
                    self.file
                        .read_vectored_at(Self::data_offset(d, entry, c.in_block), &part)?;
                }
                Bitmap::Partial(_) => {
                    // Runs of sectors with the same bit.
                    let mut pos = c.in_block;
                    let end = c.in_block + c.len;
                    while pos < end {
                        let set = bm.is_set(pos / SECTOR);
                        let mut run_end = (pos / SECTOR + 1) * SECTOR;
                        while run_end < end && bm.is_set(run_end / SECTOR) == set {
                            run_end += SECTOR;
                        }
                        let run_end = run_end.min(end);
                        let skip = c.skip + (pos - c.in_block);
                        if set {
                            let part = sub_bufs(bufs, skip, run_end - pos);
                            self.file
                                .read_vectored_at(Self::data_offset(d, entry, pos), &part)?;
                        } else {
                            zero_bufs(bufs, skip, run_end - pos);
                        }
                        pos = run_end;
                    }
                }
            }
        }
        Ok(())
    }

    /// Orders data before the metadata that makes it visible (unless the cache mode
    /// never syncs).
    fn barrier(&self) -> Result<(), BlockError> {
        if self.file.cache_mode().flush_syncs() {
            self.file.sync()
        } else {
            Ok(())
        }
    }

    /// Allocates block `idx` and writes `part` (the bytes of the chunk) into it. Called
    /// with the metadata write lock held.
    fn allocate_block(
        &self,
        d: &Dynamic,
        meta: &mut DynMeta,
        c: &Chunk,
        part: &[VolatileSlice<'_>],
    ) -> Result<(), BlockError> {
        let path = self.file.path();
        let start = meta.next_free;
        let end = start + d.bitmap_size + d.block_size;
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&s| s != BAT_UNALLOCATED)
            .ok_or_else(|| {
                BlockError::unsupported(
                    path,
                    "the VHD file has reached the largest offset its BAT can address",
                )
            })?;
        // 1. The footer moves past the new block (extending the file with zeroes).
        self.file.write_at(end, &self.footer.to_bytes())?;
        // 2. The bitmap: every sector holds data (the rest of the block is zeroes).
        let bitmap = vec![0xffu8; d.bitmap_size as usize];
        self.file.write_at(start, &bitmap)?;
        // 3. The data.
        self.file
            .write_vectored_at(Self::data_offset(d, sector, c.in_block), part)?;
        // 4. Only then the BAT entry.
        self.barrier()?;
        let idx = c.block as usize;
        self.file
            .write_at(d.bat_offset + 4 * c.block, &sector.to_be_bytes())?;
        if let Some(e) = meta.bat.get_mut(idx) {
            *e = sector;
        }
        meta.next_free = end;
        poisoned(d.bitmaps.lock()).insert(idx as u32, Bitmap::Full);
        Ok(())
    }

    /// Writes a chunk into an allocated block whose bitmap has clear bits, setting them.
    fn write_partial_block(
        &self,
        d: &Dynamic,
        entry: u32,
        c: &Chunk,
        part: &[VolatileSlice<'_>],
        bm: &Bitmap,
    ) -> Result<(), BlockError> {
        let Bitmap::Partial(bytes) = bm else {
            return self
                .file
                .write_vectored_at(Self::data_offset(d, entry, c.in_block), part);
        };
        let first = c.in_block / SECTOR;
        let last = (c.in_block + c.len - 1) / SECTOR;
        // Sectors that gain data but are only partly covered: their other bytes must read
        // as zeroes, so zero the sector first.
        for s in [first, last] {
            let s_start = s * SECTOR;
            let covered = c.in_block <= s_start && c.in_block + c.len >= s_start + SECTOR;
            if !bm.is_set(s) && !covered {
                self.file
                    .write_zero_bytes(Self::data_offset(d, entry, s_start), SECTOR)?;
            }
        }
        self.file
            .write_vectored_at(Self::data_offset(d, entry, c.in_block), part)?;
        let mut new = bytes.as_ref().clone();
        for s in first..=last {
            set_bit(&mut new, s);
        }
        if new != **bytes {
            self.barrier()?;
            self.file.write_at(u64::from(entry) * SECTOR, &new)?;
            let nb = Bitmap::from_bytes(new, Self::sectors_per_block(d));
            poisoned(d.bitmaps.lock()).insert(c.block as u32, nb);
        }
        Ok(())
    }

    fn write_dynamic(
        &self,
        d: &Dynamic,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
    ) -> Result<(), BlockError> {
        let len = total_len(bufs);
        for c in chunks(offset, len, d.block_size) {
            let part = sub_bufs(bufs, c.skip, c.len);
            let idx = c.block as usize;
            {
                let meta = poisoned(d.meta.read());
                let entry = meta.bat.get(idx).copied().unwrap_or(BAT_UNALLOCATED);
                if entry != BAT_UNALLOCATED {
                    if let Bitmap::Full = self.bitmap(d, idx as u32, entry)? {
                        self.file
                            .write_vectored_at(Self::data_offset(d, entry, c.in_block), &part)?;
                        continue;
                    }
                }
            }
            let mut meta = poisoned(d.meta.write());
            let entry = meta.bat.get(idx).copied().unwrap_or(BAT_UNALLOCATED);
            if entry == BAT_UNALLOCATED {
                self.allocate_block(d, &mut meta, &c, &part)?;
            } else {
                let bm = self.bitmap(d, idx as u32, entry)?;
                self.write_partial_block(d, entry, &c, &part, &bm)?;
            }
        }
        Ok(())
    }

    /// Zeroes `offset..offset+len` of the file, punching a hole if `may_unmap`.
    fn zero_file_range(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        if self.file.zero_range(offset, len, may_unmap)? {
            Ok(())
        } else {
            self.file.write_zero_bytes(offset, len)
        }
    }

    fn status_of(&self, d: &Dynamic, meta: &DynMeta, pos: u64) -> Result<(bool, u64), BlockError> {
        // Returns (has data, end of the run inside this block).
        let block = pos / d.block_size;
        let block_end = (block + 1) * d.block_size;
        let entry = meta
            .bat
            .get(block as usize)
            .copied()
            .unwrap_or(BAT_UNALLOCATED);
        if entry == BAT_UNALLOCATED {
            return Ok((false, block_end));
        }
        match self.bitmap(d, block as u32, entry)? {
            Bitmap::Full => Ok((true, block_end)),
            bm => {
                let in_block = pos % d.block_size;
                let set = bm.is_set(in_block / SECTOR);
                let mut s = in_block / SECTOR + 1;
                while s < d.block_size / SECTOR && bm.is_set(s) == set {
                    s += 1;
                }
                Ok((set, block * d.block_size + s * SECTOR))
            }
        }
    }
}

impl BlockBackend for VpcBackend {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> &'static str {
        "vpc"
    }

    fn is_read_only(&self) -> bool {
        self.file.is_read_only()
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        check_range(offset, total_len(bufs), self.size)?;
        match &self.dynamic {
            None => self.file.read_vectored_at(offset, bufs),
            Some(d) => self.read_dynamic(d, offset, bufs),
        }
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(offset, total_len(bufs), self.size)?;
        match &self.dynamic {
            None => self.file.write_vectored_at(offset, bufs),
            Some(d) => self.write_dynamic(d, offset, bufs),
        }
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.file.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(offset, len, self.size)?;
        let Some(d) = &self.dynamic else {
            return self.zero_file_range(offset, len, may_unmap);
        };
        // Hold the write lock: no block may be allocated under our feet, and a partial
        // bitmap is not changed concurrently.
        let meta = poisoned(d.meta.write());
        for c in chunks(offset, len, d.block_size) {
            let entry = meta
                .bat
                .get(c.block as usize)
                .copied()
                .unwrap_or(BAT_UNALLOCATED);
            if entry != BAT_UNALLOCATED {
                self.zero_file_range(Self::data_offset(d, entry, c.in_block), c.len, may_unmap)?;
            }
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        if offset >= self.size {
            return Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        let max_end = offset + len.min(self.size - offset).max(1);
        let Some(d) = &self.dynamic else {
            let (data, end) = self.file.extent_at(offset)?;
            return Ok(BlockStatus {
                offset,
                len: end.clamp(offset + 1, max_end) - offset,
                allocated: true,
                zero: !data,
            });
        };
        let meta = poisoned(d.meta.read());
        let (first, mut end) = self.status_of(d, &meta, offset)?;
        while end < max_end {
            let (s, e) = self.status_of(d, &meta, end)?;
            if s != first {
                break;
            }
            end = e;
        }
        Ok(BlockStatus {
            offset,
            len: end.min(max_end) - offset,
            allocated: first,
            zero: !first,
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
