// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The snapshot tree: sections keyed by component id, and its file format.
//!
//! File layout: the 8-byte magic `VMKITSNP`, a little-endian `u32` format version, a
//! little-endian `u32` CRC-32 (IEEE) of the body, a little-endian `u64` body length, then the
//! body: a CBOR map from component id to [`Section`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::encoding::MAX_ENCODED_LEN;
use crate::{decode_section, encode_section, MigrationError, Section, VersionedState};

const MAGIC: &[u8; 8] = b"VMKITSNP";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8;

/// A machine snapshot: one [`Section`] per component id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotTree {
    sections: BTreeMap<String, Section>,
}

impl SnapshotTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `state` under `id`, replacing any previous section of that id.
    pub fn insert<S: VersionedState>(&mut self, id: &str, state: &S) -> Result<(), MigrationError> {
        self.sections.insert(id.to_owned(), encode_section(state)?);
        Ok(())
    }

    /// Decodes the section `id` as `S`.
    pub fn get<S: VersionedState>(&self, id: &str) -> Result<S, MigrationError> {
        let section = self
            .sections
            .get(id)
            .ok_or_else(|| MigrationError::MissingSection(id.to_owned()))?;
        decode_section(section)
    }

    /// The raw section `id`, if present.
    pub fn section(&self, id: &str) -> Option<&Section> {
        self.sections.get(id)
    }

    /// Component ids in the tree, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.sections.keys().map(String::as_str)
    }

    /// Component ids that start with `prefix` (e.g. all `"vcpu/"`), sorted.
    pub fn ids_with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> {
        self.ids().filter(move |id| id.starts_with(prefix))
    }

    /// Serialises the tree into the snapshot file format.
    pub fn to_bytes(&self) -> Result<Vec<u8>, MigrationError> {
        let mut body = Vec::new();
        ciborium::into_writer(&self.sections, &mut body).map_err(|e| MigrationError::Encode {
            name: "snapshot tree",
            reason: e.to_string(),
        })?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&crc32(&body).to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Parses the snapshot file format. Damaged input gives an error naming the problem.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MigrationError> {
        let header = bytes.get(..HEADER_LEN).ok_or_else(|| {
            MigrationError::Corrupt(format!(
                "file is {} bytes, shorter than the header",
                bytes.len()
            ))
        })?;
        let (magic, rest) = header.split_at(8);
        if magic != MAGIC {
            return Err(MigrationError::Corrupt(
                "not a vmkit snapshot (bad magic)".into(),
            ));
        }
        let word = |i: usize| -> [u8; 4] {
            let mut w = [0u8; 4];
            w.copy_from_slice(&rest[i..i + 4]);
            w
        };
        let version = u32::from_le_bytes(word(0));
        if version != FORMAT_VERSION {
            return Err(MigrationError::Corrupt(format!(
                "snapshot format version {version} is not supported (this build reads {FORMAT_VERSION})"
            )));
        }
        let crc = u32::from_le_bytes(word(4));
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&rest[8..16]);
        let len = u64::from_le_bytes(len_bytes);
        let body = &bytes[HEADER_LEN..];
        if len != body.len() as u64 {
            return Err(MigrationError::Corrupt(format!(
                "body length field says {len} bytes, file holds {}",
                body.len()
            )));
        }
        if body.len() > MAX_ENCODED_LEN {
            return Err(MigrationError::Corrupt(format!(
                "body of {} bytes is too large",
                body.len()
            )));
        }
        if crc32(body) != crc {
            return Err(MigrationError::Corrupt("checksum mismatch".into()));
        }
        let sections: BTreeMap<String, Section> =
            ciborium::from_reader(body).map_err(|e| MigrationError::Corrupt(e.to_string()))?;
        Ok(Self { sections })
    }

    /// Writes the tree to `path` atomically (temporary file, fsync, rename).
    pub fn write_file(&self, path: &Path) -> Result<(), MigrationError> {
        let bytes = self.to_bytes()?;
        let io = |source| MigrationError::Io {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Reads a tree written by [`SnapshotTree::write_file`].
    pub fn read_file(path: &Path) -> Result<Self, MigrationError> {
        let bytes = std::fs::read(path).map_err(|source| MigrationError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }
}

/// CRC-32 (IEEE 802.3, reflected, as used by zlib), computed bitwise-by-table.
fn crc32(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    const TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Regs {
        a: u64,
        blob: Vec<u8>,
    }
    impl VersionedState for Regs {
        const NAME: &'static str = "test/regs";
        const VERSION: u16 = 1;
    }

    #[test]
    fn crc_matches_reference() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn tree_round_trip_through_file() {
        let mut t = SnapshotTree::new();
        for i in 0..4u64 {
            t.insert(
                &format!("vcpu/{i}"),
                &Regs {
                    a: i,
                    blob: vec![i as u8; 100],
                },
            )
            .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        t.write_file(&path).unwrap();
        let back = SnapshotTree::read_file(&path).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.ids_with_prefix("vcpu/").count(), 4);
        assert_eq!(back.get::<Regs>("vcpu/2").unwrap().a, 2);
        assert!(matches!(
            back.get::<Regs>("vcpu/9"),
            Err(MigrationError::MissingSection(_))
        ));
    }

    #[test]
    fn damage_is_detected() {
        let mut t = SnapshotTree::new();
        t.insert("x", &Regs { a: 1, blob: vec![] }).unwrap();
        let good = t.to_bytes().unwrap();
        for cut in [0, 5, HEADER_LEN, good.len() - 1] {
            assert!(
                SnapshotTree::from_bytes(&good[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(
            matches!(SnapshotTree::from_bytes(&flipped), Err(MigrationError::Corrupt(m)) if m.contains("checksum"))
        );
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(SnapshotTree::from_bytes(&magic).is_err());
        assert!(matches!(
            SnapshotTree::read_file(Path::new("/nonexistent/snap")),
            Err(MigrationError::Io { .. })
        ));
    }
}
