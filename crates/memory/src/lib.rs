// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Guest RAM for x86_64 KVM guests, built on [`vm_memory`].
//!
//! - [`layout`]: RAM split around the 32-bit MMIO gap ([`MMIO_GAP_START`]..[`MMIO_GAP_END`]
//!   by default, configurable with [`LayoutConfig`]), with the figures firmware tables need
//!   ([`RamLayout::ram_below_gap`], [`RamLayout::ram_above_4g`], [`RamLayout::last_addr`]).
//! - [`backing`]: anonymous memory, a memfd (`MAP_SHARED`, its fd and offsets can be handed
//!   to vhost-user backends via [`Ram::shared_regions`]) or hugetlb pages; optional THP and
//!   KSM advice, `MAP_NORESERVE` and prefaulting ([`RamConfig`]).
//! - [`GuestRam`]: vm-memory's `GuestMemoryMmap` with an [`AtomicBitmap`] per region, so
//!   writes that devices make through vm-memory are recorded as dirty.
//! - [`slots`]: KVM memory slots ([`SlotTable`]) with optional `KVM_MEM_LOG_DIRTY_PAGES`.
//! - [`dirty`]: the [`DirtyPages`] set, merging KVM's dirty log (guest writes) with the
//!   vm-memory bitmaps (VMM writes). Reading either source clears it; see
//!   [`SlotTable::take_dirty_pages`].
//!
//! `vm_memory` is re-exported so consumers use the exact version this crate builds on.
//!
//! # Example
//!
//! One GiB of memfd-backed RAM, registered with a KVM VM with dirty logging on:
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmkit_memory::vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::{Backing, RamConfig, SlotTable};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ram = RamConfig::new(1 << 30).backing(Backing::Memfd).build()?;
//! assert_eq!(ram.layout().ram_below_gap(), 1 << 30);
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! let mut slots = SlotTable::new(vm.clone());
//! slots.register_memory(ram.memory(), true)?;
//!
//! // A device writes guest memory through vm-memory: tracked in the AtomicBitmap.
//! ram.memory().write_obj(0x1234_u32, GuestAddress(0x10_0000))?;
//! // ... run vCPUs ...
//! let dirty = slots.take_dirty_pages(ram.memory())?;
//! for range in dirty.ranges() {
//!     println!("dirty: {:#x} + {} pages", range.start.0, range.pages);
//! }
//! // fds and offsets for a vhost-user backend:
//! for r in ram.shared_regions()? {
//!     println!("{:#x}: fd {} offset {:#x}", r.guest_addr.0, r.fd(), r.file_offset);
//! }
//! # Ok(())
//! # }
//! ```

pub mod backing;
pub mod dirty;
pub mod error;
pub mod layout;
pub mod ram;
pub mod slots;

pub use vm_memory;
pub use vm_memory::bitmap::AtomicBitmap;

pub use backing::{Backing, HugePageSize};
pub use dirty::{peek_vmm_dirty_pages, take_vmm_dirty_pages, DirtyPages, DirtyRange, DirtyRanges};
pub use error::{Error, Result};
pub use layout::{
    LayoutConfig, RamLayout, RamRegion, DEFAULT_PHYS_ADDR_BITS, FOUR_GIB, MMIO_GAP_END,
    MMIO_GAP_SIZE, MMIO_GAP_START, PAGE_SIZE,
};
pub use ram::{GuestRam, GuestRamRegion, Ram, RamConfig, SharedRegion};
pub use slots::{SlotInfo, SlotTable};
