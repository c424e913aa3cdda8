// SPDX-License-Identifier: Apache-2.0 OR MIT
//! qcow2 metadata: the L1 table, cached L2 tables, refcount table and blocks, and cluster
//! allocation.
//!
//! Every metadata change is written to the file at once (write-through), in an order that
//! keeps refcounts consistent: a cluster's refcount is raised before anything points to
//! it, and lowered only after nothing does. A crash can therefore leak clusters but never
//! leave a reference to a cluster with refcount 0, so the dirty bit is never needed.
//! Clusters are always allocated at the end of the file; freed clusters get their host
//! space back through `FALLOC_FL_PUNCH_HOLE` but are not reused while the image is open.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::header::{overlaps, OFF_REFTABLE};
use crate::file_io::ImageFile;
use crate::BlockError;

/// Host offset bits of an L1 entry.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of a standard L2 entry.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// The cluster's refcount is exactly one (it may be written in place).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// The cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeroes (v3, standard L2 entries).
pub const OFLAG_ZERO: u64 = 1;

/// A small LRU cache of metadata tables keyed by file offset.
#[derive(Debug)]
pub(crate) struct TableCache<T> {
    map: HashMap<u64, (T, u64)>,
    tick: u64,
    cap: usize,
}

impl<T> TableCache<T> {
    pub fn new(cap: usize) -> Self {
        TableCache {
            map: HashMap::new(),
            tick: 0,
            cap: cap.max(2),
        }
    }

    pub fn get(&mut self, key: u64) -> Option<&mut T> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&key).map(|(v, t)| {
            *t = tick;
            v
        })
    }

    pub fn insert(&mut self, key: u64, value: T) {
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            if let Some(old) = self
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            {
                self.map.remove(&old);
            }
        }
        self.tick += 1;
        self.map.insert(key, (value, self.tick));
    }

    pub fn remove(&mut self, key: u64) {
        self.map.remove(&key);
    }

    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }
}

/// Reads refcount `idx` of a refcount block with `2^order`-bit entries.
pub fn rc_get(block: &[u8], order: u32, idx: u64) -> u64 {
    let bits = 1u64 << order;
    if order < 3 {
        let bit = idx * bits;
        let byte = block.get((bit / 8) as usize).copied().unwrap_or(0);
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    } else {
        let w = (bits / 8) as usize;
        let off = idx as usize * w;
        let Some(s) = block.get(off..off + w) else {
            return 0;
        };
        s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Writes refcount `idx`; returns the byte range that changed.
pub fn rc_set(block: &mut [u8], order: u32, idx: u64, value: u64) -> (usize, usize) {
    let bits = 1u64 << order;
    if order < 3 {
        let bit = idx * bits;
        let byte_idx = (bit / 8) as usize;
        let shift = bit % 8;
        let mask = (((1u64 << bits) - 1) << shift) as u8;
        if let Some(b) = block.get_mut(byte_idx) {
            *b = (*b & !mask) | (((value << shift) as u8) & mask);
        }
        (byte_idx, 1)
    } else {
        let w = (bits / 8) as usize;
        let off = idx as usize * w;
        if let Some(s) = block.get_mut(off..off + w) {
            let bytes = value.to_be_bytes();
            s.copy_from_slice(&bytes[8 - w..]);
        }
        (off, w)
    }
}

/// Largest refcount representable with `2^order` bits.
pub fn rc_max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << order)) - 1
    }
}

/// Mutable qcow2 metadata, guarded by the backend's mutex.
#[derive(Debug)]
pub(crate) struct Meta {
    pub file: Arc<ImageFile>,
    pub path: PathBuf,
    pub cluster_bits: u32,
    pub ext_l2: bool,
    pub refcount_order: u32,
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub reftable: Vec<u64>,
    pub reftable_offset: u64,
    /// Clusters reserved for the refcount table on disk (may exceed `reftable.len()*8`).
    pub reftable_clusters: u64,
    l2_cache: TableCache<Vec<u64>>,
    rb_cache: TableCache<Vec<u8>>,
    /// Where the next cluster is allocated (cluster aligned, at or past the file end).
    pub next_alloc: u64,
    /// The file length as far as this code knows (it only grows it).
    pub file_len: u64,
    /// Metadata offsets known to be L2 tables or refcount blocks (for overlap checks on
    /// data writes).
    pub known_tables: std::collections::HashSet<u64>,
    /// Punch holes into freed clusters.
    pub punch_freed: bool,
}

