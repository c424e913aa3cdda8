// SPDX-License-Identifier: Apache-2.0 OR MIT
//! A set of dirty guest pages, and reading vm-memory's dirty bitmap into it.
//!
//! Two sources feed a [`DirtyPages`] set:
//! - KVM's per-slot dirty log (guest writes), read by
//!   [`SlotTable::take_kvm_dirty_pages`](crate::SlotTable::take_kvm_dirty_pages);
//! - vm-memory's [`AtomicBitmap`] of every region of a [`GuestRam`] (writes done by the VMM and
//!   its devices through vm-memory's `Bytes`/`VolatileSlice` API), read by
//!   [`take_vmm_dirty_pages`] or [`peek_vmm_dirty_pages`].
//!
//! [`SlotTable::take_dirty_pages`](crate::SlotTable::take_dirty_pages) reads and clears both
//! and returns their union.

use std::collections::btree_map;
use std::collections::BTreeMap;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::PAGE_SIZE;
use crate::ram::GuestRam;

const PAGE_SHIFT: u32 = 12;
const BITS: u64 = u64::BITS as u64;

/// A run of consecutive dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyRange {
    /// Guest-physical address of the first dirty page (page-aligned).
    pub start: GuestAddress,
    /// Number of consecutive dirty pages (at least 1).
    pub pages: u64,
}

impl DirtyRange {
    /// Length of the run in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.pages << PAGE_SHIFT
    }

    /// Exclusive end address of the run.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.start.0 + self.len_bytes())
    }
}

/// A set of dirty 4 KiB guest pages.
///
/// Stored sparsely (one 64-bit word per 256 KiB of guest-physical space that has any dirty
/// page), so sets from guests of any size and with holes such as the MMIO gap are cheap.
/// Iteration is in ascending address order; [`DirtyPages::ranges`] merges neighbouring pages
/// into runs, also across region boundaries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Key: page frame number / 64. Value: bit `n` set = page `key * 64 + n` is dirty.
    /// Words that are zero are never stored.
    words: BTreeMap<u64, u64>,
}

impl DirtyPages {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    fn set_pfn(&mut self, pfn: u64) {
        *self.words.entry(pfn / BITS).or_insert(0) |= 1 << (pfn % BITS);
    }

    /// Marks the page containing `addr` dirty.
    pub fn mark_addr(&mut self, addr: GuestAddress) {
        self.set_pfn(addr.0 >> PAGE_SHIFT);
    }

    /// Marks every page touched by `[start, start + len)` dirty. `len == 0` marks nothing;
    /// a range running past the end of the 64-bit address space is cut there.
    pub fn mark_range(&mut self, start: GuestAddress, len: u64) {
        if len == 0 {
            return;
        }
        let first = start.0 >> PAGE_SHIFT;
        let last = start.0.saturating_add(len - 1) >> PAGE_SHIFT;
        let mut pfn = first;
        while pfn <= last {
            let key = pfn / BITS;
            let bit = pfn % BITS;
            let n = (last - pfn + 1).min(BITS - bit);
            let mask = if n == BITS {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            *self.words.entry(key).or_insert(0) |= mask;
            pfn += n;
        }
    }

    /// Adds a dirty bitmap in KVM / vm-memory format: bit `n` of the bitmap (word `n / 64`,
    /// bit `n % 64`) stands for the page at `start + n * PAGE_SIZE`. Only the first `pages`
    /// bits are used. `start` is rounded down to its page.
    pub fn add_bitmap(&mut self, start: GuestAddress, bitmap: &[u64], pages: u64) {
        let base = start.0 >> PAGE_SHIFT;
        for (i, &word) in bitmap.iter().enumerate() {
            let first = i as u64 * BITS;
            if first >= pages {
                break;
            }
            let mut w = word;
            if pages - first < BITS {
                w &= (1u64 << (pages - first)) - 1;
            }
            if w == 0 {
                continue;
            }
            let pfn = base + first;
            if pfn % BITS == 0 {
                // Fast path: aligned base, whole words map one-to-one.
                *self.words.entry(pfn / BITS).or_insert(0) |= w;
            } else {
                while w != 0 {
                    let b = u64::from(w.trailing_zeros());
                    self.set_pfn(pfn + b);
                    w &= w - 1;
                }
            }
        }
    }

    /// Whether the page containing `addr` is dirty.
    pub fn contains(&self, addr: GuestAddress) -> bool {
        let pfn = addr.0 >> PAGE_SHIFT;
        self.words
            .get(&(pfn / BITS))
            .is_some_and(|w| w & (1 << (pfn % BITS)) != 0)
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.values().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Number of dirty bytes (`count() * PAGE_SIZE`).
    pub fn bytes(&self) -> u64 {
        self.count() * PAGE_SIZE
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        self.words.clear();
    }

    /// Adds every page of `other` to `self`.
    pub fn union_with(&mut self, other: &DirtyPages) {
        for (&k, &w) in &other.words {
            *self.words.entry(k).or_insert(0) |= w;
        }
    }

    /// The union of `self` and `other`.
    pub fn union(mut self, other: &DirtyPages) -> DirtyPages {
        self.union_with(other);
        self
    }

    /// Runs of consecutive dirty pages, in ascending address order, maximal (two returned
    /// runs never touch).
    pub fn ranges(&self) -> DirtyRanges<'_> {
        DirtyRanges {
            words: self.words.iter(),
            key: 0,
            word: 0,
            pending: None,
        }
    }

    /// Addresses of the dirty pages, in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.words.iter().flat_map(|(&k, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(GuestAddress((k * BITS + b) << PAGE_SHIFT))
            })
        })
    }
}

