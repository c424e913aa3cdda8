// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The address-range bus shared by all vCPU threads.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

/// Errors from bus registration and dispatch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of length zero, or one whose end overflows the 64-bit address space.
    #[error("invalid bus range: base {base:#x}, length {len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The new range overlaps a range that is already registered.
    #[error(
        "bus range {base:#x}+{len:#x} overlaps the registered range {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Start of the registered range it collides with.
        other_base: u64,
        /// Length of the registered range it collides with.
        other_len: u64,
    },
    /// No device is registered at this address.
    #[error("no device at address {0:#x}")]
    NoDevice(u64),
    /// No range starts at this base address (for removal).
    #[error("no range registered at base {0:#x}")]
    NotRegistered(u64),
    /// The access starts inside a device's range but runs past its end.
    #[error("access of {len} bytes at {addr:#x} runs past the end of the range {base:#x}+{range_len:#x}")]
    CrossesRangeEnd {
        /// Address of the access.
        addr: u64,
        /// Size of the access in bytes.
        len: usize,
        /// Start of the range that holds `addr`.
        base: u64,
        /// Length of that range.
        range_len: u64,
    },
}

/// A half-open range `[base, base + len)` of bus addresses (ports or guest-physical MMIO).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// A range of `len` bytes from `base`. Fails for `len == 0` or when the end overflows.
    pub fn new(base: u64, len: u64) -> Result<Self, BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        Ok(Self { base, len })
    }

    /// First address of the range.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length of the range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: a range cannot be empty (kept for API symmetry with collections).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Last address inside the range.
    pub fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr <= self.last()
    }

    /// Whether the two ranges share at least one address.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

/// A device reachable through a [`Bus`].
///
/// Called concurrently from every vCPU thread, hence `&self`: a device keeps its mutable state
/// behind its own lock(s), so that two devices never contend with each other. `base` is the
/// start of the registered range that was hit (a device may be registered at several ranges,
/// e.g. several PCI BARs) and `offset` the distance of the access from it.
///
/// Devices must not panic on any access: unknown registers read as the device defines (often
/// zero or all ones) and writes to them are ignored.
pub trait BusDevice: Send + Sync {
    /// Handles a read of `data.len()` bytes; the device fills `data`.
    fn read(&self, base: u64, offset: u64, data: &mut [u8]);
    /// Handles a write of `data`.
    fn write(&self, base: u64, offset: u64, data: &[u8]);
}

#[derive(Clone)]
struct Entry {
    range: BusRange,
    device: Arc<dyn BusDevice>,
}

/// A map of non-overlapping address ranges to devices.
///
/// Lookups are lock-free (an atomic load of an immutable snapshot plus a binary search), so
/// 64 vCPU threads exiting at once do not serialise on the bus. Updates are serialised by an
/// internal lock and publish a new snapshot.
pub struct Bus {
    entries: ArcSwap<Vec<Entry>>,
    update: Mutex<()>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("ranges", &self.ranges())
            .finish()
    }
}

fn find(entries: &[Entry], addr: u64) -> Option<&Entry> {
    // Index of the first entry whose base is > addr; the candidate is the one before it.
    let idx = entries.partition_point(|e| e.range.base <= addr);
    let entry = entries.get(idx.checked_sub(1)?)?;
    entry.range.contains(addr).then_some(entry)
}

fn insert_sorted(
    entries: &mut Vec<Entry>,
    range: BusRange,
    device: Arc<dyn BusDevice>,
) -> Result<(), BusError> {
    let idx = entries.partition_point(|e| e.range.base < range.base);
    for neighbour in [idx.checked_sub(1), Some(idx)].into_iter().flatten() {
        if let Some(e) = entries.get(neighbour) {
            if e.range.overlaps(&range) {
                return Err(BusError::Overlap {
                    base: range.base,
                    len: range.len,
                    other_base: e.range.base,
                    other_len: e.range.len,
                });
            }
        }
    }
    entries.insert(idx, Entry { range, device });
    Ok(())
}

