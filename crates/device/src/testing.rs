// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Recording implementations of the device traits, for unit tests of device models.
//!
//! These are test doubles that really record what happens, so device tests can assert on
//! the interrupts and accesses a device produced, without KVM.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::interrupt::{
    InterruptError, InterruptLine, InterruptManager, MsiMessage, MsiVectors, TriggerMode,
};
use crate::BusDevice;

/// One recorded bus access: `(is_write, base, offset, bytes)`; for reads, `bytes` is what
/// the device returned.
pub type Access = (bool, u64, u64, Vec<u8>);

/// A [`BusDevice`] that records every access and reads back `offset as u8` per byte.
#[derive(Default)]
pub struct RecordingDevice {
    log: Mutex<Vec<Access>>,
}

impl RecordingDevice {
    /// The accesses so far, oldest first.
    pub fn accesses(&self) -> Vec<Access> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl BusDevice for RecordingDevice {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.wrapping_add(i as u64) as u8;
        }
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((false, base, offset, data.to_vec()));
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((true, base, offset, data.to_vec()));
    }
}

/// An [`InterruptLine`] that counts triggers and remembers its level.
#[derive(Debug)]
pub struct CountingLine {
    mode: TriggerMode,
    count: AtomicU64,
    level: AtomicBool,
}

impl CountingLine {
    /// A new line of the given mode.
    pub fn new(mode: TriggerMode) -> Self {
        Self {
            mode,
            count: AtomicU64::new(0),
            level: AtomicBool::new(false),
        }
    }

    /// Number of `trigger` calls (and rising edges of `set_level`).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Current level (level-triggered lines).
    pub fn level(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }
}

impl InterruptLine for CountingLine {
    fn trigger_mode(&self) -> TriggerMode {
        self.mode
    }

