// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The guest memory map (e820), built from the guest memory's regions.
//!
//! The map has RAM below [`EBDA_START`], a reserved range from
//! there to 1 MiB (EBDA, VGA hole, MP and ACPI tables), RAM from 1 MiB to the 32-bit MMIO
//! gap and RAM above the gap. Callers can carve out more reserved ranges (for example a PCI
//! ECAM window). The same map feeds the Linux zero page and the PVH memory map table.

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::layout::{EBDA_START, FOUR_GIB, HIMEM_START};

/// Maximum number of entries in the zero page's e820 table (and in our PVH memory map).
pub const E820_MAX_ENTRIES: usize = 128;

/// The 32-bit MMIO gap: guest-physical addresses below 4 GiB that are not RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioGap {
    /// First address of the gap.
    pub start: u64,
    /// End of the gap (exclusive), usually 4 GiB.
    pub end: u64,
}

impl MmioGap {
    /// A gap from `start` up to 4 GiB.
    pub const fn below_4g(start: u64) -> Self {
        MmioGap {
            start,
            end: FOUR_GIB,
        }
    }

    /// End (exclusive) of the RAM that 32-bit code can reach below the gap: the gap start, or
    /// 4 GiB if the gap is empty.
    pub fn low_ram_limit(&self) -> u64 {
        if self.start < self.end {
            self.start.min(FOUR_GIB)
        } else {
            FOUR_GIB
        }
    }

    /// Checks that the gap is a usable range: `start <= end`, and the gap does not cover the
    /// first megabyte where the boot data lives.
    pub fn validate(&self) -> Result<()> {
        if self.start > self.end {
            return Err(Error::InvalidMmioGap {
                start: self.start,
                end: self.end,
                reason: "start is above end",
            });
        }
        if self.start < HIMEM_START && self.end > self.start {
            return Err(Error::InvalidMmioGap {
                start: self.start,
                end: self.end,
                reason: "the gap must start at or above 1 MiB",
            });
        }
        Ok(())
    }
}

/// Type of a memory map entry (values of the e820 / PVH memory map types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
    /// ACPI reclaimable.
    Acpi = 3,
    /// ACPI NVS.
    Nvs = 4,
    /// Unusable.
    Unusable = 5,
}

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Entry type.
    pub kind: E820Type,
}

impl E820Entry {
    /// End address (exclusive), saturating at `u64::MAX`.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Returns `(start, size)` of every region of `mem`, in the memory's order.
pub fn memory_ranges<M: GuestMemoryBackend>(mem: &M) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

/// Builds the memory map from RAM ranges `(start, size)`, the MMIO gap and extra non-RAM
/// entries (`extra`, which are carved out of RAM where they overlap it).
///
/// The result is sorted by address, has no overlapping entries, merges adjacent RAM and
/// always contains the reserved range `EBDA_START..1 MiB`. It fails if the gap is invalid,
/// a range overflows, extra entries overlap each other or the reserved low range, an extra
/// entry has type RAM, or the map needs more than [`E820_MAX_ENTRIES`] entries.
pub fn build_memory_map(
    ram: &[(u64, u64)],
    gap: MmioGap,
    extra: &[E820Entry],
) -> Result<Vec<E820Entry>> {
    gap.validate()?;
    if extra.len() > E820_MAX_ENTRIES {
        return Err(Error::TooManyE820Entries {
            count: extra.len(),
            max: E820_MAX_ENTRIES,
        });
    }

    // Reserved (non-RAM) entries: the low BIOS area plus the caller's.
    let mut reserved = Vec::with_capacity(extra.len() + 1);
    reserved.push(E820Entry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: E820Type::Reserved,
    });
    for e in extra {
        if e.kind == E820Type::Ram {
            return Err(Error::InvalidConfig {
                what: "extra memory map entry",
                reason: format!(
                    "entry at {:#x} has type RAM; only non-RAM entries can be added",
                    e.addr
                ),
            });
        }
        checked_end(e.addr, e.size)?;
        if e.size > 0 {
            reserved.push(*e);
        }
    }
    reserved.sort_by_key(|e| e.addr);
    for pair in reserved.windows(2) {
        if let [a, b] = pair {
            if b.addr < a.end() {
                return Err(Error::E820Overlap {
                    a_start: a.addr,
                    a_end: a.end(),
                    b_start: b.addr,
                    b_end: b.end(),
                });
            }
        }
    }

    // RAM: normalise, sort, merge.
    let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(ram.len());
    for &(start, size) in ram {
        let end = checked_end(start, size)?;
        if size > 0 {
            ranges.push((start, end));
        }
    }
    ranges.sort_unstable();
    let ranges = merge(ranges);

    // Holes punched into RAM: the gap and every reserved entry.
    let mut holes: Vec<(u64, u64)> = reserved.iter().map(|e| (e.addr, e.end())).collect();
    if gap.end > gap.start {
        holes.push((gap.start, gap.end));
    }
    let mut usable = ranges;
    for (hs, he) in holes {
        usable = subtract(&usable, hs, he);
    }

    let mut map: Vec<E820Entry> = usable
        .into_iter()
        .map(|(s, e)| E820Entry {
            addr: s,
            size: e - s,
            kind: E820Type::Ram,
        })
        .chain(reserved)
        .collect();
    map.sort_by_key(|e| e.addr);
    if map.len() > E820_MAX_ENTRIES {
        return Err(Error::TooManyE820Entries {
            count: map.len(),
            max: E820_MAX_ENTRIES,
        });
    }
    Ok(map)
}

