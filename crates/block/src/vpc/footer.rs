// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The VHD footer ("hard disk footer", 512 bytes, big-endian) and CHS geometry.
//!
//! Every VHD ends with a footer; dynamic disks also keep a copy at offset 0. The footer
//! carries the disk type, the size and a CHS geometry. Which of the two sizes is the
//! virtual size depends on the program that created the image (see [`Footer::virtual_size`]).

/// Size of the footer and of a VHD sector.
pub const FOOTER_SIZE: usize = 512;
/// The footer's "cookie".
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// `data_offset` of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;
/// The largest CHS geometry: 65535 cylinders, 16 heads, 255 sectors per track.
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Largest disk QEMU and Virtual PC accept: 2040 GiB, in 512-byte sectors.
pub const MAX_SECTORS: u64 = 0xff00_0000;

/// Disk type field of the footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    /// Data at offset 0, footer at the end.
    Fixed,
    /// Dynamic header, block allocation table and blocks.
    Dynamic,
    /// A dynamic disk whose unallocated sectors come from a parent (unsupported).
    Differencing,
}

impl DiskType {
    /// The on-disk value.
    pub fn to_raw(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// Parses the on-disk value.
    pub fn from_raw(v: u32) -> Option<Self> {
        match v {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
}

/// A parsed VHD footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Feature bits (bit 1 "reserved" is always set).
    pub features: u32,
    /// File format version (0x00010000).
    pub version: u32,
    /// Offset of the dynamic header, or [`NO_DATA_OFFSET`] for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01.
    pub timestamp: u32,
    /// Four-character code of the creating program ("qemu", "win ", "vpc ", ...).
    pub creator_app: [u8; 4],
    /// Version of the creating program.
    pub creator_version: u32,
    /// Host OS of the creating program ("Wi2k").
    pub creator_os: u32,
    /// Size at creation, in bytes.
    pub original_size: u64,
    /// Current size, in bytes.
    pub current_size: u64,
    /// Cylinders of the CHS geometry.
    pub cylinders: u16,
    /// Heads of the CHS geometry.
    pub heads: u8,
    /// Sectors per track of the CHS geometry.
    pub sectors_per_track: u8,
    /// Disk type.
    pub disk_type: DiskType,
    /// Checksum as stored.
    pub checksum: u32,
    /// Unique id of the disk.
    pub uuid: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
}

fn be16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// The VHD checksum: one's complement of the byte sum, with the checksum field (4 bytes at
/// `checksum_at`) counted as zero.
pub fn vhd_checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if i >= checksum_at && i < checksum_at + 4 {
            continue;
        }
        sum = sum.wrapping_add(u32::from(b));
    }
    !sum
}

/// CHS geometry `(cylinders, heads, sectors per track)` for a disk of `total_sectors`, as
/// the VHD specification (and QEMU) compute it.
pub fn chs_geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(MAX_CHS_SECTORS);
    let (heads, spt, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    let cyls = (cth / heads).min(65535);
    (cyls as u16, heads as u8, spt as u8)
}

/// The size in sectors a disk gets when QEMU/Virtual PC round `requested_sectors` to a CHS
/// geometry: the smallest geometry that holds the request, or the request itself when the
/// geometry is the largest one (which cannot describe bigger disks).
pub fn chs_rounded_sectors(requested_sectors: u64) -> (u64, (u16, u8, u8)) {
    let mut geo = (0u16, 0u8, 0u8);
    let mut i = 0u64;
    loop {
        let cap = u64::from(geo.0) * u64::from(geo.1) * u64::from(geo.2);
        if requested_sectors <= cap {
            break;
        }
        // The geometry grows with its argument; a bounded number of steps always suffices
        // (at most one track's worth of cylinders), and the maximum geometry ends the loop.
        geo = chs_geometry(requested_sectors + i);
        i += 1;
        if u64::from(geo.0) * u64::from(geo.1) * u64::from(geo.2) == MAX_CHS_SECTORS {
            break;
        }
    }
    let cap = u64::from(geo.0) * u64::from(geo.1) * u64::from(geo.2);
    if cap == MAX_CHS_SECTORS {
        (requested_sectors, geo)
    } else {
        (cap, geo)
    }
}

