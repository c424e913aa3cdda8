// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The qcow2 header and header extensions: parsing, validation and serialisation.
//!
//! Every field read from the file is range-checked here, so the rest of the module can rely
//! on sane cluster sizes, table sizes and offsets.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::BlockError;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table accepted, in bytes (QEMU's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes (QEMU's limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size accepted (QEMU's limit: 2^61 - 1 bytes... we keep 2^56 so every
/// cluster offset fits the 56-bit L2 field comfortably).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Longest backing file name (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature: the image was not closed cleanly, refcounts may be wrong.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is valid (non-zlib compression).
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible feature this implementation understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is a valid raw image of the guest.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Byte offset of `incompatible_features` in a v3 header.
pub const OFF_INCOMPAT: u64 = 72;
/// Byte offset of `autoclear_features` in a v3 header.
pub const OFF_AUTOCLEAR: u64 = 88;
/// Byte offset of `refcount_table_offset` (followed by `refcount_table_clusters`).
pub const OFF_REFTABLE: u64 = 48;
/// Byte offset of `l1_size` (followed by `l1_table_offset`).
pub const OFF_L1: u64 = 36;

/// Compression algorithm of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), QEMU's default.
    Zlib,
    /// Zstandard.
    Zstd,
}

/// A parsed and validated qcow2 header.
#[derive(Clone, Debug)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// File offset of the active L1 table.
    pub l1_table_offset: u64,
    /// File offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Length of the fixed header.
    pub header_length: u32,
    /// Compression algorithm.
    pub compression: CompressionType,
    /// Backing file name, as stored.
    pub backing_file: Option<PathBuf>,
    /// Backing format from the header extension.
    pub backing_format: Option<String>,
    /// External data file name.
    pub data_file: Option<PathBuf>,
    /// Feature names from the feature name table: (type 0/1/2, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Whether a bitmaps extension is present.
    pub has_bitmaps: bool,
}

fn be32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