impl FromIterator<GuestAddress> for DirtyPages {
    fn from_iter<T: IntoIterator<Item = GuestAddress>>(iter: T) -> Self {
        let mut d = DirtyPages::new();
        d.extend(iter);
        d
    }
}

impl Extend<GuestAddress> for DirtyPages {
    fn extend<T: IntoIterator<Item = GuestAddress>>(&mut self, iter: T) {
        for a in iter {
            self.mark_addr(a);
        }
    }
}

/// Iterator over the dirty runs of a [`DirtyPages`]; see [`DirtyPages::ranges`].
#[derive(Debug)]
pub struct DirtyRanges<'a> {
    words: btree_map::Iter<'a, u64, u64>,
    key: u64,
    word: u64,
    /// Run being built: (first pfn, exclusive end pfn).
    pending: Option<(u64, u64)>,
}

fn to_range((start, end): (u64, u64)) -> DirtyRange {
    DirtyRange {
        start: GuestAddress(start << PAGE_SHIFT),
        pages: end - start,
    }
}

impl Iterator for DirtyRanges<'_> {
    type Item = DirtyRange;

    fn next(&mut self) -> Option<DirtyRange> {
        loop {
            if self.word == 0 {
                match self.words.next() {
                    Some((&k, &w)) => {
                        self.key = k;
                        self.word = w;
                        continue;
                    }
                    None => return self.pending.take().map(to_range),
                }
            }
            let tz = self.word.trailing_zeros();
            let run = (self.word >> tz).trailing_ones();
            let start = self.key * BITS + u64::from(tz);
            let end = start + u64::from(run);
            let mask = if run == u64::BITS {
                u64::MAX
            } else {
                ((1u64 << run) - 1) << tz
            };
            self.word &= !mask;
            match self.pending {
                Some((s, e)) if e == start => self.pending = Some((s, end)),
                Some(done) => {
                    self.pending = Some((start, end));
                    return Some(to_range(done));
                }
                None => self.pending = Some((start, end)),
            }
        }
    }
}

fn bitmap_words(bitmap: &AtomicBitmap, clear: bool) -> Vec<u64> {
    if clear {
        bitmap.get_and_reset()
    } else {
        // Cloning snapshots the words; resetting the private clone yields them.
        bitmap.clone().get_and_reset()
    }
}

fn vmm_dirty_pages(mem: &GuestRam, clear: bool) -> DirtyPages {
    let mut out = DirtyPages::new();
    for region in mem.iter() {
        // `GuestRegionMmap` derefs to its `MmapRegion`, which owns the whole-region bitmap.
        let bitmap: &AtomicBitmap = vm_memory::MmapRegion::bitmap(region);
        let words = bitmap_words(bitmap, clear);
        out.add_bitmap(region.start_addr(), &words, bitmap.len() as u64);
    }
    out
}

/// Reads **and clears** the vm-memory dirty bitmaps of every region of `mem`: the pages the
/// VMM (devices, loaders) wrote through vm-memory's accessors since the last clear.
///
/// Each 64-page word is fetched and zeroed atomically, so a write racing with this call is
/// reported either now or by the next call, never lost. Writes through raw host pointers
/// (`as_ptr`, `get_host_address`) are not tracked by vm-memory.
pub fn take_vmm_dirty_pages(mem: &GuestRam) -> DirtyPages {
    vmm_dirty_pages(mem, true)
}

