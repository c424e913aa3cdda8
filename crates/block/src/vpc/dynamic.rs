// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The dynamic disk header ("cxsparse", 1024 bytes, big-endian) and the block allocation
//! table (BAT) geometry of dynamic VHDs.

use super::footer::{be32, be64, vhd_checksum, NO_DATA_OFFSET};

/// Size of the dynamic disk header.
pub const DYN_HEADER_SIZE: usize = 1024;
/// The dynamic header's cookie.
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// BAT entry of an unallocated block.
pub const BAT_UNALLOCATED: u32 = 0xffff_ffff;
/// Default block size (2 MiB), as Virtual PC, Hyper-V and QEMU use.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 * 1024 * 1024;
/// Largest block size accepted when opening (the format allows any power of two; nothing
/// writes more than a few MiB, and the bitmap of each block is read whole).
pub const MAX_BLOCK_SIZE: u32 = 1 << 30;

/// A parsed dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    /// Next structure (unused, all ones).
    pub data_offset: u64,
    /// File offset of the BAT.
    pub table_offset: u64,
    /// Header version (0x00010000).
    pub header_version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Bytes per block (a power of two, at least 512).
    pub block_size: u32,
    /// Checksum as stored.
    pub checksum: u32,
    /// Parent disk id (differencing disks only).
    pub parent_uuid: [u8; 16],
}

impl DynHeader {
    /// Parses and checks a dynamic header. Returns a reason on failure.
    pub fn parse(b: &[u8]) -> Result<DynHeader, String> {
        let b = b
            .get(..DYN_HEADER_SIZE)
            .ok_or_else(|| "VHD dynamic header is truncated".to_string())?;
        if &b[..8] != DYN_COOKIE {
            return Err("no \"cxsparse\" cookie in the VHD dynamic header".into());
        }
        let checksum = be32(b, 36);
        let want = vhd_checksum(b, 36);
        if checksum != want {
            return Err(format!(
                "VHD dynamic header checksum mismatch (stored {checksum:#010x}, computed {want:#010x})"
            ));
        }
        let block_size = be32(b, 32);
        if block_size < 512 || !block_size.is_power_of_two() {
            return Err(format!(
                "VHD block size {block_size} is not a power of two of at least 512"
            ));
        }
        if block_size > MAX_BLOCK_SIZE {
            return Err(format!(
                "VHD block size {block_size} is larger than the supported {MAX_BLOCK_SIZE}"
            ));
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&b[40..56]);
        Ok(DynHeader {
            data_offset: be64(b, 8),
            table_offset: be64(b, 16),
            header_version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size,
            checksum,
            parent_uuid,
        })
    }

    /// A header for a new dynamic disk.
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> Self {
        DynHeader {
            data_offset: NO_DATA_OFFSET,
            table_offset,
            header_version: 0x0001_0000,
            max_table_entries,
            block_size,
            checksum: 0,
            parent_uuid: [0; 16],
        }
    }

    /// Serialises the header, computing the checksum.
    pub fn to_bytes(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        b[..8].copy_from_slice(DYN_COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_uuid);
        let sum = vhd_checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Bytes of the per-block sector bitmap (one bit per 512-byte sector, padded to a
    /// whole number of sectors).
    pub fn bitmap_size(&self) -> u64 {
        bitmap_size(u64::from(self.block_size))
    }
}

/// Bytes of the sector bitmap of a block of `block_size` bytes.
pub fn bitmap_size(block_size: u64) -> u64 {
    (block_size / 512).div_ceil(8).next_multiple_of(512)
}

/// Parses a big-endian BAT.
pub fn parse_bat(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = DynHeader::new(1536, 6, DEFAULT_BLOCK_SIZE);
        let mut b = h.to_bytes();
        let p = DynHeader::parse(&b).unwrap();
        assert_eq!(p.table_offset, 1536);
        assert_eq!(p.max_table_entries, 6);
        assert_eq!(p.bitmap_size(), 512);
        b[32..36].copy_from_slice(&3000u32.to_be_bytes());
        assert!(DynHeader::parse(&b).unwrap_err().contains("checksum"));
        assert_eq!(bitmap_size(4096), 512);
        assert_eq!(bitmap_size(64 << 20), 16384);
        assert_eq!(
            parse_bat(&[0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff]),
            vec![3, BAT_UNALLOCATED]
        );
    }
}
