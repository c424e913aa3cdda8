// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Test helpers: guest memory, a recording [`VirtioInterrupt`] and a split-queue builder
//! for direct and indirect chains.
#![allow(clippy::unwrap_used, dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

use super::GuestMem;
use crate::{VirtioInterrupt, VirtioInterruptType, VirtioMemory};

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: indirect table.
pub const F_INDIRECT: u16 = 4;

/// Size of the test guest memory.
pub const MEM_SIZE: usize = 16 << 20;

/// A 16 MiB guest memory at address 0.
pub fn memory() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// The same, wrapped as devices get it.
pub fn atomic(mem: &GuestMem) -> VirtioMemory {
    GuestMemoryAtomic::new(mem.clone())
}

/// Records every interrupt.
#[derive(Default)]
pub struct TestInterrupt {
    pub events: Mutex<Vec<VirtioInterruptType>>,
    pub cond: Condvar,
    pub needs_reset: AtomicBool,
}

impl TestInterrupt {
    pub fn count(&self, kind: VirtioInterruptType) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|k| **k == kind)
            .count()
    }

    /// Waits until `kind` was raised at least `n` times.
    pub fn wait_for(&self, kind: VirtioInterruptType, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ev = self.events.lock().unwrap();
        loop {
            if ev.iter().filter(|k| **k == kind).count() >= n {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            ev = self.cond.wait_timeout(ev, deadline - now).unwrap().0;
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for TestInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> Result<(), vmkit_device::InterruptError> {
        self.events.lock().unwrap().push(kind);
        self.cond.notify_all();
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.cond.notify_all();
    }
}

/// One descriptor to build: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct D(pub u64, pub u32, pub bool);

/// A split queue in test memory with helpers to post chains and read the used ring.
///
/// (virtio-queue's `MockSplitQueue` places the used ring over the upper half of the
/// available ring — its `end()` counts elements, not bytes — so we lay the rings out here.)
pub struct TestQueue<'a> {
    desc: u64,
    avail: u64,
    used: u64,
    mem: &'a GuestMem,
    size: u16,
    next_desc: u16,
    next_indirect: u64,
    avail_idx: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries whose rings start at `base`.
    pub fn new(mem: &'a GuestMem, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        for a in avail..used + 6 + 8 * u64::from(size) {
            mem.write_obj(0u8, GuestAddress(a)).unwrap();
        }
        TestQueue {
            desc: base,
            avail,
            used,
            mem,
            size,
            next_desc: 0,
            next_indirect: base + 0x8000,
            avail_idx: 0,
        }
    }

    /// A `Queue` over these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_ready(true);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q
    }

    fn push_avail(&mut self, head: u16) {
        let avail = self.avail;
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(avail + 2))
            .unwrap();
    }

    fn encode(descs: &[D], first_next: u16) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut flags = if d.2 { F_WRITE } else { 0 };
                let last = i + 1 == descs.len();
                if !last {
                    flags |= F_NEXT;
                }
                let next = if last { 0 } else { first_next + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(d.0, d.1, flags, next))
            })
            .collect()
    }

    /// Posts a chain of direct descriptors; returns its head index.
    pub fn add(&mut self, descs: &[D]) -> u16 {
        let head = self.take(descs.len());
        for (i, raw) in Self::encode(descs, head).into_iter().enumerate() {
            self.store(head + i as u16, raw);
        }
        self.push_avail(head);
        head
    }

    fn store(&self, index: u16, raw: RawDescriptor) {
        self.mem
            .write_obj(raw, GuestAddress(self.desc + 16 * u64::from(index)))
            .unwrap();
    }

    /// Address of the `used_event` field (for `EVENT_IDX` tests).
    pub fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.avail + 4 + 2 * u64::from(self.size))
    }

    /// Reserves `n` consecutive descriptor slots (wrapping to 0 when they do not fit;
    /// earlier chains must have been consumed by then).
    fn take(&mut self, n: usize) -> u16 {
        let n = n as u16;
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        self.next_desc = (self.next_desc + n) % self.size;
        head
    }

    /// Posts a chain whose head is an indirect descriptor pointing at `descs`.
    pub fn add_indirect(&mut self, descs: &[D]) -> u16 {
        let table = self.next_indirect;
        for (i, raw) in Self::encode(descs, 0).into_iter().enumerate() {
            self.mem
                .write_obj(raw, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        self.next_indirect += 16 * descs.len() as u64;
        let head = self.take(1);
        let raw = RawDescriptor::from(SplitDescriptor::new(
            table,
            16 * descs.len() as u32,
            F_INDIRECT,
            0,
        ));
        self.store(head, raw);
        self.push_avail(head);
        head
    }

    /// Posts raw descriptors at `head..` as-is (for malformed chains).
    pub fn add_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.take(descs.len());
        for (i, d) in descs.iter().enumerate() {
            let raw = RawDescriptor::from(SplitDescriptor::new(d.0, d.1, d.2, d.3));
            self.store(head + i as u16, raw);
        }
        self.push_avail(head);
        head
    }

    /// The used ring index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(self.used + 2))
            .unwrap()
    }

    /// Used ring entry `i`: (head, len).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let base = self.used + 4 + 8 * u64::from(i % self.size);
        let id = self.mem.read_obj::<u32>(GuestAddress(base)).unwrap();
        let len = self.mem.read_obj::<u32>(GuestAddress(base + 4)).unwrap();
        (id, len)
    }
}
