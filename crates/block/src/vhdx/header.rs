// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The VHDX header section (first 1 MiB): file type identifier, the two headers and the
//! two region tables. All fields are little-endian; headers and region tables carry a
//! CRC-32C of themselves with the checksum field counted as zero.

use super::crc32c::crc32c_with_zero_field;
use super::guid::{Guid, BAT_REGION, METADATA_REGION};

/// 1 MiB, the alignment of every VHDX structure outside the header section.
pub const MIB: u64 = 1 << 20;
/// 64 KiB.
pub const KIB64: u64 = 64 * 1024;
/// The file type identifier's signature at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Offsets of the two headers.
pub const HEADER_OFFSETS: [u64; 2] = [KIB64, 2 * KIB64];
/// Bytes of a header covered by its checksum.
pub const HEADER_SIZE: usize = 4096;
/// Offsets of the two region tables.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [3 * KIB64, 4 * KIB64];
/// Size of a region table.
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// Most entries a region table may hold.
pub const MAX_REGION_ENTRIES: u32 = 2047;
/// End of the header section.
pub const HEADER_SECTION_END: u64 = MIB;

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// The file type identifier (offset 0): signature and creator string.
pub fn file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; KIB64 as usize];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    for (i, u) in creator.encode_utf16().take(255).enumerate() {
        let at = 8 + 2 * i;
        b[at..at + 2].copy_from_slice(&u.to_le_bytes());
    }
    b
}

/// One VHDX header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Sequence number: the valid header with the larger one is current.
    pub sequence_number: u64,
    /// Changed before the first change to the file after each open.
    pub file_write_guid: Guid,
    /// Changed before the first change to user-visible data after each open.
    pub data_write_guid: Guid,
    /// Non-zero when the log holds entries to replay.
    pub log_guid: Guid,
    /// Log format version (must be 0).
    pub log_version: u16,
    /// Format version (must be 1).
    pub version: u16,
    /// Bytes of the log (a multiple of 1 MiB).
    pub log_length: u32,
    /// File offset of the log (a multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parses a 4 KiB header and checks signature and checksum.
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        let b = b
            .get(..HEADER_SIZE)
            .ok_or_else(|| "VHDX header is truncated".to_string())?;
        if &b[..4] != b"head" {
            return Err("no \"head\" signature".into());
        }
        let stored = le32(b, 4);
        let want = crc32c_with_zero_field(b, 4);
        if stored != want {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {want:#010x})"
            ));
        }
        Ok(Header {
            sequence_number: le64(b, 8),
            file_write_guid: Guid::read(b, 16),
            data_write_guid: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    /// Serialises the header (4 KiB) with its checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let c = crc32c_with_zero_field(&b, 4);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        b
    }
}

/// One entry of the region table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// What the region is.
    pub guid: Guid,
    /// File offset (a multiple of 1 MiB).
    pub file_offset: u64,
    /// Length (a multiple of 1 MiB).
    pub length: u32,
    /// Whether a reader that does not know the region must refuse the file.
    pub required: bool,
}

impl RegionEntry {
    /// End of the region in the file.
    pub fn end(&self) -> u64 {
        self.file_offset.saturating_add(u64::from(self.length))
    }

    /// A name for messages.
    pub fn name(&self) -> String {
        if self.guid == BAT_REGION {
            "BAT region".into()
        } else if self.guid == METADATA_REGION {
            "metadata region".into()
        } else {
            format!("region {}", self.guid)
        }
    }
}

/// Parses a 64 KiB region table: signature, checksum, entry count and each entry's
/// alignment. Does not judge which regions are known.
pub fn parse_region_table(b: &[u8]) -> Result<Vec<RegionEntry>, String> {
    let b = b
        .get(..REGION_TABLE_SIZE)
        .ok_or_else(|| "region table is truncated".to_string())?;
    if &b[..4] != b"regi" {
        return Err("no \"regi\" signature".into());
    }
    let stored = le32(b, 4);
    let want = crc32c_with_zero_field(b, 4);
    if stored != want {
        return Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {want:#010x})"
        ));
    }
    let count = le32(b, 8);
    if count > MAX_REGION_ENTRIES {
        return Err(format!(
            "{count} entries, more than the {MAX_REGION_ENTRIES} allowed"
        ));
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let at = 16 + 32 * i;
        let e = RegionEntry {
            guid: Guid::read(b, at),
            file_offset: le64(b, at + 16),
            length: le32(b, at + 24),
            required: le32(b, at + 28) & 1 != 0,
        };
        if e.file_offset % MIB != 0 || e.file_offset < HEADER_SECTION_END {
            return Err(format!(
                "{} at offset {:#x} is not 1 MiB-aligned past the header section",
                e.name(),
                e.file_offset
            ));
        }
        if u64::from(e.length) % MIB != 0 || e.length == 0 {
            return Err(format!(
                "{} has length {:#x}, not a non-zero multiple of 1 MiB",
                e.name(),
                e.length
            ));
        }
        if out.iter().any(|o: &RegionEntry| o.guid == e.guid) {
            return Err(format!("{} is listed twice", e.name()));
        }
        out.push(e);
    }
    Ok(out)
}

/// Serialises a region table with its checksum.
pub fn region_table_bytes(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[..4].copy_from_slice(b"regi");
    b[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = 16 + 32 * i;
        b[at..at + 16].copy_from_slice(&e.guid.0);
        b[at + 16..at + 24].copy_from_slice(&e.file_offset.to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&e.length.to_le_bytes());
        b[at + 28..at + 32].copy_from_slice(&u32::from(e.required).to_le_bytes());
    }
    let c = crc32c_with_zero_field(&b, 4);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            sequence_number: 9,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b).unwrap(), h);
        b[100] = 1;
        assert!(Header::parse(&b).unwrap_err().contains("checksum"));
    }

    #[test]
    fn region_table_round_trip_and_checks() {
        let e = [
            RegionEntry {
                guid: BAT_REGION,
                file_offset: 2 * MIB,
                length: MIB as u32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_REGION,
                file_offset: 3 * MIB,
                length: MIB as u32,
                required: true,
            },
        ];
        let b = region_table_bytes(&e);
        assert_eq!(parse_region_table(&b).unwrap(), e.to_vec());
        let bad = region_table_bytes(&[RegionEntry {
            file_offset: 12345,
            ..e[0]
        }]);
        assert!(parse_region_table(&bad).unwrap_err().contains("aligned"));
        let dup = region_table_bytes(&[e[0], e[0]]);
        assert!(parse_region_table(&dup).unwrap_err().contains("twice"));
        let id = file_identifier("vmkit");
        assert_eq!(&id[..8], FILE_SIGNATURE);
        assert_eq!(&id[8..12], &[b'v', 0, b'm', 0]);
    }
}
