// SPDX-License-Identifier: Apache-2.0 OR MIT
//! x86_64 guest-physical RAM layout: RAM split around the 32-bit MMIO gap.
//!
//! RAM starts at guest-physical 0. The part that does not fit below the MMIO gap (where PCI
//! BARs, the IOAPIC, the LAPIC, flash and so on live) continues at the end of the gap, which by
//! default is 4 GiB:
//!
//! ```text
//!  0                     MMIO_GAP_START     MMIO_GAP_END (4 GiB)
//!  |------ RAM ------------|//// MMIO ////|------ RAM (rest) ------|
//! ```

use vm_memory::GuestAddress;

use crate::error::{Error, Result};

/// Page size used for layout alignment and dirty tracking (x86_64 base page).
pub const PAGE_SIZE: u64 = 0x1000;

/// Default start of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xC000_0000;

/// Default end (exclusive) of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// Size of the default 32-bit MMIO gap (1 GiB).
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;

/// 4 GiB, the first address that 32-bit code cannot reach.
pub const FOUR_GIB: u64 = 0x1_0000_0000;

/// Default guest-physical address width used to bound the layout (1 TiB of address space).
///
/// Every x86_64 CPU in service reports at least 40 physical address bits in CPUID leaf
/// 0x8000_0008, so a layout within 2^40 works on any host. Raise it with
/// [`LayoutConfig::phys_addr_bits`] when the vCPU model advertises more.
pub const DEFAULT_PHYS_ADDR_BITS: u8 = 40;

/// How RAM is laid out: where the MMIO gap is and how far guest-physical addresses may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutConfig {
    gap_start: u64,
    gap_end: u64,
    phys_addr_bits: u8,
}

impl Default for LayoutConfig {
    fn default() -> Self {
        LayoutConfig {
            gap_start: MMIO_GAP_START,
            gap_end: MMIO_GAP_END,
            phys_addr_bits: DEFAULT_PHYS_ADDR_BITS,
        }
    }
}

impl LayoutConfig {
    /// The default configuration: gap [`MMIO_GAP_START`, `MMIO_GAP_END`), 40 address bits.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places the MMIO gap at `[start, end)`. Checked by [`LayoutConfig::layout`]: both ends must
    /// be page-aligned, `0 < start < end`.
    pub fn mmio_gap(mut self, start: u64, end: u64) -> Self {
        self.gap_start = start;
        self.gap_end = end;
        self
    }

    /// Sets the guest-physical address width; RAM must end at or below `1 << bits`.
    /// Checked by [`LayoutConfig::layout`]: must be in `32..=52`.
    pub fn phys_addr_bits(mut self, bits: u8) -> Self {
        self.phys_addr_bits = bits;
        self
    }

    /// Start of the configured MMIO gap.
    pub fn gap_start(&self) -> u64 {
        self.gap_start
    }

    /// End (exclusive) of the configured MMIO gap.
    pub fn gap_end(&self) -> u64 {
        self.gap_end
    }

    /// Exclusive upper bound of guest-physical addresses (`1 << phys_addr_bits`).
    pub fn addr_limit(&self) -> u64 {
        1u64 << self.phys_addr_bits.min(63)
    }

    fn validate(&self) -> Result<()> {
        if !(32..=52).contains(&self.phys_addr_bits) {
            return Err(Error::InvalidPhysAddrBits(self.phys_addr_bits));
        }
        let gap_err = |reason| Error::InvalidGap {
            start: self.gap_start,
            end: self.gap_end,
            reason,
        };
        if self.gap_start % PAGE_SIZE != 0 || self.gap_end % PAGE_SIZE != 0 {
            return Err(gap_err(
                "both ends must be multiples of the 4 KiB page size",
            ));
        }
        if self.gap_start == 0 {
            return Err(gap_err(
                "the gap must start above 0: x86 needs RAM at the bottom of the address space",
            ));
        }
        if self.gap_start >= self.gap_end {
            return Err(gap_err("start must be below end"));
        }
        if self.gap_end > self.addr_limit() {
            return Err(gap_err(
                "the gap ends above the guest-physical address limit",
            ));
        }
        Ok(())
    }

