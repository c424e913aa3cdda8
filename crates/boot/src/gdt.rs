// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The boot GDT and IDT, and decoded segment descriptors for the vCPU set-up.
//!
//! One GDT serves both boot protocols:
//!
//! | selector | descriptor                                   | used by                      |
//! |----------|----------------------------------------------|------------------------------|
//! | `0x00`   | null                                         |                              |
//! | `0x08`   | 32-bit flat code (`0x00cf9b000000ffff`)       | PVH (`cs`)                   |
//! | `0x10`   | 64-bit code (`0x00af9b000000ffff`)            | Linux 64-bit, `__BOOT_CS`    |
//! | `0x18`   | flat data (`0x00cf93000000ffff`)              | both, `__BOOT_DS`            |
//!
//! The task register needs no GDT entry to enter the guest: [`BootGdt::tss_segment`] gives
//! the hidden part to load directly.

use vm_memory::GuestMemoryBackend;

use crate::error::Result;
use crate::guest::write_bytes;
use crate::layout::{GDT_ENTRIES, GDT_START, IDT_SIZE, IDT_START};

/// Selector of the 32-bit code segment (PVH entry).
pub const CODE32_SELECTOR: u16 = 0x08;
/// Selector of the 64-bit code segment (`__BOOT_CS` of the Linux 64-bit boot protocol).
pub const CODE64_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;

/// Builds a GDT descriptor from `flags` (access byte in bits 0..8, flags nibble in 12..16),
/// `base` and the 20-bit `limit`.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// A segment register's hidden state, laid out like `kvm_segment` so that the vCPU crate can
/// copy it field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type field (4 bits).
    pub type_: u8,
    /// Present bit.
    pub present: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: u8,
    /// Descriptor type (1 = code/data).
    pub s: u8,
    /// 64-bit code segment.
    pub l: u8,
    /// Granularity.
    pub g: u8,
    /// Available for software.
    pub avl: u8,
    /// KVM's "unusable" marker.
    pub unusable: u8,
}

impl Segment {
    /// Decodes the descriptor `entry` loaded with `selector`.
    pub fn from_descriptor(selector: u16, entry: u64) -> Self {
        let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
        let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
        let g = ((entry >> 55) & 1) as u8;
        let limit = if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        };
        let present = ((entry >> 47) & 1) as u8;
        Segment {
            base,
            limit,
            selector,
            type_: ((entry >> 40) & 0xf) as u8,
            present,
            dpl: ((entry >> 45) & 3) as u8,
            db: ((entry >> 54) & 1) as u8,
            s: ((entry >> 44) & 1) as u8,
            l: ((entry >> 53) & 1) as u8,
            g,
            avl: ((entry >> 52) & 1) as u8,
            unusable: u8::from(present == 0),
        }
    }
}

/// The boot GDT: where it lives and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootGdt {
    /// Guest-physical address of the table.
    pub addr: u64,
    /// Descriptors, indexed by `selector >> 3`.
    pub entries: [u64; GDT_ENTRIES],
}

impl Default for BootGdt {
    fn default() -> Self {
        Self::new()
    }
}

impl BootGdt {
    /// The boot GDT described in the module documentation, at [`GDT_START`].
    pub const fn new() -> Self {
        BootGdt {
            addr: GDT_START,
            entries: [
                0,
                gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB flat
                gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data, 4 GiB flat
            ],
        }
    }

    /// GDTR limit (size in bytes minus one).
    pub const fn limit(&self) -> u16 {
        (GDT_ENTRIES * 8 - 1) as u16
    }

    /// Decoded segment for `selector`, or `None` if the selector is outside the table.
    pub fn segment(&self, selector: u16) -> Option<Segment> {
        self.entries
            .get(usize::from(selector >> 3))
            .map(|&e| Segment::from_descriptor(selector, e))
    }

    /// The 32-bit code segment (PVH `cs`).
    pub fn code32(&self) -> Segment {
        Segment::from_descriptor(CODE32_SELECTOR, self.entries[1])
    }

    /// The 64-bit code segment (`__BOOT_CS`).
    pub fn code64(&self) -> Segment {
        Segment::from_descriptor(CODE64_SELECTOR, self.entries[2])
    }

    /// The flat data segment (`__BOOT_DS`), for `ds`, `es`, `fs`, `gs` and `ss`.
    pub fn data(&self) -> Segment {
        Segment::from_descriptor(DATA_SELECTOR, self.entries[3])
    }

    /// Hidden state for the task register: a busy TSS at base 0 with limit 0x67. It has no GDT
    /// entry (selector 0); VM entry only needs the hidden part.
    pub fn tss_segment(&self) -> Segment {
        Segment {
            base: 0,
            limit: 0x67,
            selector: 0,
            type_: 11,
            present: 1,
            ..Default::default()
        }
    }

    /// The table as little-endian bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }

    /// Writes the GDT at [`GDT_START`] and an empty IDT at [`IDT_START`].
    pub fn write<M: GuestMemoryBackend>(&self, mem: &M) -> Result<()> {
        write_bytes(mem, "boot GDT", self.addr, &self.to_bytes())?;
        write_bytes(mem, "boot IDT", IDT_START, &[0u8; IDT_SIZE as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_have_the_documented_encoding() {
        let gdt = BootGdt::new();
        assert_eq!(gdt.entries[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt.entries[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt.entries[3], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt.limit(), 31);
    }

    #[test]
    fn segments_decode_like_kvm_expects() {
        let gdt = BootGdt::new();
        let cs = gdt.code64();
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.s, cs.present),
            (0x10, 0xb, 1, 0, 1, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let cs32 = gdt.code32();
        assert_eq!((cs32.selector, cs32.l, cs32.db), (0x08, 0, 1));
        let ds = gdt.data();
        assert_eq!(
            (ds.selector, ds.type_, ds.db, ds.l, ds.limit),
            (0x18, 3, 1, 0, 0xffff_ffff)
        );
        assert_eq!(gdt.segment(0x18), Some(ds));
        assert_eq!(gdt.segment(0x20), None);
        let null = gdt.segment(0).unwrap();
        assert_eq!(null.unusable, 1);
        let base = Segment::from_descriptor(0x8, gdt_entry(0x4093, 0x1234_5678, 0x12345));
        assert_eq!(
            (base.base, base.limit, base.g, base.db),
            (0x1234_5678, 0x12345, 0, 1)
        );
    }
}