impl Meta {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        file: Arc<ImageFile>,
        path: &Path,
        cluster_bits: u32,
        ext_l2: bool,
        refcount_order: u32,
        l1: Vec<u64>,
        l1_offset: u64,
        reftable: Vec<u64>,
        reftable_offset: u64,
        reftable_clusters: u64,
        file_len: u64,
    ) -> Self {
        let cs = 1u64 << cluster_bits;
        // Cache up to 32 MiB of L2 tables (QEMU's default limit: 256 GiB of guest with
        // 64 KiB clusters; tables are loaded on demand, so a small image uses little), at
        // most 1024 tables (eviction scans the cache), and 1 MiB of refcount blocks; at
        // least 16 of each.
        let l2_cap = ((32u64 << 20) >> cluster_bits).clamp(16, 1024) as usize;
        let rb_cap = ((1u64 << 20) >> cluster_bits).max(16) as usize;
        Meta {
            file,
            path: path.to_path_buf(),
            cluster_bits,
            ext_l2,
            refcount_order,
            l1,
            l1_offset,
            reftable,
            reftable_offset,
            reftable_clusters,
            l2_cache: TableCache::new(l2_cap),
            rb_cache: TableCache::new(rb_cap),
            next_alloc: file_len.next_multiple_of(cs),
            file_len,
            known_tables: Default::default(),
            punch_freed: true,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn corrupt(&self, reason: String) -> BlockError {
        BlockError::corrupt(&self.path, reason)
    }

    /// u64 words per L2 table (entries, or entry pairs with extended L2).
    pub fn l2_words(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Guest clusters per L2 table.
    pub fn l2_entries(&self) -> u64 {
        if self.ext_l2 {
            self.cluster_size() / 16
        } else {
            self.cluster_size() / 8
        }
    }

    fn rb_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    fn l1_bytes(&self) -> u64 {
        self.l1.len() as u64 * 8
    }

    /// Checks that a metadata cluster (L2 table or refcount block) at `off` is sane.
    pub fn check_meta_cluster(&self, what: &str, off: u64) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        if off % cs != 0 {
            return Err(self.corrupt(format!("{what} offset 0x{off:x} is not cluster aligned")));
        }
        if off < cs {
            return Err(self.corrupt(format!("{what} offset 0x{off:x} points into the header")));
        }
        if off.checked_add(cs).is_none_or(|e| e > self.file_len) {
            return Err(self.corrupt(format!(
                "{what} at 0x{off:x} lies past the end of the file ({} bytes)",
                self.file_len
            )));
        }
        if !self.l1.is_empty() && overlaps(off, cs, self.l1_offset, self.l1_bytes()) {
            return Err(self.corrupt(format!("{what} at 0x{off:x} overlaps the L1 table")));
        }
        if overlaps(off, cs, self.reftable_offset, self.reftable_clusters * cs) {
            return Err(self.corrupt(format!("{what} at 0x{off:x} overlaps the refcount table")));
        }
        Ok(())
    }

    /// Whether a data write to host range `[off, off+len)` would hit known metadata.
    pub fn data_overlaps_metadata(&self, off: u64, len: u64) -> bool {
        let cs = self.cluster_size();
        if off < cs {
            return true;
        }
        if !self.l1.is_empty() && overlaps(off, len, self.l1_offset, self.l1_bytes()) {
            return true;
        }
        if overlaps(off, len, self.reftable_offset, self.reftable_clusters * cs) {
            return true;
        }
        let first = off / cs;
        let last = (off + len.max(1) - 1) / cs;
        (first..=last).any(|c| self.known_tables.contains(&(c * cs)))
    }

    // ---------------------------------------------------------------- L1 / L2

    /// The L2 table offset for guest cluster `gc` (0 if none).
    fn l2_offset_for(&self, gc: u64) -> Result<(u64, u64), BlockError> {
        let l1_idx = gc / self.l2_entries();
        let Some(&l1e) = self.l1.get(l1_idx as usize) else {
            return Ok((0, l1_idx));
        };
        Ok((l1e & L1E_OFFSET_MASK, l1_idx))
    }

    /// Whether guest cluster `gc` has an L2 table at all.
    pub fn has_l2_table(&self, gc: u64) -> bool {
        self.l2_offset_for(gc)
            .map(|(off, _)| off != 0)
            .unwrap_or(false)
    }

    fn load_l2(&mut self, off: u64) -> Result<&mut Vec<u64>, BlockError> {
        if !self.l2_cache.contains(off) {
            self.check_meta_cluster("L2 table", off)?;
            let mut raw = vec![0u8; self.cluster_size() as usize];
            self.file.read_at(off, &mut raw)?;
            let words: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            self.known_tables.insert(off);
            self.l2_cache.insert(off, words);
        }
        let path = &self.path;
        self.l2_cache
            .get(off)
            .ok_or_else(|| BlockError::corrupt(path, "L2 cache lost a table"))
    }

    /// The L2 entry (and subcluster bitmap with extended L2, else 0) of guest cluster `gc`.
    pub fn l2_entry(&mut self, gc: u64) -> Result<(u64, u64), BlockError> {
        let (l2_off, _) = self.l2_offset_for(gc)?;
        if l2_off == 0 {
            return Ok((0, 0));
        }
        let idx = gc % self.l2_entries();
        let ext = self.ext_l2;
        let table = self.load_l2(l2_off)?;
        if ext {
            let i = (idx * 2) as usize;
            Ok((
                table.get(i).copied().unwrap_or(0),
                table.get(i + 1).copied().unwrap_or(0),
            ))
        } else {
            Ok((table.get(idx as usize).copied().unwrap_or(0), 0))
        }
    }

    /// The L2 table of guest cluster `gc`, allocated (zeroed, hooked into the L1 table)
    /// if it does not exist yet. Fails if the table is shared (internal snapshots).
    fn writable_l2_table(&mut self, gc: u64) -> Result<u64, BlockError> {
        let (l2_off, l1_idx) = self.l2_offset_for(gc)?;
        let Some(&l1e) = self.l1.get(l1_idx as usize) else {
            return Err(self.corrupt(format!("guest cluster {gc} is beyond the L1 table")));
        };
        if l2_off != 0 {
            if l1e & OFLAG_COPIED == 0 {
                return Err(BlockError::unsupported(
                    &self.path,
                    format!(
                        "L2 table at 0x{l2_off:x} is shared (internal snapshots): cannot write"
                    ),
                ));
            }
            return Ok(l2_off);
        }
        let l2_off = self.alloc_clusters(1)?;
        let zero = vec![0u8; self.cluster_size() as usize];
        self.file.write_at(l2_off, &zero)?;
        self.known_tables.insert(l2_off);
        self.l2_cache
            .insert(l2_off, vec![0u64; self.l2_words() as usize]);
        let new_l1e = l2_off | OFLAG_COPIED;
        self.file
            .write_at(self.l1_offset + l1_idx * 8, &new_l1e.to_be_bytes())?;
        self.l1[l1_idx as usize] = new_l1e;
        Ok(l2_off)
    }

    /// Sets the L2 entry of guest cluster `gc`, allocating the L2 table if needed.
    pub fn set_l2_entry(&mut self, gc: u64, entry: u64, bitmap: u64) -> Result<(), BlockError> {
        if entry == 0 && bitmap == 0 && !self.has_l2_table(gc) {
            // Unallocated already, and no table to write it into.
            if self.l1.get((gc / self.l2_entries()) as usize).is_none() {
                return Err(self.corrupt(format!("guest cluster {gc} is beyond the L1 table")));
            }
            return Ok(());
        }
        self.set_l2_range(gc, 1, entry, 0, bitmap)
    }

    /// Sets the L2 entries of guest clusters `gc..gc+n` to `first_entry`,
    /// `first_entry + step`, `first_entry + 2*step`, ... (each with `bitmap`), allocating
    /// L2 tables as needed. Each L2 table is written with one write of the changed range.
    pub fn set_l2_range(
        &mut self,
        gc: u64,
        n: u64,
        first_entry: u64,
        step: u64,
        bitmap: u64,
    ) -> Result<(), BlockError> {
        let per_table = self.l2_entries();
        let ext = self.ext_l2;
        let words_per = if ext { 2 } else { 1 };
        let end = gc
            .checked_add(n)
            .ok_or_else(|| BlockError::InvalidArgument("L2 range overflows".into()))?;
        let mut g = gc;
        let mut entry = first_entry;
        while g < end {
            let stop = ((g / per_table + 1) * per_table).min(end);
            let l2_off = self.writable_l2_table(g)?;
            let w0 = ((g % per_table) * words_per) as usize;
            let w1 = w0 + ((stop - g) * words_per) as usize;
            let table = self.load_l2(l2_off)?;
            let mut bytes = Vec::with_capacity((w1 - w0) * 8);
            for k in 0..(stop - g) as usize {
                let i = w0 + k * words_per as usize;
                if let Some(w) = table.get_mut(i) {
                    *w = entry;
                }
                bytes.extend_from_slice(&entry.to_be_bytes());
                if ext {
                    if let Some(w) = table.get_mut(i + 1) {
                        *w = bitmap;
                    }
                    bytes.extend_from_slice(&bitmap.to_be_bytes());
                }
                entry = entry.wrapping_add(step);
            }
            self.file.write_at(l2_off + w0 as u64 * 8, &bytes)?;
            g = stop;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- refcounts

    fn load_refblock(&mut self, off: u64) -> Result<&mut Vec<u8>, BlockError> {
        if !self.rb_cache.contains(off) {
            self.check_meta_cluster("refcount block", off)?;
            let mut raw = vec![0u8; self.cluster_size() as usize];
            self.file.read_at(off, &mut raw)?;
            self.known_tables.insert(off);
            self.rb_cache.insert(off, raw);
        }
        let path = &self.path;
        self.rb_cache
            .get(off)
            .ok_or_else(|| BlockError::corrupt(path, "refcount cache lost a block"))
    }

    /// Refcount of host cluster `ci`.
    pub fn refcount(&mut self, ci: u64) -> Result<u64, BlockError> {
        let epb = self.rb_entries();
        let bi = ci / epb;
        let Some(&rte) = self.reftable.get(bi as usize) else {
            return Ok(0);
        };
        let off = rte & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let order = self.refcount_order;
        let block = self.load_refblock(off)?;
        Ok(rc_get(block, order, ci % epb))
    }

    /// Sets the refcount of host cluster `ci`, allocating refcount blocks (and growing the
    /// refcount table) as needed.
    pub fn set_refcount(&mut self, ci: u64, value: u64) -> Result<(), BlockError> {
        if value > rc_max(self.refcount_order) {
            return Err(self.corrupt(format!(
                "refcount of cluster {ci} would overflow {} bits",
                1u32 << self.refcount_order
            )));
        }
        let epb = self.rb_entries();
        let bi = ci / epb;
        let off = self.ensure_refblock(bi)?;
        let order = self.refcount_order;
        let block = self.load_refblock(off)?;
        let (b, n) = rc_set(block, order, ci % epb, value);
        let bytes = block.get(b..b + n).map(|s| s.to_vec()).unwrap_or_default();
        self.file.write_at(off + b as u64, &bytes)
    }

    /// Adds `delta` to the refcount of cluster `ci`.
    pub fn update_refcount(&mut self, ci: u64, delta: i64) -> Result<u64, BlockError> {
        let cur = self.refcount(ci)?;
        let new = if delta >= 0 {
            cur.checked_add(delta as u64)
        } else {
            cur.checked_sub(delta.unsigned_abs())
        }
        .ok_or_else(|| {
            self.corrupt(format!(
                "refcount of cluster {ci} ({cur}) would {} (delta {delta})",
                if delta >= 0 {
                    "overflow"
                } else {
                    "go negative"
                }
            ))
        })?;
        self.set_refcount(ci, new)?;
        Ok(new)
    }

    /// The refcount block covering block index `bi`, allocated if missing.
    fn ensure_refblock(&mut self, bi: u64) -> Result<u64, BlockError> {
        if bi >= self.reftable.len() as u64 {
            self.grow_reftable(bi + 1)?;
        }
        let rte = self.reftable[bi as usize];
        let off = rte & REFT_OFFSET_MASK;
        if off != 0 {
            return Ok(off);
        }
        let cs = self.cluster_size();
        let new = self.next_alloc;
        self.next_alloc += cs;
        self.extend_file()?;
        let zero = vec![0u8; cs as usize];
        self.file.write_at(new, &zero)?;
        self.known_tables.insert(new);
        self.rb_cache.insert(new, zero);
        // Hook the block into the table (in memory and on disk), then count the block
        // itself (possibly in itself, possibly in another block: recursion terminates
        // because every block covers many clusters).
        self.reftable[bi as usize] = new;
        self.file
            .write_at(self.reftable_offset + bi * 8, &new.to_be_bytes())?;
        self.update_refcount(new / cs, 1)?;
        Ok(new)
    }

    /// Moves the refcount table to a bigger place at the end of the file.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        let per_cluster = cs / 8;
        let mut entries = min_entries.max(self.reftable.len() as u64 * 3 / 2 + 1);
        // Cover the clusters the new table itself and a few new blocks will occupy.
        let coverage = |e: u64| e.saturating_mul(self.rb_entries()).saturating_mul(cs);
        loop {
            let clusters = entries.div_ceil(per_cluster);
            let end = self.next_alloc + (clusters + 4) * cs;
            if coverage(entries) >= end {
                break;
            }
            entries += entries / 2 + 1;
        }
        let clusters = entries.div_ceil(per_cluster);
        if clusters * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(BlockError::unsupported(
                &self.path,
                "image too large: the refcount table would exceed 8 MiB",
            ));
        }
        let entries = clusters * per_cluster;
        let new_off = self.next_alloc;
        self.next_alloc += clusters * cs;
        self.extend_file()?;
        let old_off = self.reftable_offset;
        let old_clusters = self.reftable_clusters;
        let mut table = self.reftable.clone();
        table.resize(entries as usize, 0);
        let mut raw = Vec::with_capacity((clusters * cs) as usize);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        raw.resize((clusters * cs) as usize, 0);
        self.file.write_at(new_off, &raw)?;
        self.reftable = table;
        self.reftable_offset = new_off;
        self.reftable_clusters = clusters;
        // Count the new table's clusters (may allocate refcount blocks, whose table entries
        // are written to the new table).
        for c in 0..clusters {
            self.update_refcount(new_off / cs + c, 1)?;
        }
        // Switch the header over, then free the old table.
        let mut hdr = Vec::with_capacity(12);
        hdr.extend_from_slice(&new_off.to_be_bytes());
        hdr.extend_from_slice(&(clusters as u32).to_be_bytes());
        self.file.write_at(OFF_REFTABLE, &hdr)?;
        self.file.flush()?;
        for c in 0..old_clusters {
            self.free_cluster(old_off / cs + c)?;
        }
        Ok(())
    }

    fn extend_file(&mut self) -> Result<(), BlockError> {
        if self.next_alloc > self.file_len {
            self.file.set_len(self.next_alloc)?;
            self.file_len = self.next_alloc;
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters at the end of the file (refcount 1 each) and
    /// returns the offset of the first. The file is extended to cover them (sparse, so
    /// they read as zeroes).
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64, BlockError> {
        let cs = self.cluster_size();
        let off = self.next_alloc;
        let bytes = n
            .checked_mul(cs)
            .ok_or_else(|| BlockError::InvalidArgument("allocation too large".into()))?;
        self.next_alloc = off
            .checked_add(bytes)
            .filter(|&e| e < (1u64 << 56))
            .ok_or_else(|| self.corrupt("image would exceed the qcow2 offset range".into()))?;
        self.incr_refcounts(off / cs, n)?;
        self.extend_file()?;
        Ok(off)
    }

    /// Adds one to the refcounts of host clusters `first..first+n`, writing the changed
    /// bytes of each refcount block with a single write.
    fn incr_refcounts(&mut self, first: u64, n: u64) -> Result<(), BlockError> {
        let epb = self.rb_entries();
        let order = self.refcount_order;
        let max = rc_max(order);
        let end = first
            .checked_add(n)
            .ok_or_else(|| BlockError::InvalidArgument("cluster range overflows".into()))?;
        let mut ci = first;
        while ci < end {
            let bi = ci / epb;
            let stop = ((bi + 1) * epb).min(end);
            let off = self.ensure_refblock(bi)?;
            let block = self.load_refblock(off)?;
            let (mut lo, mut hi) = (usize::MAX, 0usize);
            let mut overflow = None;
            for c in ci..stop {
                let idx = c % epb;
                let cur = rc_get(block, order, idx);
                if cur >= max {
                    overflow = Some(c);
                    break;
                }
                let (b, len) = rc_set(block, order, idx, cur + 1);
                lo = lo.min(b);
                hi = hi.max(b + len);
            }
            let bytes = block.get(lo..hi).map(|s| s.to_vec()).unwrap_or_default();
            if !bytes.is_empty() {
                self.file.write_at(off + lo as u64, &bytes)?;
            }
            if let Some(c) = overflow {
                return Err(self.corrupt(format!(
                    "refcount of cluster {c} would overflow {} bits",
                    1u32 << order
                )));
            }
            ci = stop;
        }
        Ok(())
    }

    /// Drops one reference to cluster `ci`; when it reaches 0 the host space is punched.
    pub fn free_cluster(&mut self, ci: u64) -> Result<(), BlockError> {
        let cs = self.cluster_size();
        let new = self.update_refcount(ci, -1)?;
        if new == 0 {
            self.l2_cache.remove(ci * cs);
            self.rb_cache.remove(ci * cs);
            self.known_tables.remove(&(ci * cs));
            if self.punch_freed {
                // Best effort: a file system without hole punching keeps the bytes.
                let _ = self.file.punch_hole(ci * cs, cs);
            }
        }
        Ok(())
    }

    /// Forgets cached tables (after a repair rewrote them behind the cache).
    pub fn drop_caches(&mut self) {
        let l2_cap = self.l2_cache.cap;
        let rb_cap = self.rb_cache.cap;
        self.l2_cache = TableCache::new(l2_cap);
        self.rb_cache = TableCache::new(rb_cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = rc_max(order);
            for i in 0..n as u64 {
                rc_set(&mut block, order, i, (i * 7) & max);
            }
            for i in 0..n as u64 {
                assert_eq!(
                    rc_get(&block, order, i),
                    (i * 7) & max,
                    "order {order} idx {i}"
                );
            }
        }
        // QEMU's bit order for sub-byte refcounts: least significant first.
        let mut b = vec![0u8; 1];
        rc_set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        rc_set(&mut b, 2, 1, 0xf);
        assert_eq!(b[0], 0xf1);
    }

    #[test]
    fn lru_evicts_oldest() {
        let mut c = TableCache::new(2);
        c.insert(1, 1);
        c.insert(2, 2);
        let _ = c.get(1);
        c.insert(3, 3);
        assert!(c.contains(1) && c.contains(3) && !c.contains(2));
    }
}
