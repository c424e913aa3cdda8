// SPDX-License-Identifier: Apache-2.0 OR MIT
//! A caching tier: a fast cache device in front of a slow origin, as dm-cache and bcache
//! do for block devices. Both are [`BlockBackend`]s (any format), and so is the tier.
//!
//! The origin is divided into fixed-size blocks (default 64 KiB). A block is either held
//! by one cache *slot* or not cached. Reads of cached blocks come from the cache device;
//! read misses are served from the origin and the block is promoted into a slot. Slots are
//! replaced least recently used first.
//!
//! - **Writeback**: writes go to the cache only (a write miss promotes the block first) and
//!   mark the slot dirty; dirty blocks reach the origin by background writeback, by
//!   [`CacheTier::writeback_now`] or when they are evicted.
//! - **Writethrough**: writes go to the origin and, if the block is cached, to its slot as
//!   well; slots are never dirty (except after a crash, see below).
//!
//! **Persistence and crash consistency.** The cache device holds a superblock, two copies
//! of the mapping table (origin block and dirty bit per slot) and two commit records (see
//! [`meta`]). [`flush`](BlockBackend::flush) commits: it flushes the cache device and the
//! origin, writes the whole table to the copy not in use, flushes, then writes the commit
//! record with the next generation (and flushes again). A slot that the last commit names
//! is never given to another block before the next commit (the data it holds is what a
//! reopened cache would read for its old block), and evicted dirty data reaches the
//! origin before the commit that forgets it. Hence reopening after a crash (even
//! `SIGKILL`) finds the state of the last completed flush, with every block either as of
//! that flush or as written since. After an unclean shutdown every cached block is
//! treated as dirty (its slot may hold writes newer than the origin); a clean shutdown
//! (drop or [`CacheTier::close`]) records exact dirty bits.
//!
//! Requests are serialised by one lock (the tier is correct first; the cache device is
//! expected to be much faster than the origin).
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_block::cache_tier::{CacheTier, CacheTierOptions, WritePolicy};
//! use vmkit_block::raw::RawBackend;
//! use vmkit_block::{read_at, write_at, BlockBackend, CacheMode};
//!
//! # fn main() -> Result<(), vmkit_block::BlockError> {
//! let dir = tempfile::tempdir().unwrap();
//! let (o, c) = (dir.path().join("origin.img"), dir.path().join("cache.img"));
//! RawBackend::create(&o, 64 << 20)?;
//! RawBackend::create(&c, 8 << 20)?;
//! let origin = Arc::new(RawBackend::open(&o, false, CacheMode::Writeback)?);
//! let cache = Arc::new(RawBackend::open(&c, false, CacheMode::Writeback)?);
//! CacheTier::format(&*cache, origin.virtual_size(), 64 << 10)?;
//! let tier = CacheTier::open(cache, origin, CacheTierOptions::default())?;
//! write_at(&tier, 1 << 20, b"hot data")?;
//! let mut buf = [0u8; 8];
//! read_at(&tier, 1 << 20, &mut buf)?;
//! assert_eq!(&buf, b"hot data");
//! tier.flush()?;
//! assert_eq!(tier.stats().dirty_blocks, 1);
//! tier.writeback_now()?;
//! assert_eq!(tier.stats().dirty_blocks, 0);
//! # Ok(())
//! # }
//! ```

pub mod meta;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::VolatileSlice;

use crate::backend::{check_range, gather, read_at, scatter, sub_bufs, total_len, write_at};
use crate::vhdx::crc32c::crc32c;
use crate::{BlockBackend, BlockError, BlockStatus, CacheMode};

use meta::{CommitRecord, Entry, Superblock, RECORD_OFFSETS, SECTOR};

/// How writes are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WritePolicy {
    /// Writes go to the cache; the origin is updated later.
    #[default]
    Writeback,
    /// Writes go to the origin (and to the cache if the block is cached).
    Writethrough,
}

/// Options of [`CacheTier::open`].
#[derive(Clone, Debug)]
pub struct CacheTierOptions {
    /// Write policy.
    pub policy: WritePolicy,
    /// Period of the background writeback thread; `None` runs no thread.
    pub writeback_interval: Option<Duration>,
    /// Most dirty blocks one background pass writes back.
    pub writeback_batch: usize,
    /// Promote blocks into the cache on read misses.
    pub promote_on_read: bool,
    /// Name used in error messages (typically the cache device's path).
    pub label: PathBuf,
}

