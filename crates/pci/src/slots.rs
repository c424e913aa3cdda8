// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The fixed platform layout and slot plan: where every device sits and where its BARs go.
//!
//! A guest's view of its PCI devices is part of its ABI: drivers, udev names
//! (`enp0s3`), saved network configuration and, across live migration, the programmed BAR
//! addresses all depend on it. The plan therefore assigns every kind of device a fixed slot
//! on bus 0 and every slot a fixed address area, so a device's address and BARs never depend
//! on which other devices exist or in what order they were added.
//!
//! Platform layout (x86_64):
//!
//! | what | range |
//! |------|-------|
//! | ECAM ([`ECAM_BASE`], [`ECAM_SIZE`]) | `0xE000_0000..0xF000_0000` (buses 0..=255) |
//! | 32-bit BAR window ([`PCI_MMIO_WINDOW_BASE`]) | `0xC000_0000..0xE000_0000` |
//! | per-slot BAR area ([`SLOT_MMIO_SIZE`]) | window base + slot × 16 MiB |
//! | I/O BAR window ([`PCI_IO_WINDOW_BASE`]) | ports `0xC000..0x10000` |
//! | per-slot I/O area ([`SLOT_IO_SIZE`]) | I/O base + slot × 0x200 |
//!
//! 64-bit BARs are placed below 4 GiB as well (in the slot's area). INTx is not offered:
//! MSI-X is the interrupt path.
//!
//! Slot assignment on bus 0 ([`SlotRole`]):
//!
//! | slot | role |
//! |------|------|
//! | 0 | host bridge |
//! | 1 | console |
//! | 2 | entropy source (rng) |
//! | 3..=10 | disk 0..=7 |
//! | 11..=14 | network 0..=3 |
//! | 15 | balloon |
//! | 16..=31 | free: use [`SlotRole::Slot`] |
//!
//! Inside a slot area, BARs are allocated (with `vm-allocator`) in order of decreasing size,
//! then increasing index, each naturally aligned, from the area's start: the same device
//! always gets the same BAR addresses. Functions of one slot and devices behind a bridge in
//! that slot share the slot's area, in the order they are added.
//!
//! ```
//! use vmkit_pci::{PciBarInfo, PciBarKind, SlotPlan, SlotRole};
//!
//! let plan = SlotPlan::default();
//! let addr = plan.address(SlotRole::Disk(1))?;
//! assert_eq!((addr.bus, addr.device, addr.function), (0, 4, 0));
//! let bars = [PciBarInfo { index: 0, kind: PciBarKind::Memory64, size: 0x4000, prefetchable: false }];
//! let placed = plan.bar_addresses(addr.device, &bars)?;
//! assert_eq!(placed, vec![(0, 0xC000_0000 + 4 * 0x100_0000)]);
//! # Ok::<(), vmkit_pci::PciError>(())
//! ```

use vm_allocator::{AddressAllocator, AllocPolicy};

use crate::{PciAddress, PciBarInfo, PciBarKind, PciError};

/// Base of the ECAM (PCI Express enhanced configuration access) window, advertised in the
/// ACPI MCFG table.
pub const ECAM_BASE: u64 = 0xE000_0000;
/// Buses covered by the ECAM window (0..=255).
pub const ECAM_BUSES: u16 = 256;
/// Size of the ECAM window: 1 MiB per bus.
pub const ECAM_SIZE: u64 = (ECAM_BUSES as u64) << 20;
/// Start of the 32-bit window for memory BARs.
pub const PCI_MMIO_WINDOW_BASE: u64 = 0xC000_0000;
/// Size of the 32-bit memory BAR window (up to [`ECAM_BASE`]).
pub const PCI_MMIO_WINDOW_SIZE: u64 = ECAM_BASE - PCI_MMIO_WINDOW_BASE;
/// Memory BAR area per slot.
pub const SLOT_MMIO_SIZE: u64 = 16 << 20;
/// Start of the I/O port window for I/O BARs.
pub const PCI_IO_WINDOW_BASE: u64 = 0xC000;
/// Size of the I/O port window.
pub const PCI_IO_WINDOW_SIZE: u64 = 0x4000;
/// I/O BAR area per slot.
pub const SLOT_IO_SIZE: u64 = 0x200;