/// RAM ranges `(start, end_exclusive)` of a memory map, sorted.
pub fn ram_of(map: &[E820Entry]) -> Vec<(u64, u64)> {
    map.iter()
        .filter(|e| e.kind == E820Type::Ram)
        .map(|e| (e.addr, e.end()))
        .collect()
}

/// Returns the RAM range of `ram` that contains all of `start..end`, if any.
pub(crate) fn containing_range(ram: &[(u64, u64)], start: u64, end: u64) -> Option<(u64, u64)> {
    ram.iter()
        .copied()
        .find(|&(s, e)| s <= start && end <= e && start <= end)
}

fn checked_end(start: u64, size: u64) -> Result<u64> {
    start
        .checked_add(size)
        .ok_or(Error::RangeOverflow { start, size })
}

/// Merges sorted ranges that overlap or touch.
fn merge(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Removes `hs..he` from every range.
fn subtract(ranges: &[(u64, u64)], hs: u64, he: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(s, e) in ranges {
        if he <= s || hs >= e {
            out.push((s, e));
            continue;
        }
        if s < hs {
            out.push((s, hs));
        }
        if he < e {
            out.push((he, e));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ACPI_START;

    const GAP: MmioGap = MmioGap::below_4g(0xc000_0000);

    fn entry(addr: u64, size: u64, kind: E820Type) -> E820Entry {
        E820Entry { addr, size, kind }
    }

    #[test]
    fn memory_below_the_gap() {
        let map = build_memory_map(&[(0, 512 << 20)], GAP, &[]).unwrap();
        assert_eq!(
            map,
            vec![
                entry(0, EBDA_START, E820Type::Ram),
                entry(EBDA_START, HIMEM_START - EBDA_START, E820Type::Reserved),
                entry(HIMEM_START, (512 << 20) - HIMEM_START, E820Type::Ram),
            ]
        );
    }

    #[test]
    fn memory_across_the_gap_as_two_regions() {
        let high = 1u64 << 30;
        let map = build_memory_map(&[(0, 0xc000_0000), (FOUR_GIB, high)], GAP, &[]).unwrap();
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            entry(HIMEM_START, 0xc000_0000 - HIMEM_START, E820Type::Ram)
        );
        assert_eq!(map[3], entry(FOUR_GIB, high, E820Type::Ram));
    }

    #[test]
    fn ram_inside_the_gap_is_cut_out() {
        // A single region that runs through the gap: the gap part must not be RAM.
        let map = build_memory_map(&[(0, 5 << 30)], GAP, &[]).unwrap();
        assert_eq!(
            map[2],
            entry(HIMEM_START, 0xc000_0000 - HIMEM_START, E820Type::Ram)
        );
        assert_eq!(map[3], entry(FOUR_GIB, (5 << 30) - FOUR_GIB, E820Type::Ram));
        assert_eq!(map.len(), 4);
    }

    #[test]
    fn adjacent_regions_are_merged_and_unsorted_input_is_sorted() {
        let map = build_memory_map(&[(1 << 20, 1 << 20), (0, 1 << 20)], GAP, &[]).unwrap();
        assert_eq!(
            map.last().unwrap(),
            &entry(HIMEM_START, 1 << 20, E820Type::Ram)
        );
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn extra_reserved_entries_are_carved_out() {
        let ecam = entry(0xb000_0000, 0x1000_0000, E820Type::Reserved);
        let map = build_memory_map(&[(0, 0xc000_0000)], GAP, &[ecam]).unwrap();
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            entry(HIMEM_START, 0xb000_0000 - HIMEM_START, E820Type::Ram)
        );
        assert_eq!(map[3], ecam);
    }

    #[test]
    fn extra_entries_must_not_overlap_the_bios_area_or_be_ram() {
        let bad = entry(ACPI_START, 0x100, E820Type::Acpi);
        assert!(matches!(
            build_memory_map(&[(0, 1 << 30)], GAP, &[bad]),
            Err(Error::E820Overlap { .. })
        ));
        let ram = entry(1 << 30, 0x1000, E820Type::Ram);
        assert!(matches!(
            build_memory_map(&[(0, 1 << 30)], GAP, &[ram]),
            Err(Error::InvalidConfig { .. })
        ));
    }

    #[test]
    fn entry_limit_is_enforced() {
        // 200 disjoint RAM regions above 4 GiB.
        let ranges: Vec<(u64, u64)> = (0..200u64)
            .map(|i| (FOUR_GIB + i * 0x2000, 0x1000))
            .collect();
        assert!(matches!(
            build_memory_map(&ranges, GAP, &[]),
            Err(Error::TooManyE820Entries {
                count: 201,
                max: 128
            })
        ));
    }

    #[test]
    fn invalid_gap_and_overflow_are_errors() {
        let gap = MmioGap {
            start: 0xd000_0000,
            end: 0xc000_0000,
        };
        assert!(matches!(
            build_memory_map(&[(0, 1 << 30)], gap, &[]),
            Err(Error::InvalidMmioGap { .. })
        ));
        assert!(matches!(
            build_memory_map(&[(u64::MAX, 2)], GAP, &[]),
            Err(Error::RangeOverflow { .. })
        ));
    }
}