impl Default for CacheTierOptions {
    fn default() -> Self {
        CacheTierOptions {
            policy: WritePolicy::Writeback,
            writeback_interval: Some(Duration::from_millis(500)),
            writeback_batch: 256,
            promote_on_read: true,
            label: PathBuf::from("cache-tier"),
        }
    }
}

/// Counters and gauges of a [`CacheTier`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Block-sized pieces of reads served from the cache.
    pub read_hits: u64,
    /// Pieces of reads that went to the origin.
    pub read_misses: u64,
    /// Pieces of writes to cached blocks.
    pub write_hits: u64,
    /// Pieces of writes to uncached blocks.
    pub write_misses: u64,
    /// Blocks copied into the cache.
    pub promotions: u64,
    /// Blocks dropped from the cache to make room.
    pub evictions: u64,
    /// Dirty blocks written to the origin.
    pub writebacks: u64,
    /// Metadata commits.
    pub commits: u64,
    /// Blocks currently dirty.
    pub dirty_blocks: u64,
    /// Blocks currently cached.
    pub cached_blocks: u64,
    /// Slots of the cache device.
    pub total_slots: u64,
    /// Cache block size.
    pub block_size: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// Block held now.
    owner: Option<u64>,
    /// Block the last commit says this slot holds.
    committed: Option<u64>,
    dirty: bool,
    last_used: u64,
}

struct State {
    slots: Vec<Slot>,
    map: HashMap<u64, u32>,
    /// Slots neither held nor named by the last commit.
    free: Vec<u32>,
    /// Slots not held but still named by the last commit (reusable after a commit).
    pending: Vec<u32>,
    tick: u64,
    generation: u64,
    table_copy: u32,
    meta_changed: bool,
    policy: WritePolicy,
    stats: CacheStats,
    closed: bool,
}

struct Inner {
    cache: Arc<dyn BlockBackend>,
    origin: Arc<dyn BlockBackend>,
    sb: Superblock,
    bs: u64,
    size: u64,
    label: PathBuf,
    promote_on_read: bool,
    batch: usize,
    state: Mutex<State>,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// A cache device in front of an origin; see the [module documentation](self).
pub struct CacheTier {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for CacheTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheTier")
            .field("label", &self.inner.label)
            .field("block_size", &self.inner.bs)
            .field("slots", &self.inner.sb.nr_slots)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn random_id() -> [u8; 16] {
    crate::vhdx::guid::Guid::random().0
}

impl CacheTier {
    /// Formats `cache` as an empty cache for an origin of `origin_size` bytes with
    /// `block_size`-byte blocks (a power of two, 4 KiB .. 16 MiB). Returns the number of
    /// slots.
    pub fn format(
        cache: &dyn BlockBackend,
        origin_size: u64,
        block_size: u32,
    ) -> Result<u64, BlockError> {
        if !block_size.is_power_of_two()
            || !(meta::MIN_BLOCK_SIZE..=meta::MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(BlockError::InvalidArgument(format!(
                "cache block size {block_size} is not a power of two between 4 KiB and 16 MiB"
            )));
        }
        let n = meta::slots_for(cache.virtual_size(), block_size);
        if n == 0 {
            return Err(BlockError::InvalidArgument(format!(
                "a cache device of {} bytes cannot hold one {block_size}-byte block and its metadata",
                cache.virtual_size()
            )));
        }
        let sb = Superblock::new(block_size, n, origin_size, random_id());
        let empty = meta::encode_table((0..n).map(|_| Entry {
            block: None,
            dirty: false,
        }));
        write_at(cache, sb.table_offset(0), &empty)?;
        let rec = CommitRecord {
            generation: 1,
            table_copy: 0,
            clean: true,
            table_crc: crc32c(&empty),
            cache_id: sb.cache_id,
        };
        write_at(cache, RECORD_OFFSETS[1], &rec.to_bytes())?;
        write_at(cache, RECORD_OFFSETS[0], &vec![0u8; SECTOR as usize])?;
        write_at(cache, 0, &sb.to_bytes())?;
        cache.flush()?;
        Ok(n)
    }