/// What a slot on bus 0 is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotRole {
    /// The host bridge (slot 0; the root complex puts it there itself).
    HostBridge,
    /// The console device (slot 1).
    Console,
    /// The entropy device (slot 2).
    Rng,
    /// Disk `k` (0..=7, slots 3..=10).
    Disk(u8),
    /// Network device `k` (0..=3, slots 11..=14).
    Net(u8),
    /// The memory balloon (slot 15).
    Balloon,
    /// An explicit slot (1..=31). Slots 16..=31 are never given to a named role.
    Slot(u8),
}

/// A slot plan: the fixed layout above, or another one with the same rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// Start of the memory BAR window.
    pub mmio_base: u64,
    /// Memory BAR area per slot (a power of two).
    pub mmio_slot_size: u64,
    /// Start of the I/O BAR window.
    pub io_base: u64,
    /// I/O BAR area per slot (a power of two).
    pub io_slot_size: u64,
}

impl Default for SlotPlan {
    fn default() -> Self {
        Self {
            mmio_base: PCI_MMIO_WINDOW_BASE,
            mmio_slot_size: SLOT_MMIO_SIZE,
            io_base: PCI_IO_WINDOW_BASE,
            io_slot_size: SLOT_IO_SIZE,
        }
    }
}

impl SlotPlan {
    /// The bus 0 slot for `role`.
    pub fn slot(&self, role: SlotRole) -> Result<u8, PciError> {
        let bad = |d: u8| {
            PciError::InvalidAddress(PciAddress {
                bus: 0,
                device: d,
                function: 0,
            })
        };
        match role {
            SlotRole::HostBridge => Ok(0),
            SlotRole::Console => Ok(1),
            SlotRole::Rng => Ok(2),
            SlotRole::Disk(k) if k < 8 => Ok(3 + k),
            SlotRole::Net(k) if k < 4 => Ok(11 + k),
            SlotRole::Balloon => Ok(15),
            SlotRole::Slot(s) if (1..32).contains(&s) => Ok(s),
            SlotRole::Disk(k) | SlotRole::Net(k) | SlotRole::Slot(k) => Err(bad(k)),
        }
    }

    /// The address (bus 0, function 0) of `role`.
    pub fn address(&self, role: SlotRole) -> Result<PciAddress, PciError> {
        PciAddress::new(0, self.slot(role)?, 0)
    }

    /// The memory BAR area `(base, size)` of bus 0 slot `slot`.
    pub fn mmio_area(&self, slot: u8) -> (u64, u64) {
        (
            self.mmio_base + u64::from(slot & 31) * self.mmio_slot_size,
            self.mmio_slot_size,
        )
    }

    /// The I/O BAR area `(base, size)` of bus 0 slot `slot`.
    pub fn io_area(&self, slot: u8) -> (u64, u64) {
        (
            self.io_base + u64::from(slot & 31) * self.io_slot_size,
            self.io_slot_size,
        )
    }

    /// The whole memory BAR window `(base, size)` (32 slots).
    pub fn mmio_window(&self) -> (u64, u64) {
        (self.mmio_base, 32 * self.mmio_slot_size)
    }

    /// The whole I/O BAR window `(base, size)` (32 slots).
    pub fn io_window(&self) -> (u64, u64) {
        (self.io_base, 32 * self.io_slot_size)
    }

    /// Where a device alone in `slot` gets its BARs: `(index, address)` for each of
    /// `bars`, in the order given. This is what [`crate::PciRoot::add_device`] assigns.
    pub fn bar_addresses(&self, slot: u8, bars: &[PciBarInfo]) -> Result<Vec<(u8, u64)>, PciError> {
        let mut alloc = SlotAllocator::new(self, slot)?;
        let addr = PciAddress {
            bus: 0,
            device: slot,
            function: 0,
        };
        alloc.allocate(addr, bars)
    }
}

