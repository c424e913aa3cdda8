// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Consistency check and repair of qcow2 metadata (what `qemu-img check` does).
//!
//! The check rebuilds the expected refcount of every host cluster from the references
//! (header, L1 table, refcount table and blocks, L2 tables, data and compressed clusters)
//! and compares it with the stored refcounts: a stored refcount above the references is
//! a leak, one below is a corruption. It also checks that OFLAG_COPIED is set exactly
//! where the refcount is 1, and that every table and cluster offset is aligned and inside
//! the file. Repair rewrites wrong refcounts (allocating refcount blocks as needed), drops
//! refcount table entries that point nowhere sane, and fixes COPIED flags.

use super::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::meta::{
    Meta, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, REFT_OFFSET_MASK,
};
use super::Qcow2Backend;
use crate::BlockError;

/// Result of [`Qcow2Backend::check`] / [`Qcow2Backend::repair`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that can lose data (refcount too low, bad offsets, wrong COPIED flags...).
    pub corruptions: Vec<String>,
    /// Leaked clusters (refcount higher than the number of references).
    pub leaks: Vec<String>,
    /// Problems fixed by a repair pass.
    pub fixed: u64,
    /// Guest clusters allocated in this image.
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// The header's corrupt bit was set when the image was opened (cleared by a repair
    /// that leaves the image clean).
    pub marked_corrupt: bool,
    /// The header's dirty bit was set when the image was opened.
    pub dirty: bool,
}

impl CheckReport {
    /// No corruptions and no leaks.
    pub fn is_clean(&self) -> bool {
        self.corruptions.is_empty() && self.leaks.is_empty()
    }

    /// One-line summary.
    pub fn summary(&self) -> String {
        format!(
            "{} corruptions, {} leaked clusters{}",
            self.corruptions.len(),
            self.leaks.len(),
            self.corruptions
                .first()
                .map(|c| format!(" (first: {c})"))
                .unwrap_or_default()
        )
    }
}

struct Refs {
    counts: Vec<u64>,
    cs: u64,
    file_clusters: u64,
}

impl Refs {
    /// Adds a reference to every cluster of `[off, off+len)`; returns false if the range
    /// is outside the file.
    fn add(&mut self, off: u64, len: u64) -> bool {
        let first = off / self.cs;
        let Some(end) = off.checked_add(len.max(1)) else {
            return false;
        };
        let last = (end - 1) / self.cs;
        if last >= self.file_clusters {
            return false;
        }
        for c in first..=last {
            if let Some(v) = self.counts.get_mut(c as usize) {
                *v = v.saturating_add(1);
            }
        }
        true
    }
}