    /// Opens a formatted cache device in front of `origin`. The cache device must be
    /// writable; if the origin is read-only, so is the tier.
    pub fn open(
        cache: Arc<dyn BlockBackend>,
        origin: Arc<dyn BlockBackend>,
        opts: CacheTierOptions,
    ) -> Result<CacheTier, BlockError> {
        let label = opts.label.clone();
        let corrupt = |r: String| BlockError::corrupt(&label, r);
        if cache.is_read_only() {
            return Err(BlockError::InvalidArgument(format!(
                "{}: the cache device must be writable",
                label.display()
            )));
        }
        let csize = cache.virtual_size();
        if csize < 3 * SECTOR {
            return Err(corrupt(format!(
                "cache device of {csize} bytes is too small to be formatted"
            )));
        }
        let mut b = vec![0u8; SECTOR as usize];
        read_at(&*cache, 0, &mut b)?;
        let sb = Superblock::parse(&b).map_err(&corrupt)?;
        if sb.end() > csize {
            return Err(corrupt(format!(
                "the cache layout needs {} bytes but the cache device has {csize}",
                sb.end()
            )));
        }
        let size = origin.virtual_size();
        if sb.origin_size != size {
            return Err(BlockError::InvalidArgument(format!(
                "{}: the cache was formatted for an origin of {} bytes, this origin has {size}",
                label.display(),
                sb.origin_size
            )));
        }
        let bs = u64::from(sb.block_size);
        let origin_blocks = size.div_ceil(bs);
        let mut records = Vec::new();
        for off in RECORD_OFFSETS {
            read_at(&*cache, off, &mut b)?;
            if let Some(r) = CommitRecord::parse(&b).filter(|r| r.cache_id == sb.cache_id) {
                records.push(r);
            }
        }
        records.sort_by_key(|r| std::cmp::Reverse(r.generation));
        let entry_bytes = usize::try_from(sb.nr_slots * meta::ENTRY_SIZE)
            .map_err(|_| corrupt("mapping table too large".into()))?;
        let mut chosen = None;
        let mut why = Vec::new();
        for r in records {
            let mut t = vec![0u8; entry_bytes];
            read_at(&*cache, sb.table_offset(r.table_copy), &mut t)?;
            if crc32c(&t) != r.table_crc {
                why.push(format!(
                    "table copy {} of generation {} fails its checksum",
                    r.table_copy, r.generation
                ));
                continue;
            }
            let entries = meta::parse_table(&t, sb.nr_slots, origin_blocks).map_err(&corrupt)?;
            chosen = Some((r, entries));
            break;
        }
        let (rec, entries) = chosen.ok_or_else(|| {
            corrupt(format!(
                "no valid commit record with a matching mapping table{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", why.join("; "))
                }
            ))
        })?;
        let mut st = State {
            slots: Vec::with_capacity(entries.len()),
            map: HashMap::new(),
            free: Vec::new(),
            pending: Vec::new(),
            tick: 0,
            generation: rec.generation,
            table_copy: rec.table_copy,
            meta_changed: true,
            policy: opts.policy,
            stats: CacheStats {
                total_slots: sb.nr_slots,
                block_size: bs,
                ..CacheStats::default()
            },
            closed: false,
        };
        for (i, e) in entries.iter().enumerate() {
            // After an unclean shutdown a slot may hold writes the origin never got.
            let dirty = e.block.is_some() && (e.dirty || !rec.clean);
            st.slots.push(Slot {
                owner: e.block,
                committed: e.block,
                dirty,
                last_used: 0,
            });
            match e.block {
                Some(blk) => {
                    st.map.insert(blk, i as u32);
                }
                None => st.free.push(i as u32),
            }
        }
        st.free.reverse();
        let inner = Arc::new(Inner {
            cache,
            origin,
            sb,
            bs,
            size,
            label,
            promote_on_read: opts.promote_on_read,
            batch: opts.writeback_batch.max(1),
            state: Mutex::new(st),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        {
            // Record "in use, not clean" before anything else changes.
            let mut st = lock(&inner.state);
            inner.recount(&mut st);
            inner.commit(&mut st, false)?;
        }
        let tier = CacheTier {
            inner,
            thread: Mutex::new(None),
        };
        if let Some(period) = opts.writeback_interval {
            if !tier.inner.origin.is_read_only() {
                tier.start_writeback_thread(period);
            }
        }
        Ok(tier)
    }

    fn start_writeback_thread(&self, period: Duration) {
        let inner = Arc::clone(&self.inner);
        let handle = std::thread::Builder::new()
            .name("cache-writeback".into())
            .spawn(move || loop {
                {
                    let stop = lock(&inner.stop);
                    let (stop, _) = inner
                        .wake
                        .wait_timeout_while(stop, period, |s| !*s)
                        .unwrap_or_else(|p| p.into_inner());
                    if *stop {
                        return;
                    }
                }
                if let Err(e) = inner.writeback_some(inner.batch) {
                    log::warn!(
                        "{}: background writeback failed: {e}",
                        inner.label.display()
                    );
                }
            });
        match handle {
            Ok(h) => *lock(&self.thread) = Some(h),
            Err(e) => log::warn!(
                "{}: cannot start the writeback thread: {e}",
                self.inner.label.display()
            ),
        }
    }

    /// Stops the background writeback thread (if any) and waits for it.
    pub fn stop_writeback_thread(&self) {
        *lock(&self.inner.stop) = true;
        self.inner.wake.notify_all();
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
    }

    /// Writes every dirty block back to the origin and commits. Returns how many blocks
    /// were written.
    pub fn writeback_now(&self) -> Result<u64, BlockError> {
        let mut total = 0;
        loop {
            let n = self.inner.writeback_some(self.inner.batch)?;
            total += n;
            if n == 0 {
                break;
            }
        }
        let mut st = self.inner.open_state()?;
        self.inner.commit(&mut st, false)?;
        Ok(total)
    }

    /// Statistics.
    pub fn stats(&self) -> CacheStats {
        lock(&self.inner.state).stats
    }

    /// The write policy.
    pub fn policy(&self) -> WritePolicy {
        lock(&self.inner.state).policy
    }

    /// Switches the write policy. Going to writethrough first writes back every dirty
    /// block.
    pub fn set_policy(&self, policy: WritePolicy) -> Result<(), BlockError> {
        if policy == WritePolicy::Writethrough {
            self.writeback_now()?;
        }
        lock(&self.inner.state).policy = policy;
        Ok(())
    }

    /// Origin block of each cached block, and whether it is dirty (for inspection).
    pub fn cached_blocks(&self) -> Vec<(u64, bool)> {
        let st = lock(&self.inner.state);
        let mut v: Vec<(u64, bool)> = st
            .slots
            .iter()
            .filter_map(|s| s.owner.map(|b| (b, s.dirty)))
            .collect();
        v.sort_unstable();
        v
    }

    /// Stops the writeback thread and commits with exact dirty bits (a clean shutdown).
    /// Dropping the tier does the same, ignoring errors.
    pub fn close(&self) -> Result<(), BlockError> {
        self.stop_writeback_thread();
        let mut st = lock(&self.inner.state);
        if st.closed {
            return Ok(());
        }
        st.meta_changed = true;
        self.inner.commit(&mut st, true)?;
        st.closed = true;
        Ok(())
    }
}

impl Drop for CacheTier {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::warn!("{}: clean shutdown failed: {e}", self.inner.label.display());
        }
    }
}