fn remove_at(entries: &mut Vec<Entry>, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
    let idx = entries
        .binary_search_by_key(&base, |e| e.range.base)
        .map_err(|_| BusError::NotRegistered(base))?;
    Ok(entries.remove(idx).device)
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self {
            entries: ArcSwap::from_pointee(Vec::new()),
            update: Mutex::new(()),
        }
    }

    /// Registers `device` for `range`. Fails if the range overlaps a registered one.
    pub fn insert(&self, range: BusRange, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        let mut tx = self.transaction();
        tx.insert(range, device);
        tx.commit()
    }

    /// Removes the range that starts at `base` and returns its device.
    pub fn remove(&self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        let _guard = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = Vec::clone(&self.entries.load());
        let device = remove_at(&mut next, base)?;
        self.entries.store(Arc::new(next));
        Ok(device)
    }

    /// Starts a transaction: a batch of inserts and removals applied atomically by
    /// [`BusTransaction::commit`].
    pub fn transaction(&self) -> BusTransaction<'_> {
        BusTransaction {
            bus: self,
            ops: Vec::new(),
        }
    }

    /// The device and range that hold `addr`, if any.
    pub fn resolve(&self, addr: u64) -> Option<(BusRange, Arc<dyn BusDevice>)> {
        let entries = self.entries.load();
        find(&entries, addr).map(|e| (e.range, Arc::clone(&e.device)))
    }

    /// All registered ranges, in address order.
    pub fn ranges(&self) -> Vec<BusRange> {
        self.entries.load().iter().map(|e| e.range).collect()
    }

    /// Number of registered ranges.
    pub fn len(&self) -> usize {
        self.entries.load().len()
    }

    /// Whether no range is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.load().is_empty()
    }

    fn dispatch<F>(&self, addr: u64, len: usize, f: F) -> Result<(), BusError>
    where
        F: FnOnce(&dyn BusDevice, u64, u64),
    {
        let entries = self.entries.load();
        let entry = find(&entries, addr).ok_or(BusError::NoDevice(addr))?;
        let offset = addr - entry.range.base;
        let fits = u64::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .is_some_and(|end| end <= entry.range.len);
        if !fits {
            return Err(BusError::CrossesRangeEnd {
                addr,
                len,
                base: entry.range.base,
                range_len: entry.range.len,
            });
        }
        f(entry.device.as_ref(), entry.range.base, offset);
        Ok(())
    }

    /// Reads `data.len()` bytes at `addr` from the device registered there.
    ///
    /// The access must lie entirely within one registered range.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let len = data.len();
        self.dispatch(addr, len, |d, base, off| d.read(base, off, data))
    }

    /// Writes `data` at `addr` to the device registered there.
    ///
    /// The access must lie entirely within one registered range.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        self.dispatch(addr, data.len(), |d, base, off| d.write(base, off, data))
    }
}

enum Op {
    Insert(BusRange, Arc<dyn BusDevice>),
    Remove(u64),
}

/// A batch of bus updates that takes effect all at once, or not at all.
///
/// Readers see either the bus before the transaction or after it, never a state in between.
#[must_use = "a transaction does nothing until committed"]
pub struct BusTransaction<'a> {
    bus: &'a Bus,
    ops: Vec<Op>,
}