    /// Splits `ram_size` bytes of RAM around the MMIO gap.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::Unaligned`] (not a multiple of [`PAGE_SIZE`]),
    /// [`Error::TooLarge`] (RAM would end above the address limit), [`Error::InvalidGap`],
    /// [`Error::InvalidPhysAddrBits`].
    pub fn layout(&self, ram_size: u64) -> Result<RamLayout> {
        self.validate()?;
        if ram_size == 0 {
            return Err(Error::ZeroSize);
        }
        if ram_size % PAGE_SIZE != 0 {
            return Err(Error::Unaligned {
                what: "guest RAM size",
                value: ram_size,
                align: PAGE_SIZE,
            });
        }
        let below = ram_size.min(self.gap_start);
        let above = ram_size - below;
        let mut regions = vec![RamRegion {
            start: GuestAddress(0),
            size: below,
            file_offset: 0,
        }];
        let end = if above > 0 {
            regions.push(RamRegion {
                start: GuestAddress(self.gap_end),
                size: above,
                file_offset: below,
            });
            self.gap_end.checked_add(above)
        } else {
            Some(below)
        };
        let limit = self.addr_limit();
        match end {
            Some(end) if end <= limit => Ok(RamLayout {
                regions,
                config: *self,
            }),
            Some(end) => Err(Error::TooLarge {
                size: ram_size,
                end: format!("{end:#x}"),
                limit,
            }),
            None => Err(Error::TooLarge {
                size: ram_size,
                end: "beyond 2^64".to_string(),
                limit,
            }),
        }
    }
}

/// One contiguous block of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// First guest-physical address of the block.
    pub start: GuestAddress,
    /// Size in bytes (a multiple of [`PAGE_SIZE`], never 0).
    pub size: u64,
    /// Offset of this block inside the single RAM backing file (the sum of the sizes of the
    /// blocks below it). For file-backed RAM this is the `mmap` offset handed to vhost-user.
    pub file_offset: u64,
}

impl RamRegion {
    /// Exclusive end address.
    pub fn end(&self) -> u64 {
        // Cannot overflow: the layout checked end <= 2^52.
        self.start.0 + self.size
    }

    /// Last guest-physical address in the block.
    pub fn last_addr(&self) -> GuestAddress {
        GuestAddress(self.end() - 1)
    }

    /// Whether `addr` lies in this block.
    pub fn contains(&self, addr: GuestAddress) -> bool {
        addr.0 >= self.start.0 && addr.0 < self.end()
    }
}

/// RAM split around the MMIO gap; produced by [`LayoutConfig::layout`] or [`RamLayout::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    regions: Vec<RamRegion>,
    config: LayoutConfig,
}

impl RamLayout {
    /// Lays out `ram_size` bytes with the default gap [`MMIO_GAP_START`, `MMIO_GAP_END`).
    pub fn new(ram_size: u64) -> Result<Self> {
        LayoutConfig::default().layout(ram_size)
    }

    /// The RAM blocks, sorted by address (one or two).
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The configuration this layout was made from.
    pub fn config(&self) -> &LayoutConfig {
        &self.config
    }

    /// Total RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The MMIO gap as `(start, end_exclusive)`.
    pub fn mmio_gap(&self) -> (GuestAddress, GuestAddress) {
        (
            GuestAddress(self.config.gap_start),
            GuestAddress(self.config.gap_end),
        )
    }

    /// Bytes of RAM below the MMIO gap (starting at 0).
    pub fn ram_below_gap(&self) -> u64 {
        self.regions.first().map_or(0, |r| r.size)
    }

    /// Bytes of RAM placed after the MMIO gap.
    pub fn ram_above_gap(&self) -> u64 {
        self.regions.get(1).map_or(0, |r| r.size)
    }

