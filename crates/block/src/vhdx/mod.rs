// SPDX-License-Identifier: Apache-2.0 OR MIT
//! VHDX images (Hyper-V): fixed and dynamic, with log replay.
//!
//! Layout: the [header section](header) (file identifier, two headers with sequence numbers
//! and CRC-32C, two region tables) in the first MiB; then, at 1 MiB-aligned offsets named
//! by the region table, the [`log`], the BAT ([`bat`]) and the metadata region ([`metadata`]);
//! then payload blocks. The metadata gives the block size (1..256 MiB), the virtual size
//! and the sector sizes; the BAT gives, per payload block, its state (NOT_PRESENT,
//! UNDEFINED, ZERO, UNMAPPED read as zeroes; FULLY_PRESENT at a file offset) with a sector
//! bitmap entry after every `chunk_ratio` payload entries.
//!
//! **Log replay.** If the current header names a log (non-zero log GUID), the active log
//! sequence is found and fully validated, the whole image is parsed as the replayed log
//! says it is, and only then, on a read-write open, the writes are applied to the file,
//! the file is synced and the log GUID is cleared in both headers. A read-only open keeps
//! the replayed writes in memory (an [`log::Overlay`]) and reads through them, so a
//! log-pending image can be inspected without modifying it.
//!
//! **Writes.** Before the first change after open, both headers are rewritten with new
//! file and data write GUIDs (as the specification asks). A write to a block that is not
//! FULLY_PRESENT allocates a new block at the 1 MiB-aligned end of the file (zero-filled
//! by extending the file), writes the data, syncs, and then writes the BAT entry directly
//! (not through the log): a crash leaves at most an unreferenced block. Discard and
//! write-zeroes punch holes in (or zero) present blocks; their BAT state is unchanged.
//!
//! Differencing images (has-parent) are refused with [`BlockError::Unsupported`].
//!
//! ```
//! use vmkit_block::vhdx::{VhdxBackend, VhdxCreateOptions};
//! use vmkit_block::{read_at, write_at, BlockBackend, CacheMode};
//!
//! # fn main() -> Result<(), vmkit_block::BlockError> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("disk.vhdx");
//! VhdxBackend::create(&path, 64 << 20, &VhdxCreateOptions::default())?;
//! let disk = VhdxBackend::open(&path, false, CacheMode::Writeback)?;
//! assert_eq!(disk.virtual_size(), 64 << 20);
//! write_at(&disk, 9 << 20, b"hello")?;
//! let mut buf = [0u8; 5];
//! read_at(&disk, 9 << 20, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! disk.flush()?;
//! # Ok(())
//! # }
//! ```

pub mod bat;
pub mod crc32c;
pub mod guid;
pub mod header;
pub mod log;
pub mod metadata;

use std::path::Path;
use std::sync::{Mutex, RwLock};

use vm_memory::VolatileSlice;

use crate::backend::{check_range, scatter, sub_bufs, total_len, zero_bufs};
use crate::file_io::ImageFile;
use crate::{BlockBackend, BlockError, BlockStatus, CacheMode};

use bat::{BatLayout, PAYLOAD_FULLY_PRESENT};
use guid::{Guid, BAT_REGION, METADATA_REGION};
use header::{
    file_identifier, parse_region_table, region_table_bytes, Header, RegionEntry, FILE_SIGNATURE,
    HEADER_OFFSETS, HEADER_SECTION_END, HEADER_SIZE, MIB, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE,
};
use log::Overlay;
use metadata::{DiskParams, MetadataProblem, MAX_BLOCK_SIZE, MAX_DISK_SIZE, MIN_BLOCK_SIZE};

/// Largest file offset a replayed log may write to (a sanity bound: 64 TiB of payload
/// plus metadata).
const MAX_FILE_OFFSET: u64 = 1 << 47;

/// Kind of VHDX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VhdxSubformat {
    /// Every payload block allocated at creation.
    Fixed,
    /// Blocks allocated on first write.
    #[default]
    Dynamic,
}