    fn trigger(&self) -> Result<(), InterruptError> {
        self.count.fetch_add(1, Ordering::SeqCst);
        if self.mode == TriggerMode::Level {
            self.level.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn set_level(&self, asserted: bool) -> Result<(), InterruptError> {
        if self.mode == TriggerMode::Edge {
            return Err(InterruptError::Unsupported(
                "set_level on an edge-triggered line",
            ));
        }
        if asserted && !self.level.swap(true, Ordering::SeqCst) {
            self.count.fetch_add(1, Ordering::SeqCst);
        } else if !asserted {
            self.level.store(false, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct VectorState {
    message: Option<MsiMessage>,
    masked: bool,
    delivered: u64,
}

/// An [`MsiVectors`] group that records configuration and counts deliveries.
///
/// Like a real implementation, it refuses to deliver a masked or unconfigured vector
/// (the trigger is counted in [`RecordingMsi::dropped`] instead).
#[derive(Debug)]
pub struct RecordingMsi {
    vectors: Mutex<Vec<VectorState>>,
    dropped: AtomicU64,
}

impl RecordingMsi {
    /// A group of `count` vectors, all masked and unconfigured.
    pub fn new(count: usize) -> Self {
        Self {
            vectors: Mutex::new(vec![
                VectorState {
                    masked: true,
                    ..Default::default()
                };
                count
            ]),
            dropped: AtomicU64::new(0),
        }
    }

    /// Deliveries of vector `index` so far.
    pub fn delivered(&self, index: usize) -> u64 {
        self.lock().get(index).map_or(0, |v| v.delivered)
    }

    /// Triggers that were not delivered because the vector was masked or unconfigured.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// The message programmed for vector `index`.
    pub fn message(&self, index: usize) -> Option<MsiMessage> {
        self.lock().get(index).and_then(|v| v.message)
    }

    /// Whether vector `index` is masked (`None` when out of range).
    pub fn masked(&self, index: usize) -> Option<bool> {
        self.lock().get(index).map(|v| v.masked)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<VectorState>> {
        self.vectors.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with<R>(
        &self,
        index: usize,
        f: impl FnOnce(&mut VectorState) -> R,
    ) -> Result<R, InterruptError> {
        let mut v = self.lock();
        let len = v.len();
        v.get_mut(index)
            .map(f)
            .ok_or(InterruptError::InvalidVector { index, len })
    }
}

impl MsiVectors for RecordingMsi {
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn configure(&self, index: usize, message: MsiMessage) -> Result<(), InterruptError> {
        self.with(index, |v| v.message = Some(message))
    }

    fn set_masked(&self, index: usize, masked: bool) -> Result<(), InterruptError> {
        self.with(index, |v| v.masked = masked)
    }

    fn trigger(&self, index: usize) -> Result<(), InterruptError> {
        let delivered = self.with(index, |v| {
            if v.masked || v.message.is_none() {
                false
            } else {
                v.delivered += 1;
                true
            }
        })?;
        if !delivered {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// An [`InterruptManager`] handing out [`CountingLine`]s and [`RecordingMsi`] groups, keeping
/// a handle to each for inspection.
#[derive(Default)]
pub struct RecordingInterruptManager {
    lines: Mutex<Vec<(u32, Arc<CountingLine>)>>,
    groups: Mutex<Vec<Arc<RecordingMsi>>>,
}

impl RecordingInterruptManager {
    /// The line handed out for `gsi`, if any.
    pub fn line(&self, gsi: u32) -> Option<Arc<CountingLine>> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(g, _)| *g == gsi)
            .map(|(_, l)| Arc::clone(l))
    }

    /// The MSI groups handed out so far, in order.
    pub fn msi_groups(&self) -> Vec<Arc<RecordingMsi>> {
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl InterruptManager for RecordingInterruptManager {
    fn legacy_line(
        &self,
        gsi: u32,
        mode: TriggerMode,
    ) -> Result<Arc<dyn InterruptLine>, InterruptError> {
        let line = Arc::new(CountingLine::new(mode));
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((gsi, Arc::clone(&line)));
        Ok(line)
    }

    fn msi_vectors(&self, count: usize) -> Result<Arc<dyn MsiVectors>, InterruptError> {
        let group = Arc::new(RecordingMsi::new(count));
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&group));
        Ok(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_msi_drops_masked_and_unconfigured() {
        let g = RecordingMsi::new(2);
        g.trigger(0).unwrap();
        assert_eq!((g.delivered(0), g.dropped()), (0, 1));
        g.configure(
            0,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x30,
            },
        )
        .unwrap();
        g.trigger(0).unwrap();
        assert_eq!(g.dropped(), 2, "still masked");
        g.set_masked(0, false).unwrap();
        g.trigger(0).unwrap();
        assert_eq!(g.delivered(0), 1);
        assert!(matches!(
            g.trigger(2),
            Err(InterruptError::InvalidVector { index: 2, len: 2 })
        ));
    }

    #[test]
    fn counting_line_levels() {
        let l = CountingLine::new(TriggerMode::Level);
        l.set_level(true).unwrap();
        l.set_level(true).unwrap();
        assert_eq!(l.count(), 1);
        l.set_level(false).unwrap();
        assert!(!l.level());
        let e = CountingLine::new(TriggerMode::Edge);
        assert!(e.set_level(true).is_err());
        e.trigger().unwrap();
        assert_eq!(e.count(), 1);
    }
}

/// An [`IoEventSpace`](crate::ioevent::IoEventSpace) that records registrations and lets a
/// test fire them as the kernel would on a matching guest write.
#[derive(Default)]
pub struct RecordingIoEvents {
    entries: Mutex<Vec<RecordedIoEvent>>,
}

struct RecordedIoEvent {
    address: crate::ioevent::IoEventAddress,
    filter: crate::ioevent::IoEventMatch,
    event: vmm_sys_util::eventfd::EventFd,
}

impl RecordingIoEvents {
    /// The registrations currently in place.
    pub fn registered(
        &self,
    ) -> Vec<(crate::ioevent::IoEventAddress, crate::ioevent::IoEventMatch)> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|e| (e.address, e.filter))
            .collect()
    }

    /// Simulates a guest write of `data` to `address`: signals every matching registration
    /// and returns how many were signalled (0 means the write would reach the bus instead).
    pub fn guest_write(&self, address: crate::ioevent::IoEventAddress, data: &[u8]) -> usize {
        use crate::ioevent::IoEventMatch;
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut fired = 0;
        for e in entries.iter().filter(|e| e.address == address) {
            let matches = match e.filter {
                IoEventMatch::Any => true,
                IoEventMatch::U16(v) => data == v.to_le_bytes(),
                IoEventMatch::U32(v) => data == v.to_le_bytes(),
            };
            if matches && e.event.write(1).is_ok() {
                fired += 1;
            }
        }
        fired
    }
}

impl crate::ioevent::IoEventSpace for RecordingIoEvents {
    fn register(
        &self,
        address: crate::ioevent::IoEventAddress,
        filter: crate::ioevent::IoEventMatch,
        event: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), crate::ioevent::IoEventError> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries
            .iter()
            .any(|e| e.address == address && e.filter == filter)
        {
            return Err(crate::ioevent::IoEventError::Exists(address));
        }
        let event = event
            .try_clone()
            .map_err(|source| crate::ioevent::IoEventError::Io { address, source })?;
        entries.push(RecordedIoEvent {
            address,
            filter,
            event,
        });
        Ok(())
    }

    fn unregister(
        &self,
        address: crate::ioevent::IoEventAddress,
        filter: crate::ioevent::IoEventMatch,
        _event: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), crate::ioevent::IoEventError> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let before = entries.len();
        entries.retain(|e| !(e.address == address && e.filter == filter));
        if entries.len() == before {
            return Err(crate::ioevent::IoEventError::NotFound(address));
        }
        Ok(())
    }
}