impl Inner {
    fn slot_offset(&self, slot: u32) -> u64 {
        self.sb.data_offset + u64::from(slot) * self.bs
    }

    /// Valid bytes of origin block `blk`.
    fn block_len(&self, blk: u64) -> u64 {
        (self.size - blk * self.bs).min(self.bs)
    }

    fn recount(&self, st: &mut State) {
        st.stats.cached_blocks = st.map.len() as u64;
        st.stats.dirty_blocks = st
            .slots
            .iter()
            .filter(|s| s.owner.is_some() && s.dirty)
            .count() as u64;
    }

    fn touch(st: &mut State, slot: u32) {
        st.tick += 1;
        let t = st.tick;
        if let Some(s) = st.slots.get_mut(slot as usize) {
            s.last_used = t;
        }
    }

    /// Makes the in-memory state durable (see the module documentation).
    fn commit(&self, st: &mut State, clean: bool) -> Result<(), BlockError> {
        self.cache.flush()?;
        if !self.origin.is_read_only() {
            self.origin.flush()?;
        }
        if !st.meta_changed && !clean {
            return Ok(());
        }
        let table = meta::encode_table(st.slots.iter().map(|s| Entry {
            block: s.owner,
            dirty: s.dirty,
        }));
        let copy = 1 - st.table_copy;
        write_at(&*self.cache, self.sb.table_offset(copy), &table)?;
        self.cache.flush()?;
        let generation = st.generation + 1;
        let rec = CommitRecord {
            generation,
            table_copy: copy,
            clean,
            table_crc: crc32c(&table),
            cache_id: self.sb.cache_id,
        };
        write_at(
            &*self.cache,
            RECORD_OFFSETS[(generation % 2) as usize],
            &rec.to_bytes(),
        )?;
        self.cache.flush()?;
        st.generation = generation;
        st.table_copy = copy;
        st.meta_changed = false;
        st.stats.commits += 1;
        for s in st.slots.iter_mut() {
            s.committed = s.owner;
        }
        let pending = std::mem::take(&mut st.pending);
        st.free.extend(pending);
        Ok(())
    }