/// Options of [`VhdxBackend::create`].
#[derive(Clone, Debug)]
pub struct VhdxCreateOptions {
    /// Fixed or dynamic.
    pub subformat: VhdxSubformat,
    /// Payload block size (power of two, 1..256 MiB); 0 picks QEMU's default for the size
    /// (8 MiB up to 1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, 64 MiB above).
    pub block_size: u32,
    /// Logical sector size: 512 or 4096.
    pub logical_sector_size: u32,
    /// Physical sector size: 512 or 4096.
    pub physical_sector_size: u32,
    /// Log size (a multiple of 1 MiB, at least 1 MiB).
    pub log_size: u32,
}

impl Default for VhdxCreateOptions {
    fn default() -> Self {
        VhdxCreateOptions {
            subformat: VhdxSubformat::Dynamic,
            block_size: 0,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            log_size: MIB as u32,
        }
    }
}

/// Mutable metadata.
#[derive(Debug)]
struct Meta {
    bat: Vec<u64>,
    /// Where the next payload block goes (1 MiB-aligned).
    next_free: u64,
}

#[derive(Debug)]
struct HeaderState {
    current: Header,
    /// Index (0/1) of the header slot holding `current`.
    slot: usize,
    /// Whether the write GUIDs were changed since open.
    write_guids_done: bool,
}

/// A VHDX image (fixed or dynamic) opened for I/O.
#[derive(Debug)]
pub struct VhdxBackend {
    file: ImageFile,
    params: DiskParams,
    layout: BatLayout,
    bat_offset: u64,
    meta: RwLock<Meta>,
    headers: Mutex<HeaderState>,
    /// Replayed log kept in memory (read-only opens of a log-pending image).
    overlay: Option<Overlay>,
    log_replayed: bool,
}

/// Summary of an open VHDX image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhdxInfo {
    /// Disk parameters from the metadata region.
    pub params: DiskParams,
    /// Payload blocks per sector bitmap entry.
    pub chunk_ratio: u64,
    /// Number of payload blocks.
    pub data_blocks: u64,
    /// Whether a log was replayed (on disk, or in memory for a read-only open).
    pub log_replayed: bool,
}

