// SPDX-License-Identifier: Apache-2.0 OR MIT
//! On-disk metadata of the caching tier (all little-endian, CRC-32C protected).
//!
//! ```text
//! 0      superblock (4 KiB): magic "VMKCTIER", version, block size, slot count,
//!        origin size, table and data offsets, cache id, CRC-32C
//! 4 KiB  commit record 0 ┐ "VMKCOMIT", generation, which table copy, clean flag,
//! 8 KiB  commit record 1 ┘ CRC of that table copy, cache id, CRC-32C of the record
//! 12 KiB mapping table copy 0 ┐ one 16-byte entry per slot:
//!        mapping table copy 1 ┘ origin block (all ones = empty), flags (bit 0 dirty)
//!        data: slot i at data_offset + i * block_size (data_offset block-aligned)
//! ```
//!
//! A commit writes the table copy the current record does *not* point at, then the
//! record slot the current record does not occupy, with the next generation number. The
//! valid record with the highest generation whose table copy checks out is the state.

use super::super::vhdx::crc32c::crc32c;

/// Superblock magic.
pub const SB_MAGIC: &[u8; 8] = b"VMKCTIER";
/// Commit record magic.
pub const RECORD_MAGIC: &[u8; 8] = b"VMKCOMIT";
/// Metadata format version.
pub const VERSION: u32 = 1;
/// Size of the superblock and of each commit record area.
pub const SECTOR: u64 = 4096;
/// Offsets of the two commit records.
pub const RECORD_OFFSETS: [u64; 2] = [SECTOR, 2 * SECTOR];
/// Offset of the first table copy.
pub const TABLE_OFFSET: u64 = 3 * SECTOR;
/// Bytes per mapping table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Table entry of an empty slot.
pub const NO_BLOCK: u64 = u64::MAX;
/// Entry flag: the slot holds data not yet written to the origin.
pub const FLAG_DIRTY: u32 = 1;
/// Smallest cache block size.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest cache block size.
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;
/// Most slots (bounds the in-memory table).
pub const MAX_SLOTS: u64 = 1 << 26;

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Geometry of a formatted cache device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Cache block size (power of two).
    pub block_size: u32,
    /// Number of cache slots.
    pub nr_slots: u64,
    /// Size of the origin the cache was formatted for.
    pub origin_size: u64,
    /// Bytes of one table copy (a multiple of 4 KiB).
    pub table_bytes: u64,
    /// Offset of slot 0's data.
    pub data_offset: u64,
    /// Identifies this cache (commit records must carry it).
    pub cache_id: [u8; 16],
}

/// Table copy size for `nr_slots`.
pub fn table_bytes(nr_slots: u64) -> u64 {
    (nr_slots * ENTRY_SIZE).next_multiple_of(SECTOR)
}

/// Data offset for a geometry.
pub fn data_offset(nr_slots: u64, block_size: u32) -> u64 {
    (TABLE_OFFSET + 2 * table_bytes(nr_slots)).next_multiple_of(u64::from(block_size))
}

/// The most slots of `block_size` a cache device of `device_size` bytes holds.
pub fn slots_for(device_size: u64, block_size: u32) -> u64 {
    let bs = u64::from(block_size);
    let mut n = (device_size.saturating_sub(TABLE_OFFSET) / bs).min(MAX_SLOTS);
    while n > 0 && data_offset(n, block_size) + n * bs > device_size {
        // Each step removes at least one slot; the table shrinks with it.
        let over = data_offset(n, block_size) + n * bs - device_size;
        n = n.saturating_sub(over.div_ceil(bs).max(1));
    }
    n
}

impl Superblock {
    /// A superblock for a new cache.
    pub fn new(block_size: u32, nr_slots: u64, origin_size: u64, cache_id: [u8; 16]) -> Self {
        Superblock {
            block_size,
            nr_slots,
            origin_size,
            table_bytes: table_bytes(nr_slots),
            data_offset: data_offset(nr_slots, block_size),
            cache_id,
        }
    }

    /// End of the data area.
    pub fn end(&self) -> u64 {
        self.data_offset + self.nr_slots * u64::from(self.block_size)
    }

