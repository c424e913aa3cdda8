// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The VHDX metadata region: a 64 KiB table of items (GUID, offset, length, flags)
//! followed by the items themselves. The system items describe the virtual disk.

use super::guid::{
    Guid, FILE_PARAMETERS, LOGICAL_SECTOR_SIZE, PAGE83_DATA, PARENT_LOCATOR, PHYSICAL_SECTOR_SIZE,
    VIRTUAL_DISK_SIZE,
};
use super::header::{le16, le32, le64, KIB64, MIB};

/// Size of the metadata table at the start of the region.
pub const TABLE_SIZE: usize = 64 * 1024;
/// Most entries of the table.
pub const MAX_ENTRIES: u16 = 2047;
/// Smallest payload block size.
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest payload block size.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest virtual disk.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// Item flag: user metadata.
pub const FLAG_IS_USER: u32 = 1;
/// Item flag: describes the virtual disk (not the file).
pub const FLAG_IS_VIRTUAL_DISK: u32 = 2;
/// Item flag: a reader that does not know the item must refuse the file.
pub const FLAG_IS_REQUIRED: u32 = 4;

/// File parameters flag: blocks stay allocated (fixed disks).
pub const PARAM_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameters flag: differencing disk.
pub const PARAM_HAS_PARENT: u32 = 2;

/// One entry of the metadata table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Item id.
    pub guid: Guid,
    /// Offset of the item from the start of the metadata region.
    pub offset: u32,
    /// Length of the item.
    pub length: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

/// The virtual disk as the metadata describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskParams {
    /// Payload block size (power of two, 1..256 MiB).
    pub block_size: u32,
    /// Blocks are never deallocated (fixed disks set this).
    pub leave_blocks_allocated: bool,
    /// Differencing disk.
    pub has_parent: bool,
    /// Virtual disk size in bytes.
    pub virtual_disk_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector_size: u32,
    /// Disk id for SCSI page 83.
    pub page83: Guid,
}

/// A problem found in the metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetadataProblem {
    /// Malformed.
    Corrupt(String),
    /// Well-formed but uses something we do not implement.
    Unsupported(String),
}

fn corrupt<T>(s: impl Into<String>) -> Result<T, MetadataProblem> {
    Err(MetadataProblem::Corrupt(s.into()))
}

fn item_name(g: &Guid) -> String {
    let n = match *g {
        FILE_PARAMETERS => "file parameters",
        VIRTUAL_DISK_SIZE => "virtual disk size",
        PAGE83_DATA => "page 83 data",
        LOGICAL_SECTOR_SIZE => "logical sector size",
        PHYSICAL_SECTOR_SIZE => "physical sector size",
        PARENT_LOCATOR => "parent locator",
        _ => return format!("metadata item {g}"),
    };
    n.to_string()
}

/// Parses the 64 KiB metadata table of a region of `region_len` bytes.
pub fn parse_table(b: &[u8], region_len: u64) -> Result<Vec<MetadataEntry>, MetadataProblem> {
    let Some(b) = b.get(..TABLE_SIZE) else {
        return corrupt("metadata table is truncated");
    };
    if &b[..8] != b"metadata" {
        return corrupt("no \"metadata\" signature at the start of the metadata region");
    }
    let count = le16(b, 10);
    if count > MAX_ENTRIES {
        return corrupt(format!(
            "metadata table has {count} entries, more than the {MAX_ENTRIES} allowed"
        ));
    }
    let mut out: Vec<MetadataEntry> = Vec::with_capacity(usize::from(count));
    for i in 0..usize::from(count) {
        let at = 32 + 32 * i;
        let e = MetadataEntry {
            guid: Guid::read(b, at),
            offset: le32(b, at + 16),
            length: le32(b, at + 20),
            flags: le32(b, at + 24),
        };
        if e.length > 0 {
            let end = u64::from(e.offset) + u64::from(e.length);
            if u64::from(e.offset) < KIB64 || end > region_len {
                return corrupt(format!(
                    "{} at {:#x}+{:#x} lies outside the metadata region's item area ({region_len:#x} bytes)",
                    item_name(&e.guid),
                    e.offset,
                    e.length
                ));
            }
        }
        let user = e.flags & FLAG_IS_USER;
        if out
            .iter()
            .any(|o| o.guid == e.guid && o.flags & FLAG_IS_USER == user)
        {
            return corrupt(format!("{} is listed twice", item_name(&e.guid)));
        }
        out.push(e);
    }
    Ok(out)
}