impl Footer {
    /// Parses and checks a 512-byte footer. Returns a reason on failure.
    pub fn parse(b: &[u8]) -> Result<Footer, String> {
        let b = b
            .get(..FOOTER_SIZE)
            .ok_or_else(|| format!("VHD footer is {} bytes, expected 512", b.len()))?;
        if &b[..8] != FOOTER_COOKIE {
            return Err("no \"conectix\" cookie in the VHD footer".into());
        }
        let checksum = be32(b, 64);
        let want = vhd_checksum(b, 64);
        if checksum != want {
            return Err(format!(
                "VHD footer checksum mismatch (stored {checksum:#010x}, computed {want:#010x})"
            ));
        }
        let raw_type = be32(b, 60);
        let disk_type = DiskType::from_raw(raw_type)
            .ok_or_else(|| format!("unknown VHD disk type {raw_type}"))?;
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[68..84]);
        Ok(Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app,
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            cylinders: be16(b, 56),
            heads: b[58],
            sectors_per_track: b[59],
            disk_type,
            checksum,
            uuid,
            saved_state: b[84],
        })
    }

    /// Serialises the footer, computing the checksum.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.cylinders.to_be_bytes());
        b[58] = self.heads;
        b[59] = self.sectors_per_track;
        b[60..64].copy_from_slice(&self.disk_type.to_raw().to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        let sum = vhd_checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Sectors described by the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// Whether the size comes from `current_size` rather than the CHS geometry.
    ///
    /// Virtual PC (and QEMU's classic "qemu" creator) size the disk by its geometry;
    /// Hyper-V ("win "), QEMU with `force_size` ("qem2"), Disk2vhd ("d2v "), XenServer
    /// ("tap\0") and XenConverter ("CTXS") use `current_size`. A disk with the maximum
    /// geometry always uses `current_size` (the geometry cannot describe it). This is the
    /// rule QEMU applies, so both agree on the virtual size.
    pub fn uses_current_size(&self) -> bool {
        let app = &self.creator_app;
        let by_app =
            app == b"win " || app == b"qem2" || app == b"d2v " || app == b"CTXS" || app == b"tap\0";
        by_app || self.chs_sectors() == MAX_CHS_SECTORS
    }

    /// The virtual disk size in bytes (a multiple of 512), as QEMU computes it.
    pub fn virtual_size(&self) -> u64 {
        if self.uses_current_size() {
            self.current_size / 512 * 512
        } else {
            self.chs_sectors() * 512
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_qemu_for_10m() {
        // qemu-img create -f vpc x.vhd 10M -> CHS 302/4/17, 10514432 bytes.
        let (sectors, geo) = chs_rounded_sectors(10 * 1024 * 1024 / 512);
        assert_eq!(geo, (302, 4, 17));
        assert_eq!(sectors * 512, 10_514_432);
    }

    #[test]
    fn geometry_large_and_max() {
        let (s, geo) = chs_rounded_sectors(MAX_CHS_SECTORS + 1000);
        assert_eq!(s, MAX_CHS_SECTORS + 1000);
        assert_eq!(geo, (65535, 16, 255));
        let (s, _) = chs_rounded_sectors(0);
        assert_eq!(s, 0);
        for req in [1u64, 17, 1000, 20_000, 4_000_000, 100_000_000] {
            let (s, geo) = chs_rounded_sectors(req);
            assert!(s >= req, "{req} -> {s}");
            assert_eq!(
                s,
                u64::from(geo.0) * u64::from(geo.1) * u64::from(geo.2),
                "{req}"
            );
        }
    }

    #[test]
    fn footer_round_trip_and_checksum() {
        let f = Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: 512,
            timestamp: 1234,
            creator_app: *b"qemu",
            creator_version: 0x0005_0003,
            creator_os: 0x5769_326b,
            original_size: 10_514_432,
            current_size: 10_514_432,
            cylinders: 302,
            heads: 4,
            sectors_per_track: 17,
            disk_type: DiskType::Dynamic,
            checksum: 0,
            uuid: [7; 16],
            saved_state: 0,
        };
        let mut b = f.to_bytes();
        let p = Footer::parse(&b).unwrap();
        assert_eq!(p.virtual_size(), 10_514_432);
        assert_eq!(p.disk_type, DiskType::Dynamic);
        b[100] ^= 1;
        assert!(Footer::parse(&b).unwrap_err().contains("checksum"));
        assert!(Footer::parse(&b[..10]).is_err());
    }
}