    /// Offset of table copy `copy` (0 or 1).
    pub fn table_offset(&self, copy: u32) -> u64 {
        TABLE_OFFSET + u64::from(copy.min(1)) * self.table_bytes
    }

    /// Serialises the superblock.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; SECTOR as usize];
        b[..8].copy_from_slice(SB_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.nr_slots.to_le_bytes());
        b[24..32].copy_from_slice(&self.origin_size.to_le_bytes());
        b[32..40].copy_from_slice(&TABLE_OFFSET.to_le_bytes());
        b[40..48].copy_from_slice(&self.table_bytes.to_le_bytes());
        b[48..56].copy_from_slice(&self.data_offset.to_le_bytes());
        b[56..72].copy_from_slice(&self.cache_id);
        let c = crc32c(&b[..4092]);
        b[4092..].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Parses and checks a superblock (its own consistency, not the device size).
    pub fn parse(b: &[u8]) -> Result<Superblock, String> {
        let b = b
            .get(..SECTOR as usize)
            .ok_or_else(|| "cache superblock is truncated".to_string())?;
        if &b[..8] != SB_MAGIC {
            return Err("no cache-tier superblock (magic \"VMKCTIER\" missing)".into());
        }
        let stored = le32(b, 4092);
        let want = crc32c(&b[..4092]);
        if stored != want {
            return Err(format!(
                "cache superblock checksum mismatch (stored {stored:#010x}, computed {want:#010x})"
            ));
        }
        let version = le32(b, 8);
        if version != VERSION {
            return Err(format!(
                "cache metadata version {version} (only {VERSION} is known)"
            ));
        }
        let block_size = le32(b, 12);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(format!(
                "cache block size {block_size} is not a power of two between 4 KiB and 16 MiB"
            ));
        }
        let nr_slots = le64(b, 16);
        if nr_slots == 0 || nr_slots > MAX_SLOTS {
            return Err(format!("cache slot count {nr_slots} is out of range"));
        }
        let mut cache_id = [0u8; 16];
        cache_id.copy_from_slice(&b[56..72]);
        let sb = Superblock::new(block_size, nr_slots, le64(b, 24), cache_id);
        if le64(b, 32) != TABLE_OFFSET
            || le64(b, 40) != sb.table_bytes
            || le64(b, 48) != sb.data_offset
        {
            return Err("cache superblock layout fields are inconsistent".into());
        }
        Ok(sb)
    }
}

/// A commit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitRecord {
    /// Increases by one per commit.
    pub generation: u64,
    /// Table copy (0/1) holding the committed table.
    pub table_copy: u32,
    /// Written by a clean shutdown: the dirty bits are exact. Otherwise every cached
    /// block is treated as dirty when the cache is opened.
    pub clean: bool,
    /// CRC-32C of the table copy's entries.
    pub table_crc: u32,
    /// Must match the superblock's cache id.
    pub cache_id: [u8; 16],
}

impl CommitRecord {
    /// Serialises the record (one 4 KiB sector).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; SECTOR as usize];
        b[..8].copy_from_slice(RECORD_MAGIC);
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..20].copy_from_slice(&self.table_copy.to_le_bytes());
        b[20..24].copy_from_slice(&u32::from(self.clean).to_le_bytes());
        b[24..28].copy_from_slice(&self.table_crc.to_le_bytes());
        b[28..44].copy_from_slice(&self.cache_id);
        let c = crc32c(&b[..44]);
        b[44..48].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Parses a record; `None` if it is not a valid record.
    pub fn parse(b: &[u8]) -> Option<CommitRecord> {
        let b = b.get(..48)?;
        if &b[..8] != RECORD_MAGIC || le32(b, 44) != crc32c(&b[..44]) {
            return None;
        }
        let table_copy = le32(b, 16);
        if table_copy > 1 {
            return None;
        }
        let mut cache_id = [0u8; 16];
        cache_id.copy_from_slice(&b[28..44]);
        Some(CommitRecord {
            generation: le64(b, 8),
            table_copy,
            clean: le32(b, 20) == 1,
            table_crc: le32(b, 24),
            cache_id,
        })
    }
}

