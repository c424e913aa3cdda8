// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Shared set-up for the device benches: guest memory and a split queue laid out by hand
//! (virtio-queue's `MockSplitQueue` overlaps its used ring with the available ring).

#![allow(dead_code)]

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory of the benches.
pub type Mem = GuestMemoryMmap<AtomicBitmap>;

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: indirect table.
pub const F_INDIRECT: u16 = 4;

/// 16 MiB at address 0.
pub fn memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("guest memory")
}

/// A queue of `size` entries at address 0 with rings laid out back to back.
pub struct Rings {
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
}

impl Rings {
    /// Rings for a queue of `size` entries.
    pub fn new(size: u16) -> Self {
        let avail = 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Rings {
            size,
            desc: 0,
            avail,
            used,
        }
    }

    /// A `Queue` over these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue");
        q.set_size(self.size);
        q.set_ready(true);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q
    }

    /// Writes `descs` (addr, len, writable) as a chain at descriptor 0, or as an indirect
    /// table at `0x8000` referenced by descriptor 0, and makes it the only available entry.
    pub fn post(&self, mem: &Mem, descs: &[(u64, u32, bool)], indirect: bool) {
        let encode = |i: usize, d: &(u64, u32, bool)| {
            let mut flags = if d.2 { F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= F_NEXT;
            }
            RawDescriptor::from(Descriptor::new(d.0, d.1, flags, i as u16 + 1))
        };
        let table = if indirect { 0x8000 } else { self.desc };
        for (i, d) in descs.iter().enumerate() {
            mem.write_obj(encode(i, d), GuestAddress(table + 16 * i as u64))
                .expect("descriptor");
        }
        if indirect {
            let head = Descriptor::new(0x8000, 16 * descs.len() as u32, F_INDIRECT, 0);
            mem.write_obj(RawDescriptor::from(head), GuestAddress(self.desc))
                .expect("descriptor");
        }
        mem.write_obj(0u16, GuestAddress(self.avail + 4))
            .expect("avail ring");
        mem.write_obj(1u16, GuestAddress(self.avail + 2))
            .expect("avail idx");
    }
}