fn be64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (128-bit, subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Name of feature `bit` of kind `kind` (0 incompatible, 1 compatible, 2 autoclear)
    /// from the feature name table, if the image has one.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|(k, b, _)| *k == kind && *b == bit)
            .map(|(_, _, n)| n.as_str())
    }

    /// Parses and validates the header from the first cluster of the image (`buf` holds at
    /// least the first `min(4096, file_len)` bytes; the whole first cluster once the
    /// cluster size is known). `file_len` is the image size on the host.
    pub fn parse(buf: &[u8], path: &Path, file_len: u64) -> Result<Header, BlockError> {
        let corrupt = |r: String| BlockError::corrupt(path, r);
        if buf.len() < 72 {
            return Err(corrupt(format!(
                "file is only {} bytes, too short for a qcow2 header",
                buf.len()
            )));
        }
        if be32(buf, 0) != MAGIC {
            return Err(corrupt("no qcow2 magic".into()));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(BlockError::unsupported(
                path,
                format!("qcow2 version {version} (only 2 and 3 exist)"),
            ));
        }
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B .. 2 MiB)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let size = be64(buf, 24);
        let crypt_method = be32(buf, 32);
        if crypt_method != 0 {
            return Err(BlockError::unsupported(
                path,
                format!("encrypted image (crypt_method {crypt_method})"),
            ));
        }
        let l1_size = be32(buf, 36);
        let l1_table_offset = be64(buf, 40);
        let refcount_table_offset = be64(buf, 48);
        let refcount_table_clusters = be32(buf, 56);
        let nb_snapshots = be32(buf, 60);
        let snapshots_offset = be64(buf, 64);

        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt("v3 header truncated".into()));
            }
            (
                be64(buf, 72),
                be64(buf, 80),
                be64(buf, 88),
                be32(buf, 96),
                be32(buf, 100),
            )
        } else {
            (0, 0, 0, 4, 72)
        };
        if version == 3 {
            if header_length < 104 {
                return Err(corrupt(format!("header_length {header_length} < 104")));
            }
            if header_length % 8 != 0 {
                return Err(corrupt(format!(
                    "header_length {header_length} is not a multiple of 8"
                )));
            }
            if u64::from(header_length) > cluster_size {
                return Err(corrupt(format!(
                    "header_length {header_length} exceeds the cluster size {cluster_size}"
                )));
            }
        }
        if refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount_order {refcount_order} > 6 (refcounts wider than 64 bits)"
            )));
        }
        let compression_byte = if header_length > 104 {
            buf.get(104).copied().unwrap_or(0)
        } else {
            0
        };

        // Incompatible features: refuse unknown bits, naming them.
        let unknown = incompatible & !INCOMPAT_KNOWN;
        let mut h = Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            has_bitmaps: false,
        };
        // Extensions (parsed before reporting unknown bits, for the feature names).
        let ext_start = if version == 3 {
            header_length as usize
        } else {
            72
        };
        h.parse_extensions(buf, ext_start, cluster_size, backing_file_offset, path)?;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = h
                .feature_name(0, bit as u8)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            return Err(BlockError::unsupported(
                path,
                format!("unknown incompatible feature bit {bit}{name}"),
            ));
        }
        if incompatible & INCOMPAT_COMPRESSION != 0 {
            h.compression = match compression_byte {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                t => {
                    return Err(BlockError::unsupported(
                        path,
                        format!("compression type {t}"),
                    ))
                }
            };
        } else if compression_byte != 0 {
            return Err(corrupt(format!(
                "compression type {compression_byte} set without the compression-type feature bit"
            )));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(corrupt(
                "extended L2 entries with clusters smaller than 16 KiB".into(),
            ));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 && h.data_file.is_none() {
            return Err(corrupt(
                "external data file feature set but no data file name extension".into(),
            ));
        }

        // Backing file name.
        if backing_file_offset != 0 {
            if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name length {backing_file_size} outside 1..={MAX_BACKING_NAME}"
                )));
            }
            let end = backing_file_offset
                .checked_add(u64::from(backing_file_size))
                .filter(|&e| e <= cluster_size && e <= buf.len() as u64)
                .ok_or_else(|| {
                    corrupt("backing file name lies outside the header cluster".into())
                })?;
            let name = buf
                .get(backing_file_offset as usize..end as usize)
                .ok_or_else(|| {
                    corrupt("backing file name lies outside the header cluster".into())
                })?;
            if name.contains(&0) {
                return Err(corrupt("backing file name contains a NUL byte".into()));
            }
            h.backing_file = Some(PathBuf::from(OsStr::from_bytes(name)));
        }

        // Sizes and tables.
        if size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(format!("virtual size {size} is absurd")));
        }
        let l2_entries = h.l2_entries();
        let bytes_per_l1 = l2_entries * cluster_size;
        let needed_l1 = size.div_ceil(bytes_per_l1);
        if u64::from(l1_size) < needed_l1 {
            return Err(corrupt(format!(
                "L1 table has {l1_size} entries, the virtual size {size} needs {needed_l1}"
            )));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {l1_size} entries is larger than {MAX_L1_BYTES} bytes"
            )));
        }
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_size > 0 {
            check_table(
                path,
                "L1 table",
                l1_table_offset,
                l1_bytes,
                cluster_size,
                file_len,
            )?;
        }
        let rt_bytes = u64::from(refcount_table_clusters) * cluster_size;
        if refcount_table_clusters == 0 {
            return Err(corrupt("refcount table has 0 clusters".into()));
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {refcount_table_clusters} clusters is larger than {MAX_REFTABLE_BYTES} bytes"
            )));
        }
        check_table(
            path,
            "refcount table",
            refcount_table_offset,
            rt_bytes,
            cluster_size,
            file_len,
        )?;
        if l1_size > 0 && overlaps(l1_table_offset, l1_bytes, refcount_table_offset, rt_bytes) {
            return Err(corrupt("L1 table overlaps the refcount table".into()));
        }
        if nb_snapshots > 0 {
            if nb_snapshots > 65536 {
                return Err(corrupt(format!("{nb_snapshots} snapshots is absurd")));
            }
            check_table(
                path,
                "snapshot table",
                snapshots_offset,
                1,
                cluster_size,
                file_len,
            )?;
        }
        Ok(h)
    }

    fn parse_extensions(
        &mut self,
        buf: &[u8],
        start: usize,
        cluster_size: u64,
        backing_file_offset: u64,
        path: &Path,
    ) -> Result<(), BlockError> {
        let corrupt = |r: String| BlockError::corrupt(path, r);
        let limit = if backing_file_offset != 0 {
            (backing_file_offset as usize).min(buf.len())
        } else {
            buf.len().min(cluster_size as usize)
        };
        let mut off = start;
        while off + 8 <= limit {
            let typ = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if typ == EXT_END {
                break;
            }
            let data = buf
                .get(off..off.saturating_add(len))
                .filter(|_| off + len <= limit)
                .ok_or_else(|| {
                    corrupt(format!(
                        "header extension 0x{typ:08x} of {len} bytes runs past the header area"
                    ))
                })?;
            match typ {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data)
                        .map_err(|_| corrupt("backing format name is not UTF-8".into()))?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                EXT_DATA_FILE => {
                    if data.contains(&0) || data.is_empty() {
                        return Err(corrupt("bad external data file name".into()));
                    }
                    self.data_file = Some(PathBuf::from(OsStr::from_bytes(data)));
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let kind = entry[0];
                        let bit = entry[1];
                        let name_bytes = &entry[2..48];
                        let end = name_bytes.iter().position(|&c| c == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
                        self.feature_names.push((kind, bit, name));
                    }
                }
                EXT_BITMAPS => self.has_bitmaps = true,
                EXT_CRYPTO => {
                    return Err(BlockError::unsupported(
                        path,
                        "full disk encryption header extension",
                    ))
                }
                _ => {}
            }
            off = off
                .checked_add(len.next_multiple_of(8))
                .ok_or_else(|| corrupt("header extension length overflows".into()))?;
        }
        Ok(())
    }
}