/// One mapping table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Origin block held by the slot.
    pub block: Option<u64>,
    /// The slot holds data newer than the origin.
    pub dirty: bool,
}

/// Serialises table entries (exactly `entries.len() * 16` bytes).
pub fn encode_table(entries: impl Iterator<Item = Entry>) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        b.extend_from_slice(&e.block.unwrap_or(NO_BLOCK).to_le_bytes());
        let flags = if e.dirty && e.block.is_some() {
            FLAG_DIRTY
        } else {
            0
        };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    b
}

/// Parses `nr_slots` table entries for an origin of `origin_blocks` blocks, checking that
/// every block is in range and held by one slot at most.
pub fn parse_table(b: &[u8], nr_slots: u64, origin_blocks: u64) -> Result<Vec<Entry>, String> {
    let need = nr_slots
        .checked_mul(ENTRY_SIZE)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| "mapping table size overflows".to_string())?;
    let b = b
        .get(..need)
        .ok_or_else(|| "mapping table is truncated".to_string())?;
    let mut out = Vec::with_capacity(nr_slots as usize);
    let mut seen = std::collections::HashSet::new();
    for (i, e) in b.chunks_exact(ENTRY_SIZE as usize).enumerate() {
        let block = le64(e, 0);
        let flags = le32(e, 8);
        if flags & !FLAG_DIRTY != 0 || le32(e, 12) != 0 {
            return Err(format!("mapping entry {i} has unknown flags {flags:#x}"));
        }
        if block == NO_BLOCK {
            out.push(Entry {
                block: None,
                dirty: false,
            });
            continue;
        }
        if block >= origin_blocks {
            return Err(format!(
                "mapping entry {i} names origin block {block}, past the {origin_blocks} blocks of the origin"
            ));
        }
        if !seen.insert(block) {
            return Err(format!(
                "mapping entry {i} names origin block {block}, already held by another slot"
            ));
        }
        out.push(Entry {
            block: Some(block),
            dirty: flags & FLAG_DIRTY != 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_geometry() {
        let n = slots_for(64 << 20, 64 << 10);
        let sb = Superblock::new(64 << 10, n, 1 << 30, [3; 16]);
        assert!(sb.end() <= 64 << 20);
        assert!((1000..1024).contains(&n), "{n}");
        assert_eq!(Superblock::parse(&sb.to_bytes()).unwrap(), sb);
        let mut b = sb.to_bytes();
        b[20] ^= 1;
        assert!(Superblock::parse(&b).unwrap_err().contains("checksum"));
        assert_eq!(slots_for(1000, 4096), 0);
        assert_eq!(slots_for(0, 4096), 0);
        for size in [16384u64, 20000, 1 << 20, (1 << 20) + 4095, 123_456_789] {
            let n = slots_for(size, 4096);
            if n > 0 {
                assert!(Superblock::new(4096, n, 0, [0; 16]).end() <= size);
            }
        }
    }

    #[test]
    fn record_and_table() {
        let r = CommitRecord {
            generation: 7,
            table_copy: 1,
            clean: true,
            table_crc: 99,
            cache_id: [1; 16],
        };
        assert_eq!(CommitRecord::parse(&r.to_bytes()), Some(r));
        let mut b = r.to_bytes();
        b[9] ^= 1;
        assert_eq!(CommitRecord::parse(&b), None);
        let entries = [
            Entry {
                block: Some(5),
                dirty: true,
            },
            Entry {
                block: None,
                dirty: false,
            },
            Entry {
                block: Some(0),
                dirty: false,
            },
        ];
        let t = encode_table(entries.iter().copied());
        assert_eq!(parse_table(&t, 3, 10).unwrap(), entries.to_vec());
        assert!(parse_table(&t, 3, 5).unwrap_err().contains("past"));
        let dup = encode_table([entries[0], entries[0]].into_iter());
        assert!(parse_table(&dup, 2, 10)
            .unwrap_err()
            .contains("already held"));
        assert!(parse_table(&t, 4, 10).is_err());
    }
}
