// SPDX-License-Identifier: Apache-2.0 OR MIT
//! KVM memory slots: registering guest RAM with a VM, dirty logging, reading KVM's dirty log.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, VmFd};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::dirty::{take_vmm_dirty_pages, DirtyPages};
use crate::error::{Error, Result};
use crate::layout::PAGE_SIZE;
use crate::ram::GuestRam;

/// KVM's documented default when `KVM_CAP_NR_MEMSLOTS` is not reported.
const DEFAULT_NR_MEMSLOTS: u32 = 32;

/// Public bookkeeping of one KVM memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// KVM slot id.
    pub slot: u32,
    /// Guest-physical start.
    pub guest_addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address the slot maps.
    pub host_addr: u64,
    /// Whether `KVM_MEM_LOG_DIRTY_PAGES` is set.
    pub dirty_log: bool,
}

impl SlotInfo {
    fn flags(&self) -> u32 {
        if self.dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }

    fn kvm_region(&self) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags: self.flags(),
            guest_phys_addr: self.guest_addr.0,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }

    fn end(&self) -> u64 {
        self.guest_addr.0.saturating_add(self.size)
    }
}

struct Slot {
    info: SlotInfo,
    /// Keeps the host mapping alive for as long as KVM may access it.
    mapping: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.info.fmt(f)
    }
}

/// The KVM memory slots of one VM.
///
/// The table owns an `Arc` of the [`VmFd`] and of every mapping it registered: a mapping is
/// released only after its slot is deleted from KVM (by [`SlotTable::remove`] or when the
/// table is dropped), so the guest can never reach host memory that was unmapped and reused.
///
/// Slot ids are allocated lowest-free-first starting at the table's first slot id (0 unless
/// set with [`SlotTable::with_first_slot`], for VMMs that hand out low ids elsewhere).
#[derive(Debug)]
pub struct SlotTable {
    vm: Arc<VmFd>,
    slots: BTreeMap<u32, Slot>,
    first_slot: u32,
    limit: u32,
}

