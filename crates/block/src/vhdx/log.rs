// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The VHDX metadata log: parsing log entries, finding the active sequence, and the
//! replayed writes as an [`Overlay`].
//!
//! The log is a circular buffer of 4 KiB sectors. A log entry is a header sector
//! ("loge": checksum, length, tail, sequence number, log GUID, flushed and last file
//! offsets) plus descriptors ("desc" for a 4 KiB data write, "zero" for a zeroed range),
//! padded to whole sectors, followed by one data sector ("data") per data descriptor. The
//! CRC-32C covers the whole entry. Consecutive entries have consecutive sequence numbers;
//! the active sequence is the newest one whose head entry's tail points at an entry of
//! the same run. Replaying means applying the writes of the sequence from tail to head.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::crc32c::crc32c_with_zero_field;
use super::guid::Guid;
use super::header::{le32, le64};
use crate::BlockError;

/// Size of a log sector.
pub const LOG_SECTOR: u64 = 4096;
/// Size of a log entry header.
pub const ENTRY_HEADER_SIZE: u64 = 64;
/// Size of a descriptor.
pub const DESCRIPTOR_SIZE: u64 = 32;
/// Upper bound on the work of the sequence search (entry visits), against hostile logs.
const SEARCH_BUDGET: u64 = 4_000_000;

/// One write recorded in a log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogWrite {
    /// 4 KiB of data at a file offset.
    Data {
        /// Target file offset (4 KiB-aligned).
        file_offset: u64,
        /// The sector contents.
        data: Vec<u8>,
    },
    /// A zeroed range.
    Zero {
        /// Target file offset (4 KiB-aligned).
        file_offset: u64,
        /// Length (a multiple of 4 KiB).
        length: u64,
    },
}

impl LogWrite {
    /// Target range `(offset, length)`.
    pub fn range(&self) -> (u64, u64) {
        match self {
            LogWrite::Data { file_offset, data } => (*file_offset, data.len() as u64),
            LogWrite::Zero {
                file_offset,
                length,
            } => (*file_offset, *length),
        }
    }
}

/// A parsed, checksum-verified log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Offset of the entry inside the log.
    pub position: u64,
    /// Length of the entry in bytes.
    pub length: u64,
    /// Offset (inside the log) of the oldest entry still needed.
    pub tail: u64,
    /// Sequence number.
    pub sequence_number: u64,
    /// The file must be at least this long for the log to be applied.
    pub flushed_file_offset: u64,
    /// File size after this entry's writes.
    pub last_file_offset: u64,
    /// The writes, in order.
    pub writes: Vec<LogWrite>,
}

/// Quick checks on a sector that may start an entry: `(length, tail)` if it looks like
/// one.
fn peek_header(sector: &[u8], log_len: u64, log_guid: &Guid) -> Option<(u64, u64)> {
    if sector.get(..4)? != b"loge" {
        return None;
    }
    let length = u64::from(le32(sector, 8));
    let tail = u64::from(le32(sector, 12));
    if length == 0 || length % LOG_SECTOR != 0 || length > log_len {
        return None;
    }
    if tail % LOG_SECTOR != 0 || tail >= log_len {
        return None;
    }
    if Guid::read(sector, 32) != *log_guid {
        return None;
    }
    Some((length, tail))
}