fn read_words(meta: &Meta, off: u64, bytes: u64) -> Result<Vec<u64>, BlockError> {
    let mut raw = vec![0u8; bytes as usize];
    meta.file.read_at(off, &mut raw)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

pub(super) fn check(
    img: &Qcow2Backend,
    meta: &mut Meta,
    repair: bool,
) -> Result<CheckReport, BlockError> {
    let h = &img.header;
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let file_len = meta.file.len()?;
    meta.file_len = meta.file_len.max(file_len);
    let file_clusters = file_len.div_ceil(cs);
    let mut rep = CheckReport {
        total_clusters: h.size.div_ceil(cs),
        ..Default::default()
    };
    rep.marked_corrupt = h.incompatible & INCOMPAT_CORRUPT != 0;
    rep.dirty = h.incompatible & INCOMPAT_DIRTY != 0;
    let mut refs = Refs {
        counts: vec![0; file_clusters as usize],
        cs,
        file_clusters,
    };
    refs.add(0, cs);
    if !meta.l1.is_empty() && !refs.add(meta.l1_offset, meta.l1.len() as u64 * 8) {
        rep.corruptions
            .push("L1 table lies past the end of the file".into());
    }
    if !refs.add(meta.reftable_offset, meta.reftable_clusters * cs) {
        rep.corruptions
            .push("refcount table lies past the end of the file".into());
    }

    // Refcount table entries.
    for bi in 0..meta.reftable.len() {
        let rte = meta.reftable[bi];
        if rte == 0 {
            continue;
        }
        let off = rte & REFT_OFFSET_MASK;
        let bad = rte & !REFT_OFFSET_MASK != 0
            || off % cs != 0
            || off < cs
            || off.checked_add(cs).is_none_or(|e| e > file_len);
        if bad {
            rep.corruptions
                .push(format!("refcount table entry {bi} (0x{rte:x}) is invalid"));
            if repair {
                meta.reftable[bi] = 0;
                meta.file
                    .write_at(meta.reftable_offset + bi as u64 * 8, &0u64.to_be_bytes())?;
                rep.fixed += 1;
            }
            continue;
        }
        refs.add(off, cs);
    }

    // Internal snapshots: the snapshot table and each snapshot's L1 table.
    let snapshot_l1s = read_snapshots(img, meta, &mut refs, &mut rep, file_len)?;

    // L1 tables (active first) -> how often each L2 table is referenced.
    let esize = h.l2_entry_size();
    let ext = h.extended_l2();
    // (where the entry lives, entry, referenced cluster)
    let mut copied_checks: Vec<(u64, u64, u64)> = Vec::new();
    // L2 offset -> (references from L1 entries, first active L1 index)
    let mut l2_tables: std::collections::BTreeMap<u64, (u64, Option<u64>)> = Default::default();
    let active = (meta.l1_offset, meta.l1.clone());
    for (n, (l1_off, l1)) in std::iter::once(active).chain(snapshot_l1s).enumerate() {
        let is_active = n == 0;
        let what = if is_active {
            "L1".to_string()
        } else {
            format!("snapshot {n} L1")
        };
        for (i, &l1e) in l1.iter().enumerate() {
            if l1e & 0x7f00_0000_0000_01ff != 0 {
                rep.corruptions.push(format!(
                    "{what} entry {i} (0x{l1e:x}) has reserved bits set"
                ));
            }
            let l2off = l1e & L1E_OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            if l2off % cs != 0 || l2off < cs || l2off + cs > file_len {
                rep.corruptions.push(format!(
                    "{what} entry {i}: L2 table offset 0x{l2off:x} is invalid (unaligned, in the header or past the end of the file)"
                ));
                continue;
            }
            let t = l2_tables.entry(l2off).or_insert((0, None));
            t.0 += 1;
            if is_active {
                t.1.get_or_insert(i as u64);
                copied_checks.push((l1_off + i as u64 * 8, l1e, l2off / cs));
            }
        }
    }

    // Each distinct L2 table once: its data references.
    for (&l2off, &(count, active_idx)) in &l2_tables {
        for _ in 0..count {
            refs.add(l2off, cs);
        }
        let words = read_words(meta, l2off, cs)?;
        let n = cs / esize;
        for j in 0..n {
            let e = words.get((j * esize / 8) as usize).copied().unwrap_or(0);
            let bitmap = if ext {
                words.get((j * 2 + 1) as usize).copied().unwrap_or(0)
            } else {
                0
            };
            let gc = active_idx.map(|i| i * n + j);
            let name = match gc {
                Some(gc) => format!("guest cluster {gc}"),
                None => format!("snapshot L2 table 0x{l2off:x} entry {j}"),
            };
            let where_ = l2off + j * esize;
            if e & OFLAG_COMPRESSED != 0 {
                if gc.is_some() {
                    rep.allocated_clusters += 1;
                    rep.compressed_clusters += 1;
                }
                if e & OFLAG_COPIED != 0 {
                    rep.corruptions
                        .push(format!("{name}: compressed cluster has OFLAG_COPIED set"));
                    if repair {
                        let fixed = e & !OFLAG_COPIED;
                        meta.file.write_at(where_, &fixed.to_be_bytes())?;
                        rep.fixed += 1;
                    }
                }
                let x = 62 - (cb - 8);
                let coff = e & ((1u64 << x) - 1);
                let nsec = ((e >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
                let start = coff & !511;
                // The last compressed cluster may end before its rounded-up size.
                let len = (nsec * 512).min(file_len.saturating_sub(start));
                if coff < cs || len == 0 || !refs.add(start, len) {
                    rep.corruptions.push(format!(
                        "{name}: compressed data at 0x{coff:x} is outside the file"
                    ));
                }
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            if ext {
                let alloc = bitmap & 0xffff_ffff;
                let zero = bitmap >> 32;
                if alloc & zero != 0 {
                    rep.corruptions.push(format!(
                        "{name}: subclusters both allocated and zero (bitmap 0x{bitmap:x})"
                    ));
                }
                if host == 0 && alloc != 0 {
                    rep.corruptions.push(format!(
                        "{name}: allocated subclusters in an unallocated cluster"
                    ));
                }
            }
            if host == 0 {
                continue;
            }
            if host % cs != 0 || host < cs || host >= file_len.next_multiple_of(cs) {
                rep.corruptions.push(format!(
                    "{name}: data cluster offset 0x{host:x} is invalid (unaligned, in the header or past the end of the file)"
                ));
                continue;
            }
            refs.add(host, cs);
            if gc.is_some() {
                rep.allocated_clusters += 1;
                copied_checks.push((where_, e, host / cs));
            }
        }
    }
    rep.image_end_offset = refs
        .counts
        .iter()
        .rposition(|&c| c > 0)
        .map(|c| (c as u64 + 1) * cs)
        .unwrap_or(cs);

    // Compare with the stored refcounts: every cluster of the file, then whatever the
    // existing refcount blocks claim beyond the end of the file (scanned block by block,
    // skipping zero bytes, so a hostile table cannot make this quadratic).
    let epb = (cs * 8) >> h.refcount_order;
    let mut fixes: Vec<(u64, u64)> = Vec::new();
    let mut compare = |c: u64, stored: u64, rep: &mut CheckReport| {
        let expected = refs.counts.get(c as usize).copied().unwrap_or(0);
        if stored == expected {
            return;
        }
        if stored > expected {
            rep.leaks.push(format!(
                "leaked cluster {c}: refcount={stored} reference={expected}"
            ));
        } else {
            rep.corruptions.push(format!(
                "cluster {c}: refcount={stored} reference={expected}"
            ));
        }
        fixes.push((c, expected));
    };
    for c in 0..file_clusters {
        match meta.refcount(c) {
            Ok(stored) => compare(c, stored, &mut rep),
            Err(e) => rep
                .corruptions
                .push(format!("cannot read the refcount of cluster {c}: {e}")),
        }
    }
    for bi in 0..meta.reftable.len() as u64 {
        let first = bi * epb;
        if first.saturating_add(epb) <= file_clusters {
            continue;
        }
        let off = meta.reftable[bi as usize] & REFT_OFFSET_MASK;
        if off == 0 || off % cs != 0 || off < cs || off.checked_add(cs).is_none_or(|e| e > file_len)
        {
            continue;
        }
        let mut block = vec![0u8; cs as usize];
        meta.file.read_at(off, &mut block)?;
        let per_byte = (8u64 >> h.refcount_order).max(1);
        let mut last_c = u64::MAX;
        let bytes_per_entry = ((1u64 << h.refcount_order) / 8).max(1);
        for (i, &byte) in block.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            let i = i as u64;
            let (lo, hi) = if h.refcount_order < 3 {
                (i * per_byte, i * per_byte + per_byte)
            } else {
                (i / bytes_per_entry, i / bytes_per_entry + 1)
            };
            for idx in lo..hi {
                let c = first + idx;
                if c < file_clusters {
                    continue;
                }
                let stored = super::meta::rc_get(&block, h.refcount_order, idx);
                // Several bytes of one wide entry: look at it once.
                if stored != 0 && c != last_c {
                    compare(c, stored, &mut rep);
                }
                last_c = c;
            }
        }
    }
    if repair {
        // Never punch holes while repairing: a "leak" might be data a broken table
        // still needs.
        meta.punch_freed = false;
        let mut result = Ok(());
        for (c, v) in fixes {
            if let Err(e) = meta.set_refcount(c, v) {
                result = Err(e);
                break;
            }
            rep.fixed += 1;
        }
        meta.punch_freed = true;
        result?;
    }

    // OFLAG_COPIED must be set exactly where the refcount is 1.
    for (where_, e, c) in copied_checks {
        let rc = meta.refcount(c).unwrap_or(0);
        let want = rc == 1;
        if (e & OFLAG_COPIED != 0) != want {
            rep.corruptions.push(format!(
                "OFLAG_COPIED wrong for the entry at 0x{where_:x} (0x{e:x}), refcount={rc}"
            ));
            if repair {
                let fixed = if want {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                meta.file.write_at(where_, &fixed.to_be_bytes())?;
                if where_ >= meta.l1_offset && where_ < meta.l1_offset + meta.l1.len() as u64 * 8 {
                    let idx = ((where_ - meta.l1_offset) / 8) as usize;
                    if let Some(x) = meta.l1.get_mut(idx) {
                        *x = fixed;
                    }
                }
                rep.fixed += 1;
            }
        }
    }
    if repair {
        meta.drop_caches();
        meta.file.flush()?;
    }
    Ok(rep)
}

/// Parses the snapshot table, counts its clusters and each snapshot's L1 table, and
/// returns the snapshot L1 tables (offset, entries).
fn read_snapshots(
    img: &Qcow2Backend,
    meta: &Meta,
    refs: &mut Refs,
    rep: &mut CheckReport,
    file_len: u64,
) -> Result<Vec<(u64, Vec<u64>)>, BlockError> {
    let h = &img.header;
    let cs = h.cluster_size();
    let mut out = Vec::new();
    if h.nb_snapshots == 0 {
        return Ok(out);
    }
    let mut off = h.snapshots_offset;
    for n in 0..h.nb_snapshots {
        let mut fixed = [0u8; 40];
        if off.checked_add(40).is_none_or(|e| e > file_len) {
            rep.corruptions.push(format!(
                "snapshot table entry {n} lies past the end of the file"
            ));
            break;
        }
        meta.file.read_at(off, &mut fixed)?;
        let be32 =
            |o: usize| u32::from_be_bytes([fixed[o], fixed[o + 1], fixed[o + 2], fixed[o + 3]]);
        let l1_off = u64::from_be_bytes([
            fixed[0], fixed[1], fixed[2], fixed[3], fixed[4], fixed[5], fixed[6], fixed[7],
        ]);
        let l1_size = u64::from(be32(8));
        let id_len = u64::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = u64::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra = u64::from(be32(36));
        let entry_len = (40 + extra + id_len + name_len).next_multiple_of(8);
        if l1_size * 8 > super::header::MAX_L1_BYTES
            || l1_off % cs != 0
            || (l1_size > 0 && (l1_off < cs || l1_off + l1_size * 8 > file_len))
        {
            rep.corruptions.push(format!(
                "snapshot {n}: L1 table at 0x{l1_off:x} ({l1_size} entries) is invalid"
            ));
        } else if l1_size > 0 {
            refs.add(l1_off, l1_size * 8);
            out.push((l1_off, read_words(meta, l1_off, l1_size * 8)?));
        }
        off += entry_len;
    }
    let table_len = off - h.snapshots_offset;
    if !refs.add(h.snapshots_offset, table_len) {
        rep.corruptions
            .push("snapshot table lies past the end of the file".into());
    }
    Ok(out)
}