impl BusTransaction<'_> {
    /// Queues the registration of `device` at `range`.
    pub fn insert(&mut self, range: BusRange, device: Arc<dyn BusDevice>) -> &mut Self {
        self.ops.push(Op::Insert(range, device));
        self
    }

    /// Queues the removal of the range that starts at `base`.
    pub fn remove(&mut self, base: u64) -> &mut Self {
        self.ops.push(Op::Remove(base));
        self
    }

    /// Applies the queued operations in order. On the first failing operation nothing is
    /// applied and its error is returned.
    pub fn commit(self) -> Result<(), BusError> {
        let _guard = self
            .bus
            .update
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = Vec::clone(&self.bus.entries.load());
        for op in self.ops {
            match op {
                Op::Insert(range, device) => insert_sorted(&mut next, range, device)?,
                Op::Remove(base) => {
                    remove_at(&mut next, base)?;
                }
            }
        }
        self.bus.entries.store(Arc::new(next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RecordingDevice;
    use proptest::prelude::*;

    fn dev() -> Arc<RecordingDevice> {
        Arc::new(RecordingDevice::default())
    }

    #[test]
    fn range_validation() {
        assert!(BusRange::new(0, 0).is_err());
        assert!(BusRange::new(u64::MAX, 2).is_err());
        let r = BusRange::new(u64::MAX, 1).unwrap();
        assert_eq!(r.last(), u64::MAX);
        assert!(r.contains(u64::MAX));
    }

    #[test]
    fn insert_rejects_overlaps_on_both_sides() {
        let bus = Bus::new();
        bus.insert(BusRange::new(0x100, 0x10).unwrap(), dev())
            .unwrap();
        for (b, l) in [
            (0xf8, 0x9),
            (0x10f, 1),
            (0x100, 0x10),
            (0x104, 2),
            (0, 0x1000),
        ] {
            assert!(
                matches!(
                    bus.insert(BusRange::new(b, l).unwrap(), dev()),
                    Err(BusError::Overlap { .. })
                ),
                "{b:#x}+{l:#x}"
            );
        }
        bus.insert(BusRange::new(0xf0, 0x10).unwrap(), dev())
            .unwrap();
        bus.insert(BusRange::new(0x110, 0x10).unwrap(), dev())
            .unwrap();
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn dispatch_passes_base_and_offset() {
        let bus = Bus::new();
        let d = dev();
        bus.insert(BusRange::new(0x1000, 0x100).unwrap(), d.clone())
            .unwrap();
        bus.write(0x1010, &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 2];
        bus.read(0x10fe, &mut buf).unwrap();
        let log = d.accesses();
        assert_eq!(log[0], (true, 0x1000, 0x10, vec![1, 2, 3, 4]));
        assert!(!log[1].0);
        assert_eq!((log[1].1, log[1].2), (0x1000, 0xfe));
    }

    #[test]
    fn access_errors() {
        let bus = Bus::new();
        bus.insert(BusRange::new(0x1000, 0x100).unwrap(), dev())
            .unwrap();
        assert_eq!(bus.write(0xfff, &[0]), Err(BusError::NoDevice(0xfff)));
        assert_eq!(bus.write(0x1100, &[0]), Err(BusError::NoDevice(0x1100)));
        assert!(matches!(
            bus.write(0x10ff, &[0, 0]),
            Err(BusError::CrossesRangeEnd { .. })
        ));
    }

    #[test]
    fn remove_and_transactions_are_atomic() {
        let bus = Bus::new();
        bus.insert(BusRange::new(0x10, 0x10).unwrap(), dev())
            .unwrap();
        assert!(matches!(
            bus.remove(0x11),
            Err(BusError::NotRegistered(0x11))
        ));
        let mut tx = bus.transaction();
        tx.insert(BusRange::new(0x40, 8).unwrap(), dev())
            .insert(BusRange::new(0x44, 8).unwrap(), dev());
        assert!(matches!(tx.commit(), Err(BusError::Overlap { .. })));
        assert_eq!(bus.len(), 1, "a failed transaction applies nothing");
        let mut tx = bus.transaction();
        tx.remove(0x10)
            .insert(BusRange::new(0x10, 0x20).unwrap(), dev());
        tx.commit().unwrap();
        assert_eq!(bus.ranges(), vec![BusRange::new(0x10, 0x20).unwrap()]);
        bus.remove(0x10).unwrap();
        assert!(bus.is_empty());
    }

    #[test]
    fn concurrent_readers_while_updating() {
        let bus = Arc::new(Bus::new());
        let stable = dev();
        bus.insert(BusRange::new(0x0, 0x10).unwrap(), stable.clone())
            .unwrap();
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        bus.write(0x4, &[7]).unwrap();
                    }
                })
            })
            .collect();
        for i in 0..200u64 {
            let base = 0x1000 + i * 0x10;
            bus.insert(BusRange::new(base, 0x10).unwrap(), dev())
                .unwrap();
            bus.remove(base).unwrap();
        }
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(stable.accesses().len(), 8 * 2000);
    }

    proptest! {
        /// The bus agrees with a naive model under arbitrary inserts and lookups.
        #[test]
        fn matches_model(ops in proptest::collection::vec((0u64..512, 1u64..64), 1..64),
                         probes in proptest::collection::vec(0u64..600, 1..64)) {
            let bus = Bus::new();
            let mut model: Vec<BusRange> = Vec::new();
            for (base, len) in ops {
                let r = BusRange::new(base, len).unwrap();
                let expect_ok = model.iter().all(|m| !m.overlaps(&r));
                prop_assert_eq!(bus.insert(r, dev()).is_ok(), expect_ok);
                if expect_ok { model.push(r); }
            }
            for p in probes {
                let expected = model.iter().find(|r| r.contains(p)).copied();
                prop_assert_eq!(bus.resolve(p).map(|(r, _)| r), expected);
            }
        }
    }
}