impl SlotTable {
    /// An empty table for `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self::with_first_slot(vm, 0)
    }

    /// An empty table for `vm` that allocates slot ids from `first_slot` up.
    pub fn with_first_slot(vm: Arc<VmFd>, first_slot: u32) -> Self {
        let reported = vm.check_extension_int(Cap::NrMemslots);
        let limit = u32::try_from(reported)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_NR_MEMSLOTS);
        SlotTable {
            vm,
            slots: BTreeMap::new(),
            first_slot,
            limit,
        }
    }

    /// The VM the slots belong to.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Number of slots KVM supports for this VM (`KVM_CAP_NR_MEMSLOTS`).
    pub fn slot_limit(&self) -> u32 {
        self.limit
    }

    /// The registered slots, by slot id.
    pub fn slots(&self) -> impl Iterator<Item = &SlotInfo> + '_ {
        self.slots.values().map(|s| &s.info)
    }

    /// Bookkeeping of slot `slot`.
    pub fn slot(&self, slot: u32) -> Option<&SlotInfo> {
        self.slots.get(&slot).map(|s| &s.info)
    }

    /// The slot containing guest address `addr`.
    pub fn slot_at(&self, addr: GuestAddress) -> Option<&SlotInfo> {
        self.slots()
            .find(|s| addr.0 >= s.guest_addr.0 && addr.0 < s.end())
    }

    fn free_slot_id(&self) -> Result<u32> {
        let mut id = self.first_slot;
        for &used in self.slots.range(self.first_slot..).map(|(k, _)| k) {
            if used != id {
                break;
            }
            id = id.saturating_add(1);
        }
        if id >= self.limit {
            return Err(Error::NoFreeSlot { limit: self.limit });
        }
        Ok(id)
    }

    fn set_region(&self, info: &SlotInfo, size: u64) -> Result<()> {
        let mut region = info.kvm_region();
        region.memory_size = size;
        // SAFETY: `userspace_addr..+memory_size` is a live mapping: it comes from a vm-memory
        // `MmapRegion` whose `Arc` this table keeps in the slot entry until after the slot is
        // deleted from KVM (size 0). Deleting needs no valid mapping.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| {
            Error::SetUserMemoryRegion {
                slot: info.slot,
                guest_addr: info.guest_addr.0,
                size,
                source,
            }
        })
    }

    /// Registers one mmap region as a new slot and returns its id.
    ///
    /// Errors: [`Error::InvalidSlotRange`] (empty or unaligned), [`Error::SlotOverlap`],
    /// [`Error::NoFreeSlot`], [`Error::SetUserMemoryRegion`].
    pub fn register_region<B>(
        &mut self,
        region: &GuestRegionMmap<B>,
        dirty_log: bool,
    ) -> Result<u32>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let start = region.start_addr().0;
        let size = region.len();
        let host_addr = region.as_ptr() as u64;
        let bad = |reason| Error::InvalidSlotRange {
            start,
            size,
            reason,
        };
        if size == 0 {
            return Err(bad("the region is empty"));
        }
        if start % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || host_addr % PAGE_SIZE != 0 {
            return Err(bad(
                "guest address, size and host address must be page-aligned",
            ));
        }
        let end = start
            .checked_add(size)
            .ok_or(bad("the range wraps around 2^64"))?;
        if let Some(other) = self
            .slots()
            .find(|s| start < s.end() && s.guest_addr.0 < end)
        {
            return Err(Error::SlotOverlap {
                start,
                size,
                slot: other.slot,
                slot_start: other.guest_addr.0,
                slot_size: other.size,
            });
        }
        let info = SlotInfo {
            slot: self.free_slot_id()?,
            guest_addr: region.start_addr(),
            size,
            host_addr,
            dirty_log,
        };
        let mapping: Arc<dyn Any + Send + Sync> = region.get_mmap();
        // Take the reference before KVM learns the address.
        let slot = Slot { info, mapping };
        self.set_region(&info, size)?;
        self.slots.insert(info.slot, slot);
        Ok(info.slot)
    }

    /// Registers every region of `mem`, one slot each, and returns the slot ids. All or
    /// nothing: if one region fails, the slots added by this call are removed again.
    pub fn register_memory<B>(
        &mut self,
        mem: &GuestMemoryMmap<B>,
        dirty_log: bool,
    ) -> Result<Vec<u32>>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let mut added = Vec::with_capacity(mem.num_regions());
        for region in mem.iter() {
            match self.register_region(region, dirty_log) {
                Ok(id) => added.push(id),
                Err(e) => {
                    for id in added {
                        // Best effort; the original error is the one to report.
                        let _ = self.remove(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(added)
    }

    /// Turns `KVM_MEM_LOG_DIRTY_PAGES` on or off for one slot.
    ///
    /// Turning it on starts from a clean log. Turning it off discards KVM's log of that slot:
    /// read it first ([`SlotTable::take_kvm_dirty_pages`]) if it still matters.
    pub fn set_dirty_logging(&mut self, slot: u32, on: bool) -> Result<()> {
        let entry = self.slots.get(&slot).ok_or(Error::UnknownSlot(slot))?;
        if entry.info.dirty_log == on {
            return Ok(());
        }
        let info = SlotInfo {
            dirty_log: on,
            ..entry.info
        };
        self.set_region(&info, info.size)?;
        if let Some(entry) = self.slots.get_mut(&slot) {
            entry.info.dirty_log = on;
        }
        Ok(())
    }

    /// [`SlotTable::set_dirty_logging`] for every slot (stops at the first failure).
    pub fn set_dirty_logging_all(&mut self, on: bool) -> Result<()> {
        let ids: Vec<u32> = self.slots.keys().copied().collect();
        for id in ids {
            self.set_dirty_logging(id, on)?;
        }
        Ok(())
    }

    /// Deletes a slot from KVM, then releases the table's reference to its mapping.
    pub fn remove(&mut self, slot: u32) -> Result<SlotInfo> {
        let entry = self.slots.get(&slot).ok_or(Error::UnknownSlot(slot))?;
        self.set_region(&entry.info, 0)?;
        let info = entry.info;
        self.slots.remove(&slot);
        Ok(info)
    }

    /// Reads **and clears** KVM's dirty log of every slot that has dirty logging on.
    ///
    /// Without `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (which this crate never enables),
    /// `KVM_GET_DIRTY_LOG` returns the log and resets it atomically per slot, write-protecting
    /// the pages again; a guest write racing with the call lands in this result or the next,
    /// never in neither. Slots without dirty logging contribute nothing. KVM logs guest
    /// writes only: instruction fetches and reads never dirty a page, and neither do writes
    /// the VMM makes through its own mapping (see [`take_vmm_dirty_pages`]).
    pub fn take_kvm_dirty_pages(&self) -> Result<DirtyPages> {
        let mut out = DirtyPages::new();
        for s in self.slots().filter(|s| s.dirty_log) {
            let size = usize::try_from(s.size).map_err(|_| Error::InvalidSlotRange {
                start: s.guest_addr.0,
                size: s.size,
                reason: "larger than the host address space",
            })?;
            let bitmap =
                self.vm
                    .get_dirty_log(s.slot, size)
                    .map_err(|source| Error::GetDirtyLog {
                        slot: s.slot,
                        source,
                    })?;
            out.add_bitmap(s.guest_addr, &bitmap, s.size / PAGE_SIZE);
        }
        Ok(out)
    }

    /// Reads and clears both sources of dirty pages and returns their union: KVM's log of
    /// guest writes ([`SlotTable::take_kvm_dirty_pages`]) and vm-memory's bitmaps of VMM-side
    /// writes to `mem` ([`take_vmm_dirty_pages`]). After it returns, a page shows up in the
    /// next call only if it is written again.
    pub fn take_dirty_pages(&self, mem: &GuestRam) -> Result<DirtyPages> {
        let mut pages = self.take_kvm_dirty_pages()?;
        pages.union_with(&take_vmm_dirty_pages(mem));
        Ok(pages)
    }
}

impl Drop for SlotTable {
    fn drop(&mut self) {
        for (_, slot) in std::mem::take(&mut self.slots) {
            if self.set_region(&slot.info, 0).is_err() {
                // KVM may still map this memory: never unmap it. Leaking is the safe choice.
                std::mem::forget(slot.mapping);
            }
        }
    }
}