/// Interprets the metadata items. `read_item(entry)` returns an item's bytes (the caller
/// reads `entry.length` bytes at `entry.offset` of the region).
pub fn parse_params<E>(
    entries: &[MetadataEntry],
    mut read_item: impl FnMut(&MetadataEntry) -> Result<Vec<u8>, E>,
) -> Result<Result<DiskParams, MetadataProblem>, E> {
    let mut file_params: Option<(u32, u32)> = None;
    let mut size: Option<u64> = None;
    let mut lss: Option<u32> = None;
    let mut pss: Option<u32> = None;
    let mut page83 = Guid::ZERO;
    for e in entries {
        let known = matches!(
            e.guid,
            FILE_PARAMETERS
                | VIRTUAL_DISK_SIZE
                | PAGE83_DATA
                | LOGICAL_SECTOR_SIZE
                | PHYSICAL_SECTOR_SIZE
                | PARENT_LOCATOR
        ) && e.flags & FLAG_IS_USER == 0;
        if !known {
            if e.flags & FLAG_IS_REQUIRED != 0 {
                return Ok(Err(MetadataProblem::Unsupported(format!(
                    "required {} is not known to this implementation",
                    item_name(&e.guid)
                ))));
            }
            continue;
        }
        let want = match e.guid {
            FILE_PARAMETERS | VIRTUAL_DISK_SIZE => 8,
            PAGE83_DATA => 16,
            LOGICAL_SECTOR_SIZE | PHYSICAL_SECTOR_SIZE => 4,
            _ => 0, // parent locator: judged with has_parent below
        };
        if want == 0 {
            continue;
        }
        if e.length < want {
            return Ok(corrupt(format!(
                "{} is {} bytes, expected {want}",
                item_name(&e.guid),
                e.length
            )));
        }
        let mut item = read_item(&MetadataEntry { length: want, ..*e })?;
        item.resize(want as usize, 0);
        match e.guid {
            FILE_PARAMETERS => file_params = Some((le32(&item, 0), le32(&item, 4))),
            VIRTUAL_DISK_SIZE => size = Some(le64(&item, 0)),
            PAGE83_DATA => page83 = Guid::read(&item, 0),
            LOGICAL_SECTOR_SIZE => lss = Some(le32(&item, 0)),
            PHYSICAL_SECTOR_SIZE => pss = Some(le32(&item, 0)),
            _ => {}
        }
    }
    Ok(check_params(file_params, size, lss, pss, page83))
}