struct Chunk {
    block: u64,
    in_block: u64,
    len: u64,
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

fn poisoned<T>(r: std::sync::LockResult<T>) -> T {
    r.unwrap_or_else(|p| p.into_inner())
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// QEMU's default block size for a disk of `size` bytes.
pub fn default_block_size(size: u64) -> u32 {
    const GIB: u64 = 1 << 30;
    if size > 32 * 1024 * GIB {
        64 << 20
    } else if size > 100 * GIB {
        32 << 20
    } else if size > GIB {
        16 << 20
    } else {
        8 << 20
    }
}

/// Reads `buf.len()` bytes at `off` of the file as the (optional) replayed log says they
/// are.
fn read_through(
    file: &ImageFile,
    overlay: Option<&Overlay>,
    off: u64,
    buf: &mut [u8],
) -> Result<(), BlockError> {
    file.read_at(off, buf)?;
    if let Some(o) = overlay {
        o.for_each_in(off, buf.len() as u64, |skip, n, data| {
            let dst = &mut buf[skip as usize..(skip + n) as usize];
            match data {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
        });
    }
    Ok(())
}

impl VhdxBackend {
    /// Creates a VHDX of `size` bytes (rounded up to the logical sector size) at `path`,
    /// replacing any file there.
    pub fn create(path: &Path, size: u64, opts: &VhdxCreateOptions) -> Result<(), BlockError> {
        let inval = |m: String| BlockError::InvalidArgument(format!("{}: {m}", path.display()));
        let lss = opts.logical_sector_size;
        let pss = opts.physical_sector_size;
        if lss != 512 && lss != 4096 {
            return Err(inval(format!(
                "logical sector size {lss} is neither 512 nor 4096"
            )));
        }
        if pss != 512 && pss != 4096 {
            return Err(inval(format!(
                "physical sector size {pss} is neither 512 nor 4096"
            )));
        }
        let size = size.next_multiple_of(u64::from(lss));
        if size > MAX_DISK_SIZE {
            return Err(inval(format!(
                "VHDX disks hold at most 64 TiB, {size} bytes requested"
            )));
        }
        let block_size = if opts.block_size == 0 {
            default_block_size(size)
        } else {
            opts.block_size
        };
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(inval(format!(
                "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
            )));
        }
        let log_size = u64::from(opts.log_size);
        if log_size < MIB || log_size % MIB != 0 {
            return Err(inval(format!(
                "log size {log_size} is not a non-zero multiple of 1 MiB"
            )));
        }
        let fixed = opts.subformat == VhdxSubformat::Fixed;
        let params = DiskParams {
            block_size,
            leave_blocks_allocated: fixed,
            has_parent: false,
            virtual_disk_size: size,
            logical_sector_size: lss,
            physical_sector_size: pss,
            page83: Guid::random(),
        };
        let layout = BatLayout::new(size, block_size, lss);
        let log_offset = HEADER_SECTION_END;
        let bat_offset = log_offset + log_size;
        let bat_len = (layout.total_entries * 8).next_multiple_of(MIB).max(MIB);
        let meta_offset = bat_offset + bat_len;
        let meta_len = MIB;
        let payload_start = meta_offset + meta_len;
        let bat_len32 = u32::try_from(bat_len)
            .map_err(|_| inval(format!("the BAT of {bat_len} bytes is too large")))?;

        let f = ImageFile::create(path)?;
        f.write_at(0, &file_identifier("vmkit"))?;
        let file_guid = Guid::random();
        for (i, off) in HEADER_OFFSETS.iter().enumerate() {
            let h = Header {
                sequence_number: i as u64,
                file_write_guid: file_guid,
                data_write_guid: Guid::random(),
                log_guid: Guid::ZERO,
                log_version: 0,
                version: 1,
                log_length: log_size as u32,
                log_offset,
            };
            f.write_at(*off, &h.to_bytes())?;
        }
        let regions = [
            RegionEntry {
                guid: BAT_REGION,
                file_offset: bat_offset,
                length: bat_len32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_REGION,
                file_offset: meta_offset,
                length: meta_len as u32,
                required: true,
            },
        ];
        let rt = region_table_bytes(&regions);
        for off in REGION_TABLE_OFFSETS {
            f.write_at(off, &rt)?;
        }
        f.write_at(meta_offset, &metadata::region_bytes(&params, meta_len))?;
        let mut end = payload_start;
        if fixed {
            let mut bat_bytes = vec![0u8; bat_len as usize];
            for b in 0..layout.data_blocks {
                let i = layout.payload_index(b) as usize;
                let e = bat::entry(
                    PAYLOAD_FULLY_PRESENT,
                    payload_start + b * u64::from(block_size),
                );
                bat_bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
            f.write_at(bat_offset, &bat_bytes)?;
            end = payload_start + layout.data_blocks * u64::from(block_size);
        }
        f.set_len(end)?;
        f.sync()
    }

    /// Opens the VHDX at `path`. A pending log is replayed: on disk for a read-write open
    /// (after the whole image validated), in memory for a read-only one.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<Self, BlockError> {
        let file = ImageFile::open(path, read_only, cache)?;
        Self::from_image_file(file)
    }

    /// Opens a VHDX from an already open [`ImageFile`].
    pub fn from_image_file(file: ImageFile) -> Result<Self, BlockError> {
        let path = file.path().to_path_buf();
        let corrupt = |reason: String| BlockError::corrupt(&path, reason);
        let file_len = file.len()?;
        if file_len < HEADER_SECTION_END {
            return Err(corrupt(format!(
                "file is {file_len} bytes, shorter than the 1 MiB VHDX header section"
            )));
        }
        let mut sig = [0u8; 8];
        file.read_at(0, &mut sig)?;
        if &sig != FILE_SIGNATURE {
            return Err(corrupt("no \"vhdxfile\" signature at offset 0".into()));
        }

        // Headers: the valid one with the larger sequence number is current.
        let mut parsed = Vec::new();
        for off in HEADER_OFFSETS {
            let mut b = vec![0u8; HEADER_SIZE];
            file.read_at(off, &mut b)?;
            parsed.push(Header::parse(&b));
        }
        let (slot, header) = match (&parsed[0], &parsed[1]) {
            (Ok(a), Ok(b)) => {
                if b.sequence_number > a.sequence_number {
                    (1, b.clone())
                } else {
                    (0, a.clone())
                }
            }
            (Ok(a), Err(_)) => (0, a.clone()),
            (Err(_), Ok(b)) => (1, b.clone()),
            (Err(e1), Err(e2)) => {
                return Err(corrupt(format!(
                    "both VHDX headers are invalid (first: {e1}; second: {e2})"
                )))
            }
        };
        if header.version != 1 {
            return Err(BlockError::unsupported(
                &path,
                format!("VHDX version {} (only version 1 is known)", header.version),
            ));
        }
        if header.log_version != 0 {
            return Err(BlockError::unsupported(
                &path,
                format!(
                    "VHDX log version {} (only version 0 is known)",
                    header.log_version
                ),
            ));
        }
        let log_off = header.log_offset;
        let log_len = u64::from(header.log_length);
        if log_len % MIB != 0
            || (log_len > 0 && (log_off % MIB != 0 || log_off < HEADER_SECTION_END))
        {
            return Err(corrupt(format!(
                "log at {log_off:#x} of {log_len:#x} bytes is not 1 MiB-aligned past the header section"
            )));
        }
        let log_range = (log_off, log_off.saturating_add(log_len));
        if log_len > 0 && log_range.1 > file_len {
            return Err(corrupt(format!(
                "log at {log_off:#x} of {log_len:#x} bytes reaches past the end of the file ({file_len} bytes)"
            )));
        }

        // The log, if any, fully validated before anything else is looked at.
        let mut overlay = None;
        if !header.log_guid.is_zero() {
            if log_len == 0 {
                return Err(corrupt("a log GUID is set but the log is empty".into()));
            }
            let seq = log::find_active_sequence(&path, log_len, &header.log_guid, |pos, buf| {
                file.read_at(log_off + pos, buf)
            })?;
            if let Some(seq) = seq {
                let head = seq.last().map(|e| e.flushed_file_offset).unwrap_or(0);
                if head > file_len {
                    return Err(corrupt(format!(
                        "the log says the file was at least {head} bytes, but it is {file_len} (truncated?)"
                    )));
                }
                let o = Overlay::from_sequence(&seq);
                for (off, len, _) in o.ranges() {
                    let r = (off, off.saturating_add(len));
                    if ranges_overlap(r, (0, HEADER_SECTION_END)) || ranges_overlap(r, log_range) {
                        return Err(corrupt(format!(
                            "the log writes {off:#x}..{:#x}, inside the header section or the log itself",
                            r.1
                        )));
                    }
                    if r.1 > MAX_FILE_OFFSET {
                        return Err(corrupt(format!(
                            "the log writes past {MAX_FILE_OFFSET:#x} (at {off:#x})"
                        )));
                    }
                }
                if o.min_file_len > MAX_FILE_OFFSET {
                    return Err(corrupt(format!(
                        "the log's last file offset {:#x} is absurd",
                        o.min_file_len
                    )));
                }
                overlay = Some(o);
            }
        }
        let eff_len = overlay
            .as_ref()
            .map(|o| o.min_file_len)
            .unwrap_or(0)
            .max(file_len);

        // Region table: the first valid copy.
        let mut rt_err = Vec::new();
        let mut regions = None;
        for off in REGION_TABLE_OFFSETS {
            let mut b = vec![0u8; REGION_TABLE_SIZE];
            file.read_at(off, &mut b)?;
            match parse_region_table(&b) {
                Ok(r) => {
                    regions = Some(r);
                    break;
                }
                Err(e) => rt_err.push(e),
            }
        }
        let regions = regions.ok_or_else(|| {
            corrupt(format!(
                "both region tables are invalid ({})",
                rt_err.join("; ")
            ))
        })?;
        let mut bat_region = None;
        let mut meta_region = None;
        for r in &regions {
            if r.guid == BAT_REGION {
                bat_region = Some(*r);
            } else if r.guid == METADATA_REGION {
                meta_region = Some(*r);
            } else if r.required {
                return Err(BlockError::unsupported(
                    &path,
                    format!("required {} is not known to this implementation", r.name()),
                ));
            }
            if r.end() > eff_len {
                return Err(corrupt(format!(
                    "{} at {:#x}..{:#x} reaches past the end of the file ({eff_len} bytes)",
                    r.name(),
                    r.file_offset,
                    r.end()
                )));
            }
            if log_len > 0 && ranges_overlap((r.file_offset, r.end()), log_range) {
                return Err(corrupt(format!("{} overlaps the log", r.name())));
            }
        }
        for (i, a) in regions.iter().enumerate() {
            for b in regions.iter().skip(i + 1) {
                if ranges_overlap((a.file_offset, a.end()), (b.file_offset, b.end())) {
                    return Err(corrupt(format!("{} overlaps {}", a.name(), b.name())));
                }
            }
        }
        let bat_region = bat_region.ok_or_else(|| corrupt("the region table has no BAT".into()))?;
        let meta_region =
            meta_region.ok_or_else(|| corrupt("the region table has no metadata region".into()))?;

        // Metadata.
        let ov = overlay.as_ref();
        let mut table = vec![0u8; metadata::TABLE_SIZE];
        read_through(&file, ov, meta_region.file_offset, &mut table)?;
        let problem = |p: MetadataProblem| match p {
            MetadataProblem::Corrupt(s) => BlockError::corrupt(&path, s),
            MetadataProblem::Unsupported(s) => BlockError::unsupported(&path, s),
        };
        let entries =
            metadata::parse_table(&table, u64::from(meta_region.length)).map_err(problem)?;
        let params = metadata::parse_params(&entries, |e| {
            let mut b = vec![0u8; e.length as usize];
            read_through(
                &file,
                ov,
                meta_region.file_offset + u64::from(e.offset),
                &mut b,
            )?;
            Ok::<_, BlockError>(b)
        })?
        .map_err(problem)?;

        // BAT.
        let layout = BatLayout::new(
            params.virtual_disk_size,
            params.block_size,
            params.logical_sector_size,
        );
        let bat_bytes = layout.total_entries * 8;
        if bat_bytes > u64::from(bat_region.length) {
            return Err(corrupt(format!(
                "the BAT region of {} bytes cannot hold the {} entries a disk of {} bytes needs",
                bat_region.length, layout.total_entries, params.virtual_disk_size
            )));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        read_through(&file, ov, bat_region.file_offset, &mut raw)?;
        let bat: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        drop(raw);
        let block_size = u64::from(params.block_size);
        let mut reserved: Vec<(u64, u64, String)> = regions
            .iter()
            .map(|r| (r.file_offset, r.end(), r.name()))
            .collect();
        reserved.push((0, HEADER_SECTION_END, "the header section".into()));
        if log_len > 0 {
            reserved.push((log_range.0, log_range.1, "the log".into()));
        }
        let mut blocks = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            let st = bat::state(e);
            if layout.is_bitmap_index(i as u64) {
                if st != bat::SB_NOT_PRESENT && st != bat::SB_PRESENT {
                    return Err(corrupt(format!(
                        "BAT entry {i} (sector bitmap) has invalid state {st}"
                    )));
                }
                continue;
            }
            match st {
                bat::PAYLOAD_NOT_PRESENT
                | bat::PAYLOAD_UNDEFINED
                | bat::PAYLOAD_ZERO
                | bat::PAYLOAD_UNMAPPED => {}
                PAYLOAD_FULLY_PRESENT => {
                    let start = bat::file_offset(e);
                    let end = start.saturating_add(block_size);
                    if end > eff_len {
                        return Err(corrupt(format!(
                            "BAT entry {i} points at {start:#x}, a block ending past the end of the file ({eff_len} bytes)"
                        )));
                    }
                    if let Some((_, _, what)) = reserved
                        .iter()
                        .find(|r| ranges_overlap((start, end), (r.0, r.1)))
                    {
                        return Err(corrupt(format!(
                            "BAT entry {i} points at {start:#x}, overlapping {what}"
                        )));
                    }
                    blocks.push((start, i));
                }
                bat::PAYLOAD_PARTIALLY_PRESENT => {
                    return Err(corrupt(format!(
                        "BAT entry {i} is PARTIALLY_PRESENT in a disk without a parent"
                    )))
                }
                _ => {
                    return Err(corrupt(format!(
                        "BAT entry {i} has invalid payload state {st}"
                    )))
                }
            }
        }
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            if let [a, b] = w {
                if b.0 < a.0 + block_size {
                    return Err(corrupt(format!(
                        "BAT entries {} and {} point at overlapping blocks ({:#x}, {:#x})",
                        a.1, b.1, a.0, b.0
                    )));
                }
            }
        }
        let next_free = reserved
            .iter()
            .map(|r| r.1)
            .chain(blocks.last().map(|b| b.0 + block_size))
            .fold(eff_len, u64::max)
            .next_multiple_of(MIB);

        let mut hs = HeaderState {
            current: header,
            slot,
            write_guids_done: false,
        };
        let log_replayed = overlay.is_some();
        // Everything validated: now a read-write open may apply the log.
        if let Some(o) = overlay.take() {
            if file.is_read_only() {
                overlay = Some(o);
            } else {
                Self::apply_overlay(&file, &o, file_len)?;
                let mut h = hs.current.clone();
                h.log_guid = Guid::ZERO;
                h.file_write_guid = Guid::random();
                Self::write_headers(&file, &mut hs, h)?;
            }
        } else if !hs.current.log_guid.is_zero() && !file.is_read_only() {
            // A log GUID without a valid sequence: nothing to replay. It is cleared with
            // the first header update (before the first write).
        }
        Ok(VhdxBackend {
            file,
            params,
            layout,
            bat_offset: bat_region.file_offset,
            meta: RwLock::new(Meta { bat, next_free }),
            headers: Mutex::new(hs),
            overlay,
            log_replayed,
        })
    }

    fn apply_overlay(file: &ImageFile, o: &Overlay, file_len: u64) -> Result<(), BlockError> {
        if o.min_file_len > file_len {
            file.set_len(o.min_file_len)?;
        }
        for (off, len, data) in o.ranges() {
            match data {
                Some(d) => file.write_at(off, d)?,
                None => {
                    if !file.zero_range(off, len, false)? {
                        file.write_zero_bytes(off, len)?;
                    }
                }
            }
        }
        file.sync()
    }

    /// Writes `new` to both header slots (the non-current first), with increasing
    /// sequence numbers, syncing after each.
    fn write_headers(
        file: &ImageFile,
        hs: &mut HeaderState,
        mut new: Header,
    ) -> Result<(), BlockError> {
        for _ in 0..2 {
            let slot = 1 - hs.slot;
            new.sequence_number = hs.current.sequence_number.wrapping_add(1);
            file.write_at(HEADER_OFFSETS[slot], &new.to_bytes())?;
            if file.cache_mode().flush_syncs() {
                file.sync()?;
            }
            hs.current = new.clone();
            hs.slot = slot;
        }
        Ok(())
    }

    /// Before the first change after open: new file and data write GUIDs, no log.
    fn begin_write(&self) -> Result<(), BlockError> {
        if self.file.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        let mut hs = poisoned(self.headers.lock());
        if hs.write_guids_done {
            return Ok(());
        }
        let mut h = hs.current.clone();
        h.file_write_guid = Guid::random();
        h.data_write_guid = Guid::random();
        h.log_guid = Guid::ZERO;
        Self::write_headers(&self.file, &mut hs, h)?;
        hs.write_guids_done = true;
        Ok(())
    }

    /// Summary of the image.
    pub fn info(&self) -> VhdxInfo {
        VhdxInfo {
            params: self.params.clone(),
            chunk_ratio: self.layout.chunk_ratio,
            data_blocks: self.layout.data_blocks,
            log_replayed: self.log_replayed,
        }
    }

    /// Fixed (blocks stay allocated) or dynamic.
    pub fn subformat(&self) -> VhdxSubformat {
        if self.params.leave_blocks_allocated {
            VhdxSubformat::Fixed
        } else {
            VhdxSubformat::Dynamic
        }
    }

    /// The current header.
    pub fn header(&self) -> Header {
        poisoned(self.headers.lock()).current.clone()
    }

    fn block_size(&self) -> u64 {
        u64::from(self.params.block_size)
    }

    /// The BAT entry of payload block `block`.
    fn payload_entry(&self, meta: &Meta, block: u64) -> u64 {
        meta.bat
            .get(self.layout.payload_index(block) as usize)
            .copied()
            .unwrap_or(0)
    }

    fn present_offset(entry: u64) -> Option<u64> {
        (bat::state(entry) == PAYLOAD_FULLY_PRESENT).then(|| bat::file_offset(entry))
    }

    fn barrier(&self) -> Result<(), BlockError> {
        if self.file.cache_mode().flush_syncs() {
            self.file.sync()
        } else {
            Ok(())
        }
    }

    fn allocate(
        &self,
        meta: &mut Meta,
        c: &Chunk,
        part: &[VolatileSlice<'_>],
    ) -> Result<(), BlockError> {
        let start = meta.next_free;
        let end = start + self.block_size();
        if end > MAX_FILE_OFFSET {
            return Err(BlockError::unsupported(
                self.file.path(),
                "the VHDX file has reached the largest supported size",
            ));
        }
        // Zero-filled by extending the file; then the data; then the BAT entry.
        self.file.set_len(end)?;
        self.file.write_vectored_at(start + c.in_block, part)?;
        self.barrier()?;
        let idx = self.layout.payload_index(c.block);
        let e = bat::entry(PAYLOAD_FULLY_PRESENT, start);
        self.file
            .write_at(self.bat_offset + idx * 8, &e.to_le_bytes())?;
        if let Some(slot) = meta.bat.get_mut(idx as usize) {
            *slot = e;
        }
        meta.next_free = end;
        Ok(())
    }

    fn zero_file_range(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        if self.file.zero_range(offset, len, may_unmap)? {
            Ok(())
        } else {
            self.file.write_zero_bytes(offset, len)
        }
    }
}

impl BlockBackend for VhdxBackend {
    fn virtual_size(&self) -> u64 {
        self.params.virtual_disk_size
    }

    fn format(&self) -> &'static str {
        "vhdx"
    }

    fn is_read_only(&self) -> bool {
        self.file.is_read_only()
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let len = total_len(bufs);
        check_range(offset, len, self.virtual_size())?;
        let meta = poisoned(self.meta.read());
        for c in chunks(offset, len, self.block_size()) {
            match Self::present_offset(self.payload_entry(&meta, c.block)) {
                None => zero_bufs(bufs, c.skip, c.len),
                Some(base) => {
                    let foff = base + c.in_block;
                    let part = sub_bufs(bufs, c.skip, c.len);
                    self.file.read_vectored_at(foff, &part)?;
                    if let Some(o) = &self.overlay {
                        o.for_each_in(foff, c.len, |skip, n, data| match data {
                            Some(d) => scatter(&part, skip, d),
                            None => zero_bufs(&part, skip, n),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        if self.file.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        let len = total_len(bufs);
        check_range(offset, len, self.virtual_size())?;
        if len == 0 {
            return Ok(());
        }
        self.begin_write()?;
        for c in chunks(offset, len, self.block_size()) {
            let part = sub_bufs(bufs, c.skip, c.len);
            {
                let meta = poisoned(self.meta.read());
                if let Some(base) = Self::present_offset(self.payload_entry(&meta, c.block)) {
                    self.file.write_vectored_at(base + c.in_block, &part)?;
                    continue;
                }
            }
            let mut meta = poisoned(self.meta.write());
            match Self::present_offset(self.payload_entry(&meta, c.block)) {
                Some(base) => self.file.write_vectored_at(base + c.in_block, &part)?,
                None => self.allocate(&mut meta, &c, &part)?,
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.file.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        if self.file.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.virtual_size())?;
        if len == 0 {
            return Ok(());
        }
        self.begin_write()?;
        let meta = poisoned(self.meta.write());
        for c in chunks(offset, len, self.block_size()) {
            if let Some(base) = Self::present_offset(self.payload_entry(&meta, c.block)) {
                self.zero_file_range(base + c.in_block, c.len, may_unmap)?;
            }
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        let size = self.virtual_size();
        if offset >= size {
            return Err(BlockError::OutOfRange { offset, len, size });
        }
        let max_end = offset + len.min(size - offset).max(1);
        let bs = self.block_size();
        let meta = poisoned(self.meta.read());
        let present =
            |pos: u64| Self::present_offset(self.payload_entry(&meta, pos / bs)).is_some();
        let first = present(offset);
        let mut end = (offset / bs + 1) * bs;
        while end < max_end && present(end) == first {
            end += bs;
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
