// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The VHDX block allocation table: 64-bit entries (state in bits 0..3, file offset in MiB
//! in bits 20..64), payload block entries interleaved with one sector bitmap entry after
//! every `chunk_ratio` payload entries.

use super::header::MIB;

/// Payload block: not present in this file (reads as zeroes without a parent).
pub const PAYLOAD_NOT_PRESENT: u8 = 0;
/// Payload block: contents undefined (reads as zeroes here).
pub const PAYLOAD_UNDEFINED: u8 = 1;
/// Payload block: reads as zeroes.
pub const PAYLOAD_ZERO: u8 = 2;
/// Payload block: unmapped by a trim (reads as zeroes here).
pub const PAYLOAD_UNMAPPED: u8 = 3;
/// Payload block: fully present at its file offset.
pub const PAYLOAD_FULLY_PRESENT: u8 = 6;
/// Payload block: partly present (differencing disks only).
pub const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap block: not present.
pub const SB_NOT_PRESENT: u8 = 0;
/// Sector bitmap block: present.
pub const SB_PRESENT: u8 = 6;

/// The state bits of an entry.
pub fn state(entry: u64) -> u8 {
    (entry & 7) as u8
}

/// The file offset an entry points at (bits 20..64, in MiB, as bytes).
pub fn file_offset(entry: u64) -> u64 {
    (entry >> 20) << 20
}

/// Builds an entry. `offset` must be 1 MiB-aligned.
pub fn entry(state: u8, offset: u64) -> u64 {
    (offset / MIB) << 20 | u64::from(state & 7)
}

/// Name of a payload state, for messages.
pub fn payload_state_name(s: u8) -> &'static str {
    match s {
        PAYLOAD_NOT_PRESENT => "NOT_PRESENT",
        PAYLOAD_UNDEFINED => "UNDEFINED",
        PAYLOAD_ZERO => "ZERO",
        PAYLOAD_UNMAPPED => "UNMAPPED",
        PAYLOAD_FULLY_PRESENT => "FULLY_PRESENT",
        PAYLOAD_PARTIALLY_PRESENT => "PARTIALLY_PRESENT",
        _ => "invalid",
    }
}

/// The BAT geometry of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatLayout {
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks of the disk.
    pub data_blocks: u64,
    /// Total entries (payload and sector bitmap).
    pub total_entries: u64,
}

impl BatLayout {
    /// Layout for a non-differencing disk.
    pub fn new(disk_size: u64, block_size: u32, logical_sector_size: u32) -> BatLayout {
        let chunk_ratio = ((1u64 << 23) * u64::from(logical_sector_size)) / u64::from(block_size);
        let data_blocks = disk_size.div_ceil(u64::from(block_size));
        let total_entries = if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        BatLayout {
            chunk_ratio,
            data_blocks,
            total_entries,
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// Whether BAT index `i` is a sector bitmap entry.
    pub fn is_bitmap_index(&self, i: u64) -> bool {
        (i + 1) % (self.chunk_ratio + 1) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        // 512-byte sectors, 1 MiB blocks: chunk ratio 4096.
        let l = BatLayout::new(8 << 30, 1 << 20, 512);
        assert_eq!(l.chunk_ratio, 4096);
        assert_eq!(l.data_blocks, 8192);
        assert_eq!(l.total_entries, 8192 + 1);
        assert_eq!(l.payload_index(4095), 4095);
        assert_eq!(l.payload_index(4096), 4097);
        assert!(l.is_bitmap_index(4096));
        assert!(!l.is_bitmap_index(4097));
        let l = BatLayout::new(100 << 20, 8 << 20, 512);
        assert_eq!(
            (l.chunk_ratio, l.data_blocks, l.total_entries),
            (512, 13, 13)
        );
        assert_eq!(BatLayout::new(0, 1 << 20, 512).total_entries, 0);
        let e = entry(PAYLOAD_FULLY_PRESENT, 5 * MIB);
        assert_eq!(state(e), PAYLOAD_FULLY_PRESENT);
        assert_eq!(file_offset(e), 5 * MIB);
        assert_eq!(payload_state_name(state(e)), "FULLY_PRESENT");
    }
}