/// Parses a whole entry (`bytes` is exactly the entry). Returns why it is invalid.
pub fn parse_entry(bytes: &[u8], position: u64, log_guid: &Guid) -> Result<LogEntry, String> {
    if bytes.len() < LOG_SECTOR as usize || bytes.len() % LOG_SECTOR as usize != 0 {
        return Err("log entry is not a whole number of sectors".into());
    }
    if &bytes[..4] != b"loge" {
        return Err("no \"loge\" signature".into());
    }
    let length = u64::from(le32(bytes, 8));
    if length != bytes.len() as u64 {
        return Err(format!("entry length {length} does not match"));
    }
    let stored = le32(bytes, 4);
    let want = crc32c_with_zero_field(bytes, 4);
    if stored != want {
        return Err(format!(
            "log entry checksum mismatch (stored {stored:#010x}, computed {want:#010x})"
        ));
    }
    if Guid::read(bytes, 32) != *log_guid {
        return Err("log entry belongs to another log GUID".into());
    }
    let seq = le64(bytes, 16);
    let count = u64::from(le32(bytes, 24));
    let desc_area = (ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE * count).next_multiple_of(LOG_SECTOR);
    if desc_area > length {
        return Err(format!(
            "{count} descriptors do not fit in an entry of {length} bytes"
        ));
    }
    let mut writes = Vec::with_capacity(count as usize);
    let mut data_sector = desc_area;
    for i in 0..count {
        let at = (ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE * i) as usize;
        let d = bytes
            .get(at..at + DESCRIPTOR_SIZE as usize)
            .ok_or_else(|| "descriptor out of range".to_string())?;
        let file_offset = le64(d, 16);
        if le64(d, 24) != seq {
            return Err(format!("descriptor {i} has another sequence number"));
        }
        if file_offset % LOG_SECTOR != 0 {
            return Err(format!(
                "descriptor {i} targets file offset {file_offset:#x}, not 4 KiB-aligned"
            ));
        }
        match &d[..4] {
            b"zero" => {
                let zlen = le64(d, 8);
                if zlen % LOG_SECTOR != 0 {
                    return Err(format!(
                        "zero descriptor {i} length {zlen} is not a multiple of 4 KiB"
                    ));
                }
                file_offset
                    .checked_add(zlen)
                    .ok_or_else(|| format!("zero descriptor {i} range overflows"))?;
                writes.push(LogWrite::Zero {
                    file_offset,
                    length: zlen,
                });
            }
            b"desc" => {
                let s = bytes
                    .get(data_sector as usize..(data_sector + LOG_SECTOR) as usize)
                    .ok_or_else(|| format!("data sector of descriptor {i} is missing"))?;
                if &s[..4] != b"data" {
                    return Err(format!(
                        "data sector of descriptor {i} has no \"data\" signature"
                    ));
                }
                let seq_hi = u64::from(le32(s, 4));
                let seq_lo = u64::from(le32(s, 4092));
                if (seq_hi << 32 | seq_lo) != seq {
                    return Err(format!(
                        "data sector of descriptor {i} has another sequence number"
                    ));
                }
                let mut data = Vec::with_capacity(LOG_SECTOR as usize);
                data.extend_from_slice(&d[8..16]); // leading bytes
                data.extend_from_slice(&s[8..4092]);
                data.extend_from_slice(&d[4..8]); // trailing bytes
                writes.push(LogWrite::Data { file_offset, data });
                data_sector += LOG_SECTOR;
            }
            _ => return Err(format!("descriptor {i} has an unknown signature")),
        }
    }
    if data_sector != length {
        return Err(format!(
            "entry of {length} bytes holds {} bytes of descriptors and data",
            data_sector
        ));
    }
    Ok(LogEntry {
        position,
        length,
        tail: u64::from(le32(bytes, 12)),
        sequence_number: seq,
        flushed_file_offset: le64(bytes, 48),
        last_file_offset: le64(bytes, 56),
        writes,
    })
}

/// Reads `buf.len()` bytes at `pos` of a circular log of `log_len` bytes.
fn read_wrapped(
    log_len: u64,
    pos: u64,
    buf: &mut [u8],
    read: &mut impl FnMut(u64, &mut [u8]) -> Result<(), BlockError>,
) -> Result<(), BlockError> {
    let first = ((log_len - pos) as usize).min(buf.len());
    let (a, b) = buf.split_at_mut(first);
    read(pos, a)?;
    if !b.is_empty() {
        read(0, b)?;
    }
    Ok(())
}