    /// Bytes of RAM at guest-physical addresses below 4 GiB (what 32-bit firmware tables such
    /// as CMOS 0x34/0x35 describe).
    pub fn ram_below_4g(&self) -> u64 {
        self.ram_size() - self.ram_above_4g()
    }

    /// Bytes of RAM at guest-physical addresses at or above 4 GiB (CMOS 0x5b..0x5d, e820).
    pub fn ram_above_4g(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.end().saturating_sub(r.start.0.max(FOUR_GIB)))
            .sum()
    }

    /// The last guest-physical address that is RAM.
    pub fn last_addr(&self) -> GuestAddress {
        // A layout always has at least one non-empty region.
        self.regions
            .last()
            .map_or(GuestAddress(0), RamRegion::last_addr)
    }

    /// One past the last RAM address.
    pub fn end_addr(&self) -> GuestAddress {
        GuestAddress(self.regions.last().map_or(0, RamRegion::end))
    }

    /// Whether `addr` is RAM.
    pub fn is_ram(&self, addr: GuestAddress) -> bool {
        self.regions.iter().any(|r| r.contains(addr))
    }

    /// The RAM block containing `addr`.
    pub fn region_of(&self, addr: GuestAddress) -> Option<&RamRegion> {
        self.regions.iter().find(|r| r.contains(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn below_gap_is_one_region() {
        let l = RamLayout::new(GIB).unwrap();
        assert_eq!(
            l.regions(),
            &[RamRegion {
                start: GuestAddress(0),
                size: GIB,
                file_offset: 0
            }]
        );
        assert_eq!(l.ram_below_gap(), GIB);
        assert_eq!(l.ram_above_gap(), 0);
        assert_eq!(l.ram_above_4g(), 0);
        assert_eq!(l.ram_below_4g(), GIB);
        assert_eq!(l.last_addr(), GuestAddress(GIB - 1));
        assert_eq!(l.end_addr(), GuestAddress(GIB));
        assert!(l.is_ram(GuestAddress(GIB - 1)));
        assert!(!l.is_ram(GuestAddress(GIB)));
    }

    #[test]
    fn exactly_at_gap_is_one_region() {
        let l = RamLayout::new(MMIO_GAP_START).unwrap();
        assert_eq!(l.regions().len(), 1);
        assert_eq!(l.ram_below_gap(), MMIO_GAP_START);
        assert_eq!(l.ram_above_gap(), 0);
        assert_eq!(l.last_addr(), GuestAddress(MMIO_GAP_START - 1));
        assert!(!l.is_ram(GuestAddress(MMIO_GAP_START)));
    }

    #[test]
    fn one_page_past_gap_splits() {
        let l = RamLayout::new(MMIO_GAP_START + PAGE_SIZE).unwrap();
        assert_eq!(l.regions().len(), 2);
        assert_eq!(
            l.regions()[1],
            RamRegion {
                start: GuestAddress(MMIO_GAP_END),
                size: PAGE_SIZE,
                file_offset: MMIO_GAP_START
            }
        );
        assert_eq!(l.last_addr(), GuestAddress(MMIO_GAP_END + PAGE_SIZE - 1));
    }

    #[test]
    fn across_gap_splits() {
        let size = 8 * GIB;
        let l = RamLayout::new(size).unwrap();
        let r = l.regions();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].start, GuestAddress(0));
        assert_eq!(r[0].size, MMIO_GAP_START);
        assert_eq!(r[1].start, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[1].size, size - MMIO_GAP_START);
        assert_eq!(r[1].file_offset, MMIO_GAP_START);
        assert_eq!(l.ram_size(), size);
        assert_eq!(l.ram_below_gap(), 3 * GIB);
        assert_eq!(l.ram_above_gap(), 5 * GIB);
        assert_eq!(l.ram_above_4g(), 5 * GIB);
        assert_eq!(l.ram_below_4g(), 3 * GIB);
        assert_eq!(l.last_addr(), GuestAddress(MMIO_GAP_END + 5 * GIB - 1));
        assert!(!l.is_ram(GuestAddress(MMIO_GAP_START)));
        assert!(!l.is_ram(GuestAddress(MMIO_GAP_END - 1)));
        assert!(l.is_ram(GuestAddress(MMIO_GAP_END)));
        assert_eq!(
            l.mmio_gap(),
            (GuestAddress(MMIO_GAP_START), GuestAddress(MMIO_GAP_END))
        );
        assert_eq!(l.region_of(GuestAddress(MMIO_GAP_END)), Some(&r[1]));
        assert_eq!(l.region_of(GuestAddress(MMIO_GAP_START)), None);
    }

    #[test]
    fn custom_gap_below_4g() {
        let cfg = LayoutConfig::new().mmio_gap(MIB, 2 * MIB);
        let l = cfg.layout(3 * MIB).unwrap();
        let r = l.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].start.0, r[0].size), (0, MIB));
        assert_eq!(
            (r[1].start.0, r[1].size, r[1].file_offset),
            (2 * MIB, 2 * MIB, MIB)
        );
        // Nothing reaches 4 GiB.
        assert_eq!(l.ram_above_4g(), 0);
        assert_eq!(l.ram_below_4g(), 3 * MIB);
        assert_eq!(l.ram_above_gap(), 2 * MIB);
    }

    #[test]
    fn custom_gap_straddling_4g_counts_above_4g_part() {
        let cfg = LayoutConfig::new().mmio_gap(3 * GIB, 3 * GIB + 512 * MIB);
        let l = cfg.layout(4 * GIB).unwrap();
        // Second region is [3.5G, 4.5G): half of it is at/above 4 GiB.
        assert_eq!(l.ram_above_gap(), GIB);
        assert_eq!(l.ram_above_4g(), 512 * MIB);
        assert_eq!(l.ram_below_4g(), 3 * GIB + 512 * MIB);
    }

    #[test]
    fn zero_size_is_rejected() {
        assert!(matches!(RamLayout::new(0), Err(Error::ZeroSize)));
    }

    #[test]
    fn unaligned_size_is_rejected() {
        let e = RamLayout::new(GIB + 1).unwrap_err();
        assert!(matches!(e, Error::Unaligned { value, .. } if value == GIB + 1));
        assert!(e.to_string().contains("not a multiple"));
    }

    #[test]
    fn too_large_is_rejected() {
        // 1 TiB address space: 1 TiB of RAM pushed above the 1 GiB gap no longer fits.
        let e = RamLayout::new(1 << 40).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        // Exactly filling the address space is fine.
        let fits = (1u64 << 40) - MMIO_GAP_SIZE;
        assert_eq!(
            RamLayout::new(fits).unwrap().end_addr(),
            GuestAddress(1 << 40)
        );
        // More address bits make it fit.
        assert!(LayoutConfig::new()
            .phys_addr_bits(46)
            .layout(1 << 40)
            .is_ok());
        // Overflowing u64 is an error, not a panic.
        let e = LayoutConfig::new()
            .phys_addr_bits(52)
            .layout(!(PAGE_SIZE - 1))
            .unwrap_err();
        assert!(e.to_string().contains("beyond 2^64"), "{e}");
    }

    #[test]
    fn bad_gaps_are_rejected() {
        for (s, e) in [
            (0, MIB),
            (MIB, MIB),
            (2 * MIB, MIB),
            (MIB + 1, 2 * MIB),
            (MIB, 2 * MIB + 7),
        ] {
            let err = LayoutConfig::new().mmio_gap(s, e).layout(GIB).unwrap_err();
            assert!(
                matches!(err, Error::InvalidGap { .. }),
                "{s:#x}-{e:#x}: {err}"
            );
        }
        let err = LayoutConfig::new()
            .mmio_gap(1 << 40, (1 << 40) + MIB)
            .layout(GIB)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidGap { .. }));
        for bits in [31, 53] {
            assert!(matches!(
                LayoutConfig::new().phys_addr_bits(bits).layout(GIB),
                Err(Error::InvalidPhysAddrBits(b)) if b == bits
            ));
        }
    }
}