/// The address allocators of one slot area.
#[derive(Debug)]
pub(crate) struct SlotAllocator {
    mem: AddressAllocator,
    io: AddressAllocator,
}

fn alloc_err(addr: PciAddress, e: impl std::fmt::Display) -> PciError {
    PciError::BarAllocation {
        addr,
        reason: e.to_string(),
    }
}

impl SlotAllocator {
    pub(crate) fn new(plan: &SlotPlan, slot: u8) -> Result<Self, PciError> {
        let at = PciAddress {
            bus: 0,
            device: slot,
            function: 0,
        };
        let (mb, ms) = plan.mmio_area(slot);
        let (ib, is) = plan.io_area(slot);
        Ok(Self {
            mem: AddressAllocator::new(mb, ms).map_err(|e| alloc_err(at, e))?,
            io: AddressAllocator::new(ib, is).map_err(|e| alloc_err(at, e))?,
        })
    }

    /// Allocates all of `bars` or none: returns `(index, address)` in the order of `bars`.
    pub(crate) fn allocate(
        &mut self,
        addr: PciAddress,
        bars: &[PciBarInfo],
    ) -> Result<Vec<(u8, u64)>, PciError> {
        let mut order: Vec<&PciBarInfo> = bars.iter().collect();
        order.sort_by(|a, b| b.size.cmp(&a.size).then(a.index.cmp(&b.index)));
        let mut done: Vec<(u8, PciBarKind, vm_allocator::RangeInclusive)> = Vec::new();
        for bar in order {
            let alloc = match bar.kind {
                PciBarKind::Io => &mut self.io,
                _ => &mut self.mem,
            };
            match alloc.allocate(bar.size, bar.size, AllocPolicy::FirstMatch) {
                Ok(r) => done.push((bar.index, bar.kind, r)),
                Err(e) => {
                    for (_, kind, r) in &done {
                        let a = match kind {
                            PciBarKind::Io => &mut self.io,
                            _ => &mut self.mem,
                        };
                        if let Err(fe) = a.free(r) {
                            log::warn!("PCI {addr}: cannot free {r:?}: {fe}");
                        }
                    }
                    return Err(alloc_err(
                        addr,
                        format!(
                            "BAR {} ({:?}, {:#x} bytes): {e}",
                            bar.index, bar.kind, bar.size
                        ),
                    ));
                }
            }
        }
        Ok(bars
            .iter()
            .filter_map(|b| {
                done.iter()
                    .find(|(i, _, _)| *i == b.index)
                    .map(|(i, _, r)| (*i, r.start()))
            })
            .collect())
    }

    /// Marks `[start, start + size)` as used (a restored function's BAR), if it lies in the
    /// slot area and is free. Returns whether it was reserved.
    pub(crate) fn reserve(&mut self, kind: PciBarKind, start: u64, size: u64) -> bool {
        let a = match kind {
            PciBarKind::Io => &mut self.io,
            _ => &mut self.mem,
        };
        let inside = start >= a.base() && start.checked_add(size - 1).is_some_and(|l| l <= a.end());
        inside
            && a.allocate(size, size, AllocPolicy::ExactMatch(start))
                .is_ok()
    }