/// Finds the active log sequence of a log of `log_len` bytes whose entries carry
/// `log_guid`. `read(pos, buf)` reads bytes of the log (never across its end). Returns the
/// entries to replay, oldest first, or `None` if the log holds no valid sequence.
pub fn find_active_sequence(
    path: &Path,
    log_len: u64,
    log_guid: &Guid,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), BlockError>,
) -> Result<Option<Vec<LogEntry>>, BlockError> {
    if log_len == 0 || log_len % LOG_SECTOR != 0 {
        return Err(BlockError::corrupt(
            path,
            format!("log length {log_len} is not a non-zero multiple of 4 KiB"),
        ));
    }
    let mut entries: HashMap<u64, LogEntry> = HashMap::new();
    let mut sector = vec![0u8; LOG_SECTOR as usize];
    let mut pos = 0;
    while pos < log_len {
        read(pos, &mut sector)?;
        if let Some((length, _)) = peek_header(&sector, log_len, log_guid) {
            let mut whole = vec![0u8; length as usize];
            read_wrapped(log_len, pos, &mut whole, &mut read)?;
            if let Ok(e) = parse_entry(&whole, pos, log_guid) {
                entries.insert(pos, e);
            }
        }
        pos += LOG_SECTOR;
    }
    if entries.is_empty() {
        return Ok(None);
    }
    let mut heads: Vec<(u64, u64)> = entries
        .values()
        .map(|e| (e.sequence_number, e.position))
        .collect();
    heads.sort_unstable_by(|a, b| b.cmp(a));
    let mut budget = SEARCH_BUDGET;
    for (_, hpos) in heads {
        let Some(head) = entries.get(&hpos) else {
            continue;
        };
        // Walk from the head's tail forward to the head.
        let mut seq_positions = Vec::new();
        let mut cur = entries.get(&head.tail);
        let mut ok = false;
        while let Some(e) = cur {
            if budget == 0 {
                return Err(BlockError::corrupt(
                    path,
                    "the log holds too many overlapping entry chains to search",
                ));
            }
            budget -= 1;
            seq_positions.push(e.position);
            if e.position == hpos {
                ok = e.sequence_number == head.sequence_number;
                break;
            }
            if e.sequence_number >= head.sequence_number {
                break;
            }
            let next = (e.position + e.length) % log_len;
            cur = entries
                .get(&next)
                .filter(|n| n.sequence_number == e.sequence_number + 1);
        }
        if ok {
            let seq = seq_positions
                .iter()
                .filter_map(|p| entries.remove(p))
                .collect();
            return Ok(Some(seq));
        }
    }
    Ok(None)
}

/// A piece of replayed data: `len` bytes, zero if `data` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Piece {
    len: u64,
    data: Option<Vec<u8>>,
}

/// The file as the log says it should be: ranges whose content the log replaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlay {
    pieces: BTreeMap<u64, Piece>,
    /// Smallest file size the replayed file must have.
    pub min_file_len: u64,
}

impl Overlay {
    /// The writes of `entries` applied in order.
    pub fn from_sequence(entries: &[LogEntry]) -> Overlay {
        let mut o = Overlay::default();
        for e in entries {
            for w in &e.writes {
                match w {
                    LogWrite::Data { file_offset, data } => {
                        o.insert(*file_offset, data.len() as u64, Some(data.clone()))
                    }
                    LogWrite::Zero {
                        file_offset,
                        length,
                    } => o.insert(*file_offset, *length, None),
                }
            }
            o.min_file_len = o.min_file_len.max(e.last_file_offset);
        }
        o.min_file_len = o.min_file_len.max(o.end());
        o
    }

    /// Whether the overlay changes nothing.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// End of the last replaced range.
    pub fn end(&self) -> u64 {
        self.pieces
            .iter()
            .next_back()
            .map(|(s, p)| s + p.len)
            .unwrap_or(0)
    }

    fn insert(&mut self, off: u64, len: u64, data: Option<Vec<u8>>) {
        if len == 0 {
            return;
        }
        let end = off + len;
        let overlapping: Vec<u64> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(s, p)| *s + p.len > off)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let Some(p) = self.pieces.remove(&s) else {
                continue;
            };
            let pend = s + p.len;
            if s < off {
                let keep = off - s;
                let d = p.data.as_ref().map(|d| d[..keep as usize].to_vec());
                self.pieces.insert(s, Piece { len: keep, data: d });
            }
            if pend > end {
                let cut = (end - s) as usize;
                let d = p.data.as_ref().map(|d| d[cut..].to_vec());
                self.pieces.insert(
                    end,
                    Piece {
                        len: pend - end,
                        data: d,
                    },
                );
            }
        }
        self.pieces.insert(off, Piece { len, data });
    }

    /// The replaced ranges `(offset, length, data or None for zeroes)`, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, Option<&[u8]>)> {
        self.pieces
            .iter()
            .map(|(s, p)| (*s, p.len, p.data.as_deref()))
    }

    /// Calls `f(skip, n, data)` for every replaced part of `off..off+len`: `skip` is the
    /// position inside the range, `data` the `n` replacement bytes (`None`: zeroes).
    pub fn for_each_in(&self, off: u64, len: u64, mut f: impl FnMut(u64, u64, Option<&[u8]>)) {
        let end = off.saturating_add(len);
        let start_key = self
            .pieces
            .range(..=off)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(off);
        for (s, p) in self.pieces.range(start_key..end) {
            let a = (*s).max(off);
            let b = (s + p.len).min(end);
            if a >= b {
                continue;
            }
            let data = p
                .data
                .as_ref()
                .and_then(|d| d.get((a - s) as usize..(b - s) as usize));
            f(a - off, b - a, data);
        }
    }
}