/// Whether `[a, a+alen)` and `[b, b+blen)` intersect.
pub fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Checks a metadata table location: cluster-aligned, not in the header cluster, no
/// overflow, inside the file.
pub fn check_table(
    path: &Path,
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), BlockError> {
    let corrupt = |r: String| BlockError::corrupt(path, r);
    if offset % cluster_size != 0 {
        return Err(corrupt(format!(
            "{what} offset 0x{offset:x} is not cluster aligned"
        )));
    }
    if offset < cluster_size {
        return Err(corrupt(format!(
            "{what} offset 0x{offset:x} points into the header"
        )));
    }
    let end = offset
        .checked_add(len)
        .ok_or_else(|| corrupt(format!("{what} at 0x{offset:x} overflows")))?;
    if end > file_len {
        return Err(corrupt(format!(
            "{what} at 0x{offset:x} ({len} bytes) extends past the end of the file ({file_len} bytes)"
        )));
    }
    Ok(())
}

/// Options of a new header (see [`serialize`]).
pub struct NewHeader<'a> {
    /// 2 or 3.
    pub version: u32,
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Virtual size.
    pub size: u64,
    /// log2 refcount bits.
    pub refcount_order: u32,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Backing file name.
    pub backing_file: Option<&'a str>,
    /// Backing format.
    pub backing_format: Option<&'a str>,
    /// Refcount table offset and clusters.
    pub refcount_table: (u64, u32),
    /// L1 table offset and entries.
    pub l1: (u64, u32),
}

fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_be_bytes());
}