    /// Returns a device's BAR ranges to the allocator.
    pub(crate) fn free(&mut self, bars: &[(PciBarKind, u64, u64)]) {
        for &(kind, start, size) in bars {
            let Ok(r) = vm_allocator::RangeInclusive::new(start, start + (size - 1)) else {
                continue;
            };
            let a = match kind {
                PciBarKind::Io => &mut self.io,
                _ => &mut self.mem,
            };
            if let Err(e) = a.free(&r) {
                log::warn!("PCI slot allocator: cannot free {r:?}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bar(index: u8, kind: PciBarKind, size: u64) -> PciBarInfo {
        PciBarInfo {
            index,
            kind,
            size,
            prefetchable: false,
        }
    }

    #[test]
    fn roles_map_to_fixed_slots() {
        let p = SlotPlan::default();
        assert_eq!(p.slot(SlotRole::HostBridge).unwrap(), 0);
        assert_eq!(p.slot(SlotRole::Console).unwrap(), 1);
        assert_eq!(p.slot(SlotRole::Rng).unwrap(), 2);
        assert_eq!(p.slot(SlotRole::Disk(0)).unwrap(), 3);
        assert_eq!(p.slot(SlotRole::Disk(7)).unwrap(), 10);
        assert!(p.slot(SlotRole::Disk(8)).is_err());
        assert_eq!(p.slot(SlotRole::Net(3)).unwrap(), 14);
        assert!(p.slot(SlotRole::Net(4)).is_err());
        assert_eq!(p.slot(SlotRole::Balloon).unwrap(), 15);
        assert_eq!(p.slot(SlotRole::Slot(31)).unwrap(), 31);
        assert!(p.slot(SlotRole::Slot(0)).is_err());
        assert!(p.slot(SlotRole::Slot(32)).is_err());
        assert_eq!(p.mmio_area(31), (0xdf00_0000, 0x100_0000));
        assert_eq!(p.io_area(31), (0xfe00, 0x200));
        let (b, s) = p.mmio_window();
        assert_eq!(b + s, ECAM_BASE);
        let (b, s) = p.io_window();
        assert_eq!(b + s, 0x10000);
        assert_eq!(ECAM_SIZE, 0x1000_0000);
    }

    #[test]
    fn allocation_is_deterministic_and_aligned() {
        let p = SlotPlan::default();
        let bars = [
            bar(0, PciBarKind::Memory32, 0x1000),
            bar(1, PciBarKind::Io, 0x40),
            bar(2, PciBarKind::Memory64, 0x10_0000),
            bar(4, PciBarKind::Memory32, 0x1000),
        ];
        let a = p.bar_addresses(5, &bars).unwrap();
        let base = 0xc000_0000 + 5 * 0x100_0000;
        assert_eq!(
            a,
            vec![
                (0, base + 0x10_0000),
                (1, 0xc000 + 5 * 0x200),
                (2, base),
                (4, base + 0x10_1000)
            ]
        );
        assert_eq!(p.bar_addresses(5, &bars).unwrap(), a);
        assert!(p
            .bar_addresses(5, &[bar(0, PciBarKind::Memory64, 0x200_0000)])
            .is_err());
    }

    #[test]
    fn failed_allocation_rolls_back() {
        let p = SlotPlan::default();
        let mut s = SlotAllocator::new(&p, 3).unwrap();
        let at = PciAddress::new(0, 3, 0).unwrap();
        let big = [
            bar(0, PciBarKind::Memory32, 0x80_0000),
            bar(1, PciBarKind::Memory32, 0x80_0000),
            bar(2, PciBarKind::Memory32, 0x80_0000),
        ];
        assert!(s.allocate(at, &big).is_err());
        let two = s.allocate(at, &big[..2]).unwrap();
        assert_eq!(two[0].1, 0xc300_0000);
        s.free(&[(PciBarKind::Memory32, two[1].1, 0x80_0000)]);
        assert_eq!(s.allocate(at, &big[2..]).unwrap()[0].1, two[1].1);
        let mut r = SlotAllocator::new(&p, 4).unwrap();
        assert!(r.reserve(PciBarKind::Memory32, 0xc400_1000, 0x1000));
        assert!(
            !r.reserve(PciBarKind::Memory32, 0xc400_1000, 0x1000),
            "taken"
        );
        assert!(
            !r.reserve(PciBarKind::Memory32, 0xc300_0000, 0x1000),
            "other slot"
        );
        assert!(r.reserve(PciBarKind::Io, 0xc800, 0x20));
        let got = r
            .allocate(
                at,
                &[
                    bar(0, PciBarKind::Memory32, 0x1000),
                    bar(1, PciBarKind::Memory32, 0x1000),
                ],
            )
            .unwrap();
        assert_eq!(got, vec![(0, 0xc400_0000), (1, 0xc400_2000)]);
    }
}