fn check_params(
    file_params: Option<(u32, u32)>,
    size: Option<u64>,
    lss: Option<u32>,
    pss: Option<u32>,
    page83: Guid,
) -> Result<DiskParams, MetadataProblem> {
    let Some((block_size, flags)) = file_params else {
        return corrupt("the file parameters metadata item is missing");
    };
    let Some(size) = size else {
        return corrupt("the virtual disk size metadata item is missing");
    };
    let Some(lss) = lss else {
        return corrupt("the logical sector size metadata item is missing");
    };
    let pss = pss.unwrap_or(lss);
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return corrupt(format!(
            "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        ));
    }
    if lss != 512 && lss != 4096 {
        return corrupt(format!("logical sector size {lss} is neither 512 nor 4096"));
    }
    if pss != 512 && pss != 4096 {
        return corrupt(format!(
            "physical sector size {pss} is neither 512 nor 4096"
        ));
    }
    if size > MAX_DISK_SIZE {
        return corrupt(format!(
            "virtual disk size {size} is above the 64 TiB limit"
        ));
    }
    if size % u64::from(lss) != 0 {
        return corrupt(format!(
            "virtual disk size {size} is not a multiple of the logical sector size {lss}"
        ));
    }
    let has_parent = flags & PARAM_HAS_PARENT != 0;
    if has_parent {
        return Err(MetadataProblem::Unsupported(
            "differencing VHDX images (with a parent) are not supported".into(),
        ));
    }
    Ok(DiskParams {
        block_size,
        leave_blocks_allocated: flags & PARAM_LEAVE_BLOCKS_ALLOCATED != 0,
        has_parent,
        virtual_disk_size: size,
        logical_sector_size: lss,
        physical_sector_size: pss,
        page83,
    })
}

/// Serialises a metadata region (table and items) of `region_len` bytes for `p`.
pub fn region_bytes(p: &DiskParams, region_len: u64) -> Vec<u8> {
    let mut b = vec![0u8; region_len.max(MIB) as usize];
    b[..8].copy_from_slice(b"metadata");
    let mut flags = 0u32;
    if p.leave_blocks_allocated {
        flags |= PARAM_LEAVE_BLOCKS_ALLOCATED;
    }
    if p.has_parent {
        flags |= PARAM_HAS_PARENT;
    }
    let mut fp = Vec::new();
    fp.extend_from_slice(&p.block_size.to_le_bytes());
    fp.extend_from_slice(&flags.to_le_bytes());
    let items: [(Guid, u32, Vec<u8>); 5] = [
        (FILE_PARAMETERS, FLAG_IS_REQUIRED, fp),
        (
            VIRTUAL_DISK_SIZE,
            FLAG_IS_VIRTUAL_DISK | FLAG_IS_REQUIRED,
            p.virtual_disk_size.to_le_bytes().to_vec(),
        ),
        (
            PAGE83_DATA,
            FLAG_IS_VIRTUAL_DISK | FLAG_IS_REQUIRED,
            p.page83.0.to_vec(),
        ),
        (
            LOGICAL_SECTOR_SIZE,
            FLAG_IS_VIRTUAL_DISK | FLAG_IS_REQUIRED,
            p.logical_sector_size.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            FLAG_IS_VIRTUAL_DISK | FLAG_IS_REQUIRED,
            p.physical_sector_size.to_le_bytes().to_vec(),
        ),
    ];
    b[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut data_at = KIB64 as usize;
    for (i, (g, f, data)) in items.iter().enumerate() {
        let at = 32 + 32 * i;
        b[at..at + 16].copy_from_slice(&g.0);
        b[at + 16..at + 20].copy_from_slice(&(data_at as u32).to_le_bytes());
        b[at + 20..at + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&f.to_le_bytes());
        b[data_at..data_at + data.len()].copy_from_slice(data);
        data_at += data.len();
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> DiskParams {
        DiskParams {
            block_size: 8 << 20,
            leave_blocks_allocated: false,
            has_parent: false,
            virtual_disk_size: 100 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            page83: Guid::random(),
        }
    }

    fn parse(b: &[u8]) -> Result<DiskParams, MetadataProblem> {
        let entries = parse_table(b, b.len() as u64)?;
        parse_params(&entries, |e| -> Result<Vec<u8>, ()> {
            let s = e.offset as usize;
            Ok(b[s..s + e.length as usize].to_vec())
        })
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let p = params();
        let b = region_bytes(&p, MIB);
        assert_eq!(parse(&b).unwrap(), p);
    }

    #[test]
    fn rejects_bad_values() {
        let mut p = params();
        p.block_size = 3 << 20;
        assert!(matches!(
            parse(&region_bytes(&p, MIB)),
            Err(MetadataProblem::Corrupt(_))
        ));
        let mut p = params();
        p.has_parent = true;
        assert!(matches!(
            parse(&region_bytes(&p, MIB)),
            Err(MetadataProblem::Unsupported(_))
        ));
        let mut p = params();
        p.virtual_disk_size = 1000;
        assert!(parse(&region_bytes(&p, MIB)).is_err());
        // An unknown required item.
        let mut b = region_bytes(&params(), MIB);
        b[10] = 6;
        let at = 32 + 32 * 5;
        b[at..at + 16].copy_from_slice(&Guid::random().0);
        b[at + 24] = FLAG_IS_REQUIRED as u8;
        assert!(matches!(parse(&b), Err(MetadataProblem::Unsupported(_))));
        // An item pointing outside the region.
        let mut b = region_bytes(&params(), MIB);
        b[32 + 16..32 + 20].copy_from_slice(&(MIB as u32).to_le_bytes());
        assert!(matches!(parse(&b), Err(MetadataProblem::Corrupt(_))));
    }
}