const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Serialises a header cluster (header, extensions, backing name). Errors if it does not
/// fit in one cluster.
pub fn serialize(h: &NewHeader<'_>) -> Result<Vec<u8>, BlockError> {
    let cluster_size = 1usize << h.cluster_bits;
    let mut v = Vec::with_capacity(cluster_size);
    put32(&mut v, MAGIC);
    put32(&mut v, h.version);
    put64(&mut v, 0); // backing_file_offset, patched below
    put32(&mut v, 0); // backing_file_size, patched below
    put32(&mut v, h.cluster_bits);
    put64(&mut v, h.size);
    put32(&mut v, 0); // crypt_method
    put32(&mut v, h.l1.1);
    put64(&mut v, h.l1.0);
    put64(&mut v, h.refcount_table.0);
    put32(&mut v, h.refcount_table.1);
    put32(&mut v, 0); // nb_snapshots
    put64(&mut v, 0); // snapshots_offset
    if h.version == 3 {
        let incompat = if h.extended_l2 { INCOMPAT_EXTL2 } else { 0 };
        put64(&mut v, incompat);
        put64(&mut v, 0); // compatible
        put64(&mut v, 0); // autoclear
        put32(&mut v, h.refcount_order);
        put32(&mut v, 112); // header_length
        v.push(0); // compression type zlib
        v.extend_from_slice(&[0; 7]);
    }
    if let Some(fmt) = h.backing_format {
        put32(&mut v, EXT_BACKING_FORMAT);
        put32(&mut v, fmt.len() as u32);
        v.extend_from_slice(fmt.as_bytes());
        v.resize(v.len().next_multiple_of(8), 0);
    }
    let backing_len = h.backing_file.map(|b| b.len()).unwrap_or(0);
    if h.version == 3 {
        let table_len = FEATURE_NAMES.len() * 48;
        // Only when it fits with room for the end marker and the backing name.
        if v.len() + 8 + table_len + 8 + backing_len <= cluster_size {
            put32(&mut v, EXT_FEATURE_TABLE);
            put32(&mut v, table_len as u32);
            for (kind, bit, name) in FEATURE_NAMES {
                let mut e = [0u8; 48];
                e[0] = *kind;
                e[1] = *bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                v.extend_from_slice(&e);
            }
        }
    }
    put32(&mut v, EXT_END);
    put32(&mut v, 0);
    if let Some(b) = h.backing_file {
        if b.is_empty() || b.len() > MAX_BACKING_NAME as usize {
            return Err(BlockError::InvalidArgument(format!(
                "backing file name of {} bytes (1..={MAX_BACKING_NAME} allowed)",
                b.len()
            )));
        }
        let off = v.len() as u64;
        v[8..16].copy_from_slice(&off.to_be_bytes());
        v[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
        v.extend_from_slice(b.as_bytes());
    }
    if v.len() > cluster_size {
        return Err(BlockError::InvalidArgument(format!(
            "the header ({} bytes with extensions and backing file name) does not fit in a {cluster_size}-byte cluster",
            v.len()
        )));
    }
    v.resize(cluster_size, 0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(version: u32, bits: u32) -> NewHeader<'static> {
        NewHeader {
            version,
            cluster_bits: bits,
            size: 1 << 30,
            refcount_order: 4,
            extended_l2: false,
            backing_file: Some("base.img"),
            backing_format: Some("raw"),
            refcount_table: (1 << bits, 1),
            l1: (3 << bits, 8192),
        }
    }

    #[test]
    fn round_trip() {
        for version in [2, 3] {
            let buf = serialize(&new(version, 16)).unwrap();
            let h = Header::parse(&buf, Path::new("t"), 1 << 30).unwrap();
            assert_eq!(h.version, version);
            assert_eq!(h.size, 1 << 30);
            assert_eq!(h.backing_file.as_deref(), Some(Path::new("base.img")));
            assert_eq!(h.backing_format.as_deref(), Some("raw"));
            assert_eq!(h.l1_size, 8192);
        }
    }

    #[test]
    fn rejects_bad_fields() {
        let good = serialize(&new(3, 16)).unwrap();
        let p = Path::new("img");
        let mut b = good.clone();
        b[20..24].copy_from_slice(&22u32.to_be_bytes());
        assert!(Header::parse(&b, p, 1 << 30).is_err());
        let mut b = good.clone();
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        let e = Header::parse(&b, p, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("bit 9"), "{e}");
        let mut b = good.clone();
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        assert!(Header::parse(&b, p, 1 << 30)
            .unwrap_err()
            .to_string()
            .contains("L1"));
        let mut b = good.clone();
        b[40..48].copy_from_slice(&0u64.to_be_bytes());
        assert!(Header::parse(&b, p, 1 << 30)
            .unwrap_err()
            .to_string()
            .contains("header"));
        // Tables past EOF.
        assert!(Header::parse(&good, p, 4096).is_err());
        // Truncated header.
        assert!(Header::parse(&good[..50], p, 50).is_err());
    }
}