    /// Writes dirty slot `slot` back to the origin (not yet flushed there).
    fn write_back(&self, st: &mut State, slot: u32) -> Result<(), BlockError> {
        let Some(s) = st.slots.get(slot as usize).copied() else {
            return Ok(());
        };
        let (Some(blk), true) = (s.owner, s.dirty) else {
            return Ok(());
        };
        let mut buf = vec![0u8; self.block_len(blk) as usize];
        read_at(&*self.cache, self.slot_offset(slot), &mut buf)?;
        write_at(&*self.origin, blk * self.bs, &buf)?;
        if let Some(s) = st.slots.get_mut(slot as usize) {
            s.dirty = false;
        }
        st.meta_changed = true;
        st.stats.writebacks += 1;
        st.stats.dirty_blocks = st.stats.dirty_blocks.saturating_sub(1);
        Ok(())
    }

    /// Writes back up to `max` dirty blocks, least recently used first, taking the lock
    /// per block so that guest I/O can interleave.
    fn writeback_some(&self, max: usize) -> Result<u64, BlockError> {
        if self.origin.is_read_only() {
            return Ok(0);
        }
        let mut victims: Vec<(u64, u32)> = {
            let st = lock(&self.state);
            st.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.owner.is_some() && s.dirty)
                .map(|(i, s)| (s.last_used, i as u32))
                .collect()
        };
        victims.sort_unstable();
        let mut n = 0;
        for (_, slot) in victims.into_iter().take(max) {
            let mut st = lock(&self.state);
            if st.closed {
                break;
            }
            if st.slots.get(slot as usize).is_some_and(|s| s.dirty) {
                self.write_back(&mut st, slot)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Drops the mapping of `slot` (its data must already be on the origin, or be
    /// unwanted).
    fn unmap(st: &mut State, slot: u32) {
        let Some(s) = st.slots.get_mut(slot as usize) else {
            return;
        };
        let Some(blk) = s.owner.take() else {
            return;
        };
        let was_dirty = s.dirty;
        s.dirty = false;
        let named = s.committed.is_some();
        st.map.remove(&blk);
        if named {
            st.pending.push(slot);
        } else {
            st.free.push(slot);
        }
        if was_dirty {
            st.stats.dirty_blocks = st.stats.dirty_blocks.saturating_sub(1);
        }
        st.stats.cached_blocks = st.map.len() as u64;
        st.meta_changed = true;
    }

    /// A free slot, evicting least recently used blocks (and committing) if needed.
    fn alloc_slot(&self, st: &mut State) -> Result<u32, BlockError> {
        if let Some(s) = st.free.pop() {
            return Ok(s);
        }
        if st.pending.is_empty() {
            let batch = (st.slots.len() / 16).max(1);
            let mut owned: Vec<(u64, u32)> = st
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.owner.is_some())
                .map(|(i, s)| (s.last_used, i as u32))
                .collect();
            if owned.len() > batch {
                owned.select_nth_unstable(batch);
                owned.truncate(batch);
            }
            for (_, slot) in owned {
                if st.slots.get(slot as usize).is_some_and(|s| s.dirty) {
                    if self.origin.is_read_only() {
                        continue; // cannot write it back: keep it
                    }
                    self.write_back(st, slot)?;
                }
                Self::unmap(st, slot);
                st.stats.evictions += 1;
            }
            if let Some(s) = st.free.pop() {
                return Ok(s);
            }
        }
        if st.pending.is_empty() {
            return Err(BlockError::InvalidArgument(format!(
                "{}: no cache slot can be freed (every cached block is dirty and the origin is read-only)",
                self.label.display()
            )));
        }
        self.commit(st, false)?;
        st.free
            .pop()
            .ok_or_else(|| BlockError::corrupt(&self.label, "no free cache slot after a commit"))
    }

    /// Puts origin block `blk` with content `data` (block_len bytes) into a new slot.
    fn install(
        &self,
        st: &mut State,
        blk: u64,
        data: &[u8],
        dirty: bool,
    ) -> Result<(), BlockError> {
        let slot = self.alloc_slot(st)?;
        write_at(&*self.cache, self.slot_offset(slot), data)?;
        if let Some(s) = st.slots.get_mut(slot as usize) {
            s.owner = Some(blk);
            s.dirty = dirty;
        }
        st.map.insert(blk, slot);
        Self::touch(st, slot);
        st.meta_changed = true;
        st.stats.promotions += 1;
        st.stats.cached_blocks = st.map.len() as u64;
        if dirty {
            st.stats.dirty_blocks += 1;
        }
        Ok(())
    }

    fn read_origin_block(&self, blk: u64) -> Result<Vec<u8>, BlockError> {
        let mut buf = vec![0u8; self.block_len(blk) as usize];
        read_at(&*self.origin, blk * self.bs, &mut buf)?;
        Ok(buf)
    }

    /// The state lock, refusing I/O after [`CacheTier::close`].
    fn open_state(&self) -> Result<MutexGuard<'_, State>, BlockError> {
        let st = lock(&self.state);
        if st.closed {
            return Err(BlockError::InvalidArgument(format!(
                "{}: the cache tier was closed",
                self.label.display()
            )));
        }
        Ok(st)
    }

    fn read(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let len = total_len(bufs);
        check_range(offset, len, self.size)?;
        let mut st = self.open_state()?;
        for c in chunks(offset, len, self.bs) {
            let part = sub_bufs(bufs, c.skip, c.len);
            if let Some(&slot) = st.map.get(&c.block) {
                self.cache
                    .read_vectored(self.slot_offset(slot) + c.in_block, &part)?;
                Self::touch(&mut st, slot);
                st.stats.read_hits += 1;
                continue;
            }
            st.stats.read_misses += 1;
            if self.promote_on_read {
                let data = self.read_origin_block(c.block)?;
                if let Some(src) = data.get(c.in_block as usize..(c.in_block + c.len) as usize) {
                    scatter(&part, 0, src);
                }
                self.install(&mut st, c.block, &data, false)?;
            } else {
                self.origin
                    .read_vectored(c.block * self.bs + c.in_block, &part)?;
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        if self.origin.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        let len = total_len(bufs);
        check_range(offset, len, self.size)?;
        let mut st = self.open_state()?;
        for c in chunks(offset, len, self.bs) {
            let part = sub_bufs(bufs, c.skip, c.len);
            let cached = st.map.get(&c.block).copied();
            match (st.policy, cached) {
                (WritePolicy::Writethrough, Some(slot)) => {
                    self.origin
                        .write_vectored(c.block * self.bs + c.in_block, &part)?;
                    self.cache
                        .write_vectored(self.slot_offset(slot) + c.in_block, &part)?;
                    Self::touch(&mut st, slot);
                    st.stats.write_hits += 1;
                }
                (WritePolicy::Writethrough, None) => {
                    self.origin
                        .write_vectored(c.block * self.bs + c.in_block, &part)?;
                    st.stats.write_misses += 1;
                }
                (WritePolicy::Writeback, Some(slot)) => {
                    self.cache
                        .write_vectored(self.slot_offset(slot) + c.in_block, &part)?;
                    Self::touch(&mut st, slot);
                    st.stats.write_hits += 1;
                    if let Some(s) = st.slots.get_mut(slot as usize) {
                        if !s.dirty {
                            s.dirty = true;
                            st.stats.dirty_blocks += 1;
                            st.meta_changed = true;
                        }
                    }
                }
                (WritePolicy::Writeback, None) => {
                    st.stats.write_misses += 1;
                    let blen = self.block_len(c.block);
                    let mut data = if c.in_block == 0 && c.len == blen {
                        vec![0u8; blen as usize]
                    } else {
                        self.read_origin_block(c.block)?
                    };
                    if let Some(dst) =
                        data.get_mut(c.in_block as usize..(c.in_block + c.len) as usize)
                    {
                        gather(&part, 0, dst);
                    }
                    self.install(&mut st, c.block, &data, true)?;
                }
            }
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        if self.origin.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let mut st = self.open_state()?;
        for c in chunks(offset, len, self.bs) {
            let origin_off = c.block * self.bs + c.in_block;
            let Some(slot) = st.map.get(&c.block).copied() else {
                if unmap {
                    self.origin.discard(origin_off, c.len)?;
                } else {
                    self.origin.write_zeroes(origin_off, c.len, false)?;
                }
                continue;
            };
            let whole = c.in_block == 0 && c.len == self.block_len(c.block);
            if whole && unmap {
                // Forget the cached copy; the origin gets the discard.
                Self::unmap(&mut st, slot);
                self.origin.discard(origin_off, c.len)?;
                continue;
            }
            let slot_off = self.slot_offset(slot) + c.in_block;
            self.cache.write_zeroes(slot_off, c.len, false)?;
            Self::touch(&mut st, slot);
            match st.policy {
                WritePolicy::Writethrough => {
                    self.origin.write_zeroes(origin_off, c.len, unmap)?;
                }
                WritePolicy::Writeback => {
                    if let Some(s) = st.slots.get_mut(slot as usize) {
                        if !s.dirty {
                            s.dirty = true;
                            st.stats.dirty_blocks += 1;
                            st.meta_changed = true;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

struct Chunk {
    block: u64,
    in_block: u64,
    len: u64,
    skip: u64,
}

fn chunks(offset: u64, len: u64, block_size: u64) -> impl Iterator<Item = Chunk> {
    let mut pos = offset;
    let end = offset + len;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let block = pos / block_size;
        let in_block = pos % block_size;
        let n = (block_size - in_block).min(end - pos);
        let c = Chunk {
            block,
            in_block,
            len: n,
            skip: pos - offset,
        };
        pos += n;
        Some(c)
    })
}

impl BlockBackend for CacheTier {
    fn virtual_size(&self) -> u64 {
        self.inner.size
    }

    fn format(&self) -> &'static str {
        "cache-tier"
    }

    fn is_read_only(&self) -> bool {
        self.inner.origin.is_read_only()
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        self.inner.read(offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        self.inner.write(offset, bufs)
    }

    fn flush(&self) -> Result<(), BlockError> {
        let mut st = self.inner.open_state()?;
        self.inner.commit(&mut st, false)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.zero(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.inner.zero(offset, len, may_unmap)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        let inner = &self.inner;
        if offset >= inner.size {
            return Err(BlockError::OutOfRange {
                offset,
                len,
                size: inner.size,
            });
        }
        let max_end = offset + len.min(inner.size - offset).max(1);
        let st = lock(&inner.state);
        let bs = inner.bs;
        let cached = |pos: u64| st.map.contains_key(&(pos / bs));
        let mut end = (offset / bs + 1) * bs;
        if cached(offset) {
            while end < max_end && cached(end) {
                end += bs;
            }
            return Ok(BlockStatus {
                offset,
                len: end.min(max_end) - offset,
                allocated: true,
                zero: false,
            });
        }
        while end < max_end && !cached(end) {
            end += bs;
        }
        let end = end.min(max_end);
        let o = inner.origin.block_status(offset, end - offset)?;
        Ok(BlockStatus {
            offset,
            len: o.len.clamp(1, end - offset),
            allocated: o.allocated,
            zero: o.zero,
        })
    }

    fn cache_mode(&self) -> CacheMode {
        self.inner.cache.cache_mode()
    }

    fn set_cache_mode(&self, mode: CacheMode) -> Result<(), BlockError> {
        self.inner.cache.set_cache_mode(mode)?;
        self.inner.origin.set_cache_mode(mode)
    }

    fn backing_chain(&self) -> Vec<(PathBuf, &'static str)> {
        let mut v = vec![(self.inner.label.clone(), self.inner.cache.format())];
        v.extend(self.inner.cache.backing_chain());
        v.extend(self.inner.origin.backing_chain());
        v
    }
}