/// Builds log entries (for tests and tools that need to create a pending log).
#[derive(Clone, Debug)]
pub struct LogEntryBuilder {
    /// Sequence number of the entry.
    pub sequence_number: u64,
    /// Tail (offset of the oldest entry to replay inside the log).
    pub tail: u32,
    /// Log GUID (must match the header's).
    pub log_guid: Guid,
    /// Flushed file offset.
    pub flushed_file_offset: u64,
    /// Last file offset.
    pub last_file_offset: u64,
    /// Writes to record.
    pub writes: Vec<LogWrite>,
}

impl LogEntryBuilder {
    /// Serialises the entry with its checksum. Data writes must be 4 KiB long.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.writes.len() as u64;
        let desc_area = (ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE * n).next_multiple_of(LOG_SECTOR);
        let data_count = self
            .writes
            .iter()
            .filter(|w| matches!(w, LogWrite::Data { .. }))
            .count() as u64;
        let len = desc_area + data_count * LOG_SECTOR;
        let mut b = vec![0u8; len as usize];
        b[..4].copy_from_slice(b"loge");
        b[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        b[12..16].copy_from_slice(&self.tail.to_le_bytes());
        b[16..24].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[24..28].copy_from_slice(&(n as u32).to_le_bytes());
        b[32..48].copy_from_slice(&self.log_guid.0);
        b[48..56].copy_from_slice(&self.flushed_file_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.last_file_offset.to_le_bytes());
        let seq = self.sequence_number;
        let mut ds = desc_area as usize;
        for (i, w) in self.writes.iter().enumerate() {
            let at = (ENTRY_HEADER_SIZE + DESCRIPTOR_SIZE * i as u64) as usize;
            match w {
                LogWrite::Zero {
                    file_offset,
                    length,
                } => {
                    b[at..at + 4].copy_from_slice(b"zero");
                    b[at + 8..at + 16].copy_from_slice(&length.to_le_bytes());
                    b[at + 16..at + 24].copy_from_slice(&file_offset.to_le_bytes());
                }
                LogWrite::Data { file_offset, data } => {
                    let mut sector = [0u8; LOG_SECTOR as usize];
                    let n = data.len().min(sector.len());
                    sector[..n].copy_from_slice(&data[..n]);
                    b[at..at + 4].copy_from_slice(b"desc");
                    b[at + 4..at + 8].copy_from_slice(&sector[4092..4096]);
                    b[at + 8..at + 16].copy_from_slice(&sector[..8]);
                    b[at + 16..at + 24].copy_from_slice(&file_offset.to_le_bytes());
                    b[ds..ds + 4].copy_from_slice(b"data");
                    b[ds + 4..ds + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                    b[ds + 8..ds + 4092].copy_from_slice(&sector[8..4092]);
                    b[ds + 4092..ds + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
                    ds += LOG_SECTOR as usize;
                }
            }
            b[at + 24..at + 32].copy_from_slice(&seq.to_le_bytes());
        }
        let c = crc32c_with_zero_field(&b, 4);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(v: u8) -> Vec<u8> {
        let mut s = vec![v; 4096];
        s[0] = 0xaa;
        s[4095] = 0xbb;
        s
    }

    fn builder(seq: u64, tail: u32, guid: Guid, writes: Vec<LogWrite>) -> LogEntryBuilder {
        LogEntryBuilder {
            sequence_number: seq,
            tail,
            log_guid: guid,
            flushed_file_offset: 0,
            last_file_offset: 8 << 20,
            writes,
        }
    }

    #[test]
    fn entry_round_trip() {
        let g = Guid::random();
        let w = vec![
            LogWrite::Data {
                file_offset: 0x20_0000,
                data: sector(5),
            },
            LogWrite::Zero {
                file_offset: 0x30_0000,
                length: 8192,
            },
        ];
        let b = builder(0x1_0000_0007, 0, g, w.clone()).to_bytes();
        assert_eq!(b.len(), 8192);
        let e = parse_entry(&b, 0, &g).unwrap();
        assert_eq!(e.writes, w);
        assert_eq!(e.sequence_number, 0x1_0000_0007);
        let mut bad = b.clone();
        bad[5000] ^= 1;
        assert!(parse_entry(&bad, 0, &g).unwrap_err().contains("checksum"));
        assert!(parse_entry(&b, 0, &Guid::random()).is_err());
    }

    fn search(log: &[u8], g: &Guid) -> Option<Vec<LogEntry>> {
        find_active_sequence(Path::new("t"), log.len() as u64, g, |p, buf| {
            buf.copy_from_slice(&log[p as usize..p as usize + buf.len()]);
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn finds_newest_sequence_with_wrap() {
        let g = Guid::random();
        let mut log = vec![0u8; 64 * 1024];
        let w = |v| {
            vec![LogWrite::Data {
                file_offset: 0x40_0000,
                data: sector(v),
            }]
        };
        // An old, complete sequence at 0.
        let e = builder(10, 0, g, w(1)).to_bytes();
        log[..e.len()].copy_from_slice(&e);
        // A newer one of two entries, the second wrapping around the end of the log.
        let e1 = builder(20, 0xc000, g, w(2)).to_bytes();
        log[0xc000..0xe000].copy_from_slice(&e1);
        let e2 = builder(21, 0xc000, g, w(3)).to_bytes();
        log[0xe000..0x10000].copy_from_slice(&e2);
        let seq = search(&log, &g).unwrap();
        assert_eq!(
            seq.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
            vec![20, 21]
        );
        // The same two entries with the second one wrapping around the end of the log.
        let mut log2 = vec![0u8; 64 * 1024];
        let e1 = builder(20, 0xd000, g, w(2)).to_bytes();
        log2[0xd000..0xf000].copy_from_slice(&e1);
        let e2 = builder(21, 0xd000, g, w(3)).to_bytes();
        log2[0xf000..0x10000].copy_from_slice(&e2[..4096]);
        log2[..4096].copy_from_slice(&e2[4096..]);
        let seq = search(&log2, &g).unwrap();
        assert_eq!(
            seq.iter().map(|e| e.sequence_number).collect::<Vec<_>>(),
            vec![20, 21]
        );
        let o = Overlay::from_sequence(&seq);
        let mut got = Vec::new();
        o.for_each_in(0x40_0000, 4096, |_, n, d| got.push((n, d.map(|d| d[1]))));
        assert_eq!(got, vec![(4096, Some(3))]);
        // A head whose tail points at nothing valid is not a sequence.
        let mut log3 = vec![0u8; 64 * 1024];
        let e = builder(30, 0x8000, g, w(4)).to_bytes();
        log3[..e.len()].copy_from_slice(&e);
        assert!(search(&log3, &g).is_none());
        assert!(search(&[0u8; 8192], &g).is_none());
    }

    #[test]
    fn overlay_splits_ranges() {
        let mut o = Overlay::default();
        o.insert(0, 100, Some(vec![1; 100]));
        o.insert(40, 20, None);
        o.insert(90, 20, Some(vec![2; 20]));
        let r: Vec<_> = o
            .ranges()
            .map(|(s, l, d)| (s, l, d.map(|d| d[0])))
            .collect();
        assert_eq!(
            r,
            vec![
                (0, 40, Some(1)),
                (40, 20, None),
                (60, 30, Some(1)),
                (90, 20, Some(2))
            ]
        );
        let mut seen = Vec::new();
        o.for_each_in(50, 45, |skip, n, d| seen.push((skip, n, d.map(|d| d[0]))));
        assert_eq!(
            seen,
            vec![(0, 10, None), (10, 30, Some(1)), (40, 5, Some(2))]
        );
        assert_eq!(o.end(), 110);
    }
}