/// Like [`take_vmm_dirty_pages`] but leaves the bitmaps untouched.
pub fn peek_vmm_dirty_pages(mem: &GuestRam) -> DirtyPages {
    vmm_dirty_pages(mem, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn ga(pfn: u64) -> GuestAddress {
        GuestAddress(pfn << PAGE_SHIFT)
    }

    #[test]
    fn empty_set() {
        let d = DirtyPages::new();
        assert!(d.is_empty());
        assert_eq!(d.count(), 0);
        assert_eq!(d.ranges().next(), None);
        assert_eq!(d.pages().next(), None);
    }

    #[test]
    fn ranges_merge_across_words() {
        let mut d = DirtyPages::new();
        d.mark_range(ga(60), 10 * PAGE_SIZE); // pages 60..70 cross the word boundary at 64
        d.mark_addr(ga(200));
        d.mark_addr(GuestAddress((201 << PAGE_SHIFT) + 5));
        let r: Vec<_> = d.ranges().collect();
        assert_eq!(
            r,
            vec![
                DirtyRange {
                    start: ga(60),
                    pages: 10
                },
                DirtyRange {
                    start: ga(200),
                    pages: 2
                }
            ]
        );
        assert_eq!(r[0].end(), ga(70));
        assert_eq!(r[1].len_bytes(), 2 * PAGE_SIZE);
        assert_eq!(d.count(), 12);
        assert_eq!(d.bytes(), 12 * PAGE_SIZE);
    }

    #[test]
    fn full_words_form_one_run() {
        let mut d = DirtyPages::new();
        d.mark_range(ga(0), 64 * 3 * PAGE_SIZE);
        assert_eq!(
            d.ranges().collect::<Vec<_>>(),
            vec![DirtyRange {
                start: ga(0),
                pages: 192
            }]
        );
    }

    #[test]
    fn mark_range_partial_pages_and_top_of_address_space() {
        let mut d = DirtyPages::new();
        // 2 bytes straddling a page boundary touch two pages.
        d.mark_range(GuestAddress(PAGE_SIZE - 1), 2);
        assert_eq!(d.count(), 2);
        d.mark_range(GuestAddress(5 * PAGE_SIZE), 0);
        assert_eq!(d.count(), 2);
        let mut top = DirtyPages::new();
        top.mark_range(GuestAddress(u64::MAX - PAGE_SIZE), u64::MAX);
        assert_eq!(top.count(), 2);
        assert!(top.contains(GuestAddress(u64::MAX)));
        assert_eq!(top.ranges().count(), 1);
    }

    #[test]
    fn add_bitmap_respects_page_count_and_unaligned_base() {
        let mut d = DirtyPages::new();
        // Base pfn 3 (not a multiple of 64), bits 0, 1 and 63 set; only 10 pages valid.
        d.add_bitmap(ga(3), &[0b11 | 1 << 63, u64::MAX], 10);
        assert_eq!(d.pages().collect::<Vec<_>>(), vec![ga(3), ga(4)]);
        let mut a = DirtyPages::new();
        a.add_bitmap(ga(128), &[1, 1 << 63], 128);
        assert_eq!(a.pages().collect::<Vec<_>>(), vec![ga(128), ga(255)]);
    }

    fn model_ranges(set: &BTreeSet<u64>) -> Vec<DirtyRange> {
        let mut out: Vec<DirtyRange> = Vec::new();
        for &p in set {
            match out.last_mut() {
                Some(r) if (r.start.0 >> PAGE_SHIFT) + r.pages == p => r.pages += 1,
                _ => out.push(DirtyRange {
                    start: ga(p),
                    pages: 1,
                }),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_set_model(
            a in proptest::collection::vec(0u64..2000, 0..200),
            b in proptest::collection::vec(0u64..2000, 0..200),
            base in 0u64..300,
            words in proptest::collection::vec(any::<u64>(), 0..6),
            npages in 0u64..400,
        ) {
            let sa: BTreeSet<u64> = a.iter().copied().collect();
            let sb: BTreeSet<u64> = b.iter().copied().collect();
            let da: DirtyPages = a.iter().map(|&p| ga(p)).collect();
            let db: DirtyPages = b.iter().map(|&p| ga(p)).collect();
            prop_assert_eq!(da.count(), sa.len() as u64);
            prop_assert_eq!(da.ranges().collect::<Vec<_>>(), model_ranges(&sa));
            let u = da.clone().union(&db);
            let su: BTreeSet<u64> = sa.union(&sb).copied().collect();
            prop_assert_eq!(u.pages().collect::<Vec<_>>(), su.iter().map(|&p| ga(p)).collect::<Vec<_>>());
            prop_assert_eq!(u.ranges().collect::<Vec<_>>(), model_ranges(&su));
            for p in 0..2100 {
                prop_assert_eq!(u.contains(ga(p)), su.contains(&p));
            }

            // Bitmap import against a bit-by-bit model.
            let mut bm = DirtyPages::new();
            bm.add_bitmap(ga(base), &words, npages);
            let mut sm = BTreeSet::new();
            for n in 0..npages.min(words.len() as u64 * 64) {
                if words[(n / 64) as usize] & (1 << (n % 64)) != 0 {
                    sm.insert(base + n);
                }
            }
            prop_assert_eq!(bm.ranges().collect::<Vec<_>>(), model_ranges(&sm));
        }
    }
}
