// SPDX-License-Identifier: Apache-2.0 OR MIT
//! MSI-X: the vector table, the pending bit array, function and vector masking.
//!
//! Layout (PCI Local Bus 3.0 §6.8.2): the capability holds Message Control (table size - 1
//! in bits 10:0, Function Mask bit 14, MSI-X Enable bit 15), the table's BAR indicator and
//! offset, and the PBA's. Each table entry is 16 bytes: Message Address (low, high), Message
//! Data, Vector Control (bit 0: mask, set at reset). The PBA has one bit per vector.
//! Software may access the table and PBA with 4- or 8-byte naturally aligned accesses;
//! other accesses are ignored (writes) or read all ones.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use vmkit_device::{MsiMessage, MsiVectors};
use vmkit_migration::VersionedState;
use vmm_sys_util::eventfd::EventFd;

use crate::PciError;

/// Size of one MSI-X table entry.
pub(crate) const MSIX_ENTRY_SIZE: u64 = 16;
/// The most vectors an MSI-X capability can describe.
pub(crate) const MSIX_MAX_VECTORS: u16 = 2048;
const VECTOR_CTRL_MASK: u32 = 1;

/// Where an MSI-X capability puts its table and PBA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MsixConfig {
    /// Number of vectors (1..=2048).
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the pending bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixConfig {
    /// Size of the vector table in bytes.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    /// Size of the pending bit array in bytes (whole quadwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// One table entry as saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryState {
    /// Message address (both halves).
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for MsixEntryState {
    fn default() -> Self {
        Self {
            address: 0,
            data: 0,
            control: VECTOR_CTRL_MASK,
        }
    }
}

/// Saved MSI-X state: table, pending bits and the Message Control bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// One entry per vector.
    pub entries: Vec<MsixEntryState>,
    /// The pending bit array, 64 vectors per element.
    pub pba: Vec<u64>,
    /// MSI-X Enable.
    pub enabled: bool,
    /// Function Mask.
    pub function_masked: bool,
}

impl VersionedState for MsixState {
    const NAME: &'static str = "vmkit-pci/msix";
    const VERSION: u16 = 1;
}

/// What the interrupt backend was last told about a vector.
#[derive(Clone, Copy, Debug, Default)]
struct Backend {
    message: Option<MsiMessage>,
    unmasked: bool,
}

#[derive(Debug)]
struct Inner {
    entries: Vec<MsixEntryState>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    backend: Vec<Backend>,
}

impl Inner {
    fn masked(&self, v: usize) -> bool {
        !self.enabled
            || self.function_masked
            || self
                .entries
                .get(v)
                .is_none_or(|e| e.control & VECTOR_CTRL_MASK != 0)
    }

    fn pending(&self, v: usize) -> bool {
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1u64 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: usize, pending: bool) {
        if let Some(w) = self.pba.get_mut(v / 64) {
            if pending {
                *w |= 1u64 << (v % 64);
            } else {
                *w &= !(1u64 << (v % 64));
            }
        }
    }
}

/// An MSI-X capability's vector state, shared between the configuration space and the
/// device's worker threads.
///
/// Internally locked: every method takes `&self` and may be called from any thread.
pub struct Msix {
    config: MsixConfig,
    vectors: Arc<dyn MsiVectors>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("config", &self.config)
            .field("state", &*self.lock())
            .finish()
    }
}

fn ones(data: &mut [u8]) {
    data.fill(0xff);
}

fn access_ok(offset: u64, len: usize, limit: u64) -> bool {
    (len == 4 || len == 8)
        && offset % len as u64 == 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= limit)
}

impl Msix {
    /// A capability with `config.vectors` vectors delivered through `vectors` (vector `i`
    /// of the capability is vector `i` of the group). All vectors start masked, MSI-X
    /// disabled. Created through [`crate::PciConfigSpace::add_msix`].
    pub(crate) fn new(config: MsixConfig, vectors: Arc<dyn MsiVectors>) -> Result<Self, PciError> {
        if config.vectors == 0 || config.vectors > MSIX_MAX_VECTORS {
            return Err(PciError::InvalidInterruptConfig(format!(
                "MSI-X vector count {} not in 1..=2048",
                config.vectors
            )));
        }
        if vectors.len() < usize::from(config.vectors) {
            return Err(PciError::InvalidInterruptConfig(format!(
                "MSI-X needs {} vectors, the interrupt group has {}",
                config.vectors,
                vectors.len()
            )));
        }
        if config.table_offset % 8 != 0 || config.pba_offset % 8 != 0 {
            return Err(PciError::InvalidInterruptConfig(
                "MSI-X table and PBA offsets must be 8-byte aligned".into(),
            ));
        }
        if config.table_bar > 5 || config.pba_bar > 5 {
            return Err(PciError::InvalidInterruptConfig(
                "MSI-X BAR indicator above 5".into(),
            ));
        }
        if config.table_bar == config.pba_bar {
            let t = u64::from(config.table_offset)
                ..u64::from(config.table_offset) + config.table_size();
            let p = u64::from(config.pba_offset)..u64::from(config.pba_offset) + config.pba_size();
            if t.start < p.end && p.start < t.end {
                return Err(PciError::InvalidInterruptConfig(
                    "MSI-X table and PBA overlap".into(),
                ));
            }
        }
        let n = usize::from(config.vectors);
        Ok(Self {
            config,
            vectors,
            inner: Mutex::new(Inner {
                entries: vec![MsixEntryState::default(); n],
                pba: vec![0; n.div_ceil(64)],
                enabled: false,
                function_masked: false,
                backend: vec![Backend::default(); n],
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The layout this capability was created with.
    pub fn config(&self) -> MsixConfig {
        self.config
    }

    /// Number of vectors.
    pub fn vector_count(&self) -> u16 {
        self.config.vectors
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.lock().function_masked
    }

    /// Whether `vector` is currently masked (by its vector control, the function mask, or
    /// because MSI-X is disabled). Out-of-range vectors count as masked.
    pub fn vector_masked(&self, vector: u16) -> bool {
        self.lock().masked(usize::from(vector))
    }

    /// Whether `vector`'s pending bit is set.
    pub fn pending(&self, vector: u16) -> bool {
        self.lock().pending(usize::from(vector))
    }

    /// Brings the interrupt backend in line with the guest-visible state of vector `v`
    /// and delivers its pending interrupt if it became unmasked.
    fn sync(&self, inner: &mut Inner, v: usize) {
        let masked = inner.masked(v);
        let Some(entry) = inner.entries.get(v).copied() else {
            return;
        };
        let Some(backend) = inner.backend.get(v).copied() else {
            return;
        };
        if masked {
            if backend.unmasked {
                match self.vectors.set_masked(v, true) {
                    Ok(()) => {
                        if let Some(b) = inner.backend.get_mut(v) {
                            b.unmasked = false;
                        }
                    }
                    Err(e) => log::warn!("MSI-X vector {v}: cannot mask: {e}"),
                }
            }
            return;
        }
        let message = MsiMessage {
            address: entry.address,
            data: entry.data,
        };
        if backend.message != Some(message) {
            match self.vectors.configure(v, message) {
                Ok(()) => {
                    if let Some(b) = inner.backend.get_mut(v) {
                        b.message = Some(message);
                    }
                }
                Err(e) => {
                    log::warn!("MSI-X vector {v}: cannot route {message:?}: {e}");
                    return;
                }
            }
        }
        if !backend.unmasked {
            match self.vectors.set_masked(v, false) {
                Ok(()) => {
                    if let Some(b) = inner.backend.get_mut(v) {
                        b.unmasked = true;
                    }
                }
                Err(e) => {
                    log::warn!("MSI-X vector {v}: cannot unmask: {e}");
                    return;
                }
            }
        }
        if inner.pending(v) {
            inner.set_pending(v, false);
            if let Err(e) = self.vectors.trigger(v) {
                log::warn!("MSI-X vector {v}: cannot deliver pending interrupt: {e}");
            }
        }
    }

    fn sync_all(&self, inner: &mut Inner) {
        for v in 0..inner.entries.len() {
            self.sync(inner, v);
        }
    }

    /// Applies the guest-writable Message Control bits (called by the configuration space
    /// on writes to the capability).
    pub(crate) fn set_control(&self, enabled: bool, function_masked: bool) {
        let mut inner = self.lock();
        if inner.enabled == enabled && inner.function_masked == function_masked {
            return;
        }
        inner.enabled = enabled;
        inner.function_masked = function_masked;
        self.sync_all(&mut inner);
    }

    /// Raises `vector`: delivers it, or sets its pending bit when it is masked.
    pub fn trigger(&self, vector: u16) -> Result<(), PciError> {
        let v = usize::from(vector);
        let mut inner = self.lock();
        if v >= inner.entries.len() {
            return Err(PciError::InvalidVector {
                vector,
                count: self.config.vectors,
            });
        }
        if inner.masked(v) {
            inner.set_pending(v, true);
            return Ok(());
        }
        self.vectors.trigger(v)?;
        Ok(())
    }

    /// The eventfd that delivers `vector` when written (an irqfd), for worker threads that
    /// signal without taking this capability's lock.
    ///
    /// `None` when the backend has no such eventfd, or when the vector is masked right now
    /// (use [`Msix::trigger`] then, which records the pending bit). A vector masked after
    /// this call returned is handled by the backend: a write to a masked vector's irqfd is
    /// held back and delivered on unmask (see `vmkit_irq::KvmMsiVectors`), but it does not
    /// show in the PBA.
    pub fn notifier(&self, vector: u16) -> Option<&EventFd> {
        let inner = self.lock();
        let v = usize::from(vector);
        if inner.masked(v) || !inner.backend.get(v).is_some_and(|b| b.unmasked) {
            return None;
        }
        drop(inner);
        self.vectors.notifier(v)
    }

    /// Reads the vector table at `offset` (from the table's start). Only 4- and 8-byte
    /// naturally aligned accesses inside the table are served; others read all ones.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        if !access_ok(offset, data.len(), self.config.table_size()) {
            ones(data);
            return;
        }
        let inner = self.lock();
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let off = offset + 4 * i as u64;
            let Some(e) = inner.entries.get((off / MSIX_ENTRY_SIZE) as usize) else {
                ones(chunk);
                continue;
            };
            let v = match off % MSIX_ENTRY_SIZE {
                0 => e.address as u32,
                4 => (e.address >> 32) as u32,
                8 => e.data,
                _ => e.control,
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Writes the vector table at `offset`. Only 4- and 8-byte naturally aligned accesses
    /// inside the table take effect; in Vector Control only the mask bit is writable.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        if !access_ok(offset, data.len(), self.config.table_size()) {
            log::debug!(
                "MSI-X table: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        }
        let mut inner = self.lock();
        let v = (offset / MSIX_ENTRY_SIZE) as usize;
        for (i, chunk) in data.chunks(4).enumerate() {
            let off = offset + 4 * i as u64;
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            let val = u32::from_le_bytes(b);
            let Some(e) = inner.entries.get_mut(v) else {
                return;
            };
            match off % MSIX_ENTRY_SIZE {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(val),
                4 => e.address = (e.address & 0xffff_ffff) | (u64::from(val) << 32),
                8 => e.data = val,
                _ => e.control = (e.control & !VECTOR_CTRL_MASK) | (val & VECTOR_CTRL_MASK),
            }
        }
        self.sync(&mut inner, v);
    }

    /// Reads the pending bit array at `offset` (4- or 8-byte aligned accesses; others read
    /// all ones).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        if !access_ok(offset, data.len(), self.config.pba_size()) {
            ones(data);
            return;
        }
        let inner = self.lock();
        let word = inner.pba.get((offset / 8) as usize).copied().unwrap_or(0);
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// Writes to the PBA are ignored (it is read-only).
    pub fn pba_write(&self, offset: u64, data: &[u8]) {
        log::debug!(
            "MSI-X PBA: ignored {}-byte write at {offset:#x}",
            data.len()
        );
    }

    /// Serves a BAR read if it falls in the table or PBA; returns whether it did.
    ///
    /// A convenience for device models: call it first from `PciDevice::bar_read`.
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        if let Some(off) = self.table_offset_in(bar, offset) {
            self.table_read(off, data);
            true
        } else if let Some(off) = self.pba_offset_in(bar, offset) {
            self.pba_read(off, data);
            true
        } else {
            false
        }
    }

    /// Serves a BAR write if it falls in the table or PBA; returns whether it did.
    pub fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> bool {
        if let Some(off) = self.table_offset_in(bar, offset) {
            self.table_write(off, data);
            true
        } else if let Some(off) = self.pba_offset_in(bar, offset) {
            self.pba_write(off, data);
            true
        } else {
            false
        }
    }

    fn table_offset_in(&self, bar: u8, offset: u64) -> Option<u64> {
        let c = &self.config;
        let rel = offset.checked_sub(u64::from(c.table_offset))?;
        (bar == c.table_bar && rel < c.table_size()).then_some(rel)
    }

    fn pba_offset_in(&self, bar: u8, offset: u64) -> Option<u64> {
        let c = &self.config;
        let rel = offset.checked_sub(u64::from(c.pba_offset))?;
        (bar == c.pba_bar && rel < c.pba_size()).then_some(rel)
    }

    /// Saves the table, the pending bits and the control bits.
    pub fn save(&self) -> MsixState {
        let inner = self.lock();
        MsixState {
            entries: inner.entries.clone(),
            pba: inner.pba.clone(),
            enabled: inner.enabled,
            function_masked: inner.function_masked,
        }
    }

    /// Loads a saved state and reprograms the interrupt backend to match it (routes and
    /// masks; pending bits of unmasked vectors are delivered). Called by
    /// [`crate::PciConfigSpace::restore_state`], which keeps Message Control consistent.
    pub(crate) fn restore(&self, state: &MsixState) -> Result<(), PciError> {
        let n = usize::from(self.config.vectors);
        if state.entries.len() != n || state.pba.len() != n.div_ceil(64) {
            return Err(PciError::InvalidState(format!(
                "MSI-X state has {} entries / {} PBA words, the capability has {} vectors",
                state.entries.len(),
                state.pba.len(),
                n
            )));
        }
        let mut inner = self.lock();
        inner.entries = state.entries.clone();
        for e in &mut inner.entries {
            e.control &= VECTOR_CTRL_MASK;
        }
        inner.pba = state.pba.clone();
        // Bits beyond the last vector are reserved (zero).
        if n % 64 != 0 {
            if let Some(last) = inner.pba.last_mut() {
                *last &= (1u64 << (n % 64)) - 1;
            }
        }
        inner.enabled = state.enabled;
        inner.function_masked = state.function_masked;
        self.sync_all(&mut inner);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmkit_device::testing::RecordingMsi;

    fn setup(n: u16) -> (Arc<RecordingMsi>, Msix) {
        let g = Arc::new(RecordingMsi::new(usize::from(n)));
        let m = Msix::new(
            MsixConfig {
                vectors: n,
                table_bar: 1,
                table_offset: 0,
                pba_bar: 1,
                pba_offset: 0x800,
            },
            g.clone(),
        )
        .unwrap();
        (g, m)
    }

    fn program(m: &Msix, v: u64, addr: u64, data: u32, masked: bool) {
        m.table_write(v * 16, &addr.to_le_bytes());
        m.table_write(v * 16 + 8, &data.to_le_bytes());
        m.table_write(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn rejects_bad_configs() {
        let g: Arc<dyn MsiVectors> = Arc::new(RecordingMsi::new(4));
        let base = MsixConfig {
            vectors: 4,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x40,
        };
        assert!(Msix::new(base, g.clone()).is_ok());
        for bad in [
            MsixConfig { vectors: 0, ..base },
            MsixConfig { vectors: 5, ..base },
            MsixConfig {
                table_offset: 4,
                ..base
            },
            MsixConfig {
                pba_offset: 0x38,
                ..base
            },
            MsixConfig { pba_bar: 6, ..base },
        ] {
            assert!(Msix::new(bad, g.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn table_reads_back_and_resets_masked() {
        let (_, m) = setup(3);
        let mut b = [0u8; 4];
        m.table_read(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1, "vector control resets masked");
        m.table_write(16, &0x1122_3344_fee0_0000u64.to_le_bytes());
        m.table_write(28, &0xffff_fffeu32.to_le_bytes());
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1122_3344_fee0_0000);
        m.table_read(28, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0, "reserved control bits read zero");
    }

    #[test]
    fn bad_sizes_and_alignment_are_ignored() {
        let (_, m) = setup(2);
        for (off, len) in [
            (0u64, 1usize),
            (0, 2),
            (2, 4),
            (4, 8),
            (32, 4),
            (u64::MAX - 3, 4),
        ] {
            let mut d = vec![0u8; len];
            m.table_read(off, &mut d);
            assert!(d.iter().all(|&x| x == 0xff), "{off:#x}+{len}");
            m.table_write(off, &vec![0u8; len]);
        }
        let mut b = [0u8; 4];
        m.table_read(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1, "no stray write reached vector 0");
        let mut d = [0u8; 2];
        m.pba_read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }

    #[test]
    fn masked_triggers_pend_and_deliver_on_unmask() {
        let (g, m) = setup(2);
        m.set_control(true, false);
        program(&m, 0, 0xfee0_0000, 0x31, true);
        m.trigger(0).unwrap();
        assert_eq!(g.delivered(0), 0);
        assert!(m.pending(0));
        let mut q = [0u8; 8];
        m.pba_read(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1);
        m.table_write(12, &0u32.to_le_bytes());
        assert_eq!(g.delivered(0), 1, "pending vector delivered on unmask");
        assert!(!m.pending(0));
        assert_eq!(
            g.message(0),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x31
            })
        );
        m.trigger(0).unwrap();
        assert_eq!(g.delivered(0), 2);
        assert!(m.trigger(2).is_err());
    }

    #[test]
    fn function_mask_and_enable_gate_all_vectors() {
        let (g, m) = setup(2);
        program(&m, 0, 0xfee0_0000, 0x40, false);
        program(&m, 1, 0xfee0_0000, 0x41, false);
        m.trigger(1).unwrap();
        assert_eq!(g.delivered(1), 0, "MSI-X disabled");
        m.set_control(true, true);
        assert_eq!(g.delivered(1), 0, "function masked");
        assert!(m.notifier(0).is_none());
        m.trigger(0).unwrap();
        assert_eq!(m.save().pba, vec![0b11]);
        m.set_control(true, false);
        assert_eq!((g.delivered(0), g.delivered(1)), (1, 1));
        assert_eq!(g.masked(0), Some(false));
        m.set_control(false, false);
        assert_eq!(
            g.masked(0),
            Some(true),
            "disabling masks the backend vector"
        );
        assert!(!m.enabled());
    }

    #[test]
    fn save_restore_round_trip_reprograms_backend() {
        let (_, m) = setup(70);
        m.set_control(true, false);
        program(&m, 65, 0xfee0_1000, 0x55, false);
        program(&m, 3, 0xfee0_2000, 0x56, true);
        m.trigger(3).unwrap();
        let s = m.save();
        let bytes = vmkit_migration::encode(&s).unwrap();
        let back: MsixState = vmkit_migration::decode(&bytes).unwrap();
        assert_eq!(back, s);
        let (g2, m2) = setup(70);
        m2.restore(&back).unwrap();
        assert_eq!(m2.save(), s);
        assert_eq!(g2.masked(65), Some(false));
        assert_eq!(g2.message(65).map(|x| x.data), Some(0x55));
        assert!(m2.pending(3));
        let (_, small) = setup(2);
        assert!(small.restore(&s).is_err());
    }

    /// A backend with one eventfd per vector, like the KVM one.
    struct WithFds {
        inner: RecordingMsi,
        fds: Vec<EventFd>,
    }

    impl MsiVectors for WithFds {
        fn len(&self) -> usize {
            self.inner.len()
        }
        fn configure(&self, i: usize, m: MsiMessage) -> Result<(), vmkit_device::InterruptError> {
            self.inner.configure(i, m)
        }
        fn set_masked(&self, i: usize, masked: bool) -> Result<(), vmkit_device::InterruptError> {
            self.inner.set_masked(i, masked)
        }
        fn trigger(&self, i: usize) -> Result<(), vmkit_device::InterruptError> {
            self.inner.trigger(i)
        }
        fn notifier(&self, i: usize) -> Option<&EventFd> {
            self.fds.get(i)
        }
    }

    #[test]
    fn notifier_only_while_deliverable() {
        let g = Arc::new(WithFds {
            inner: RecordingMsi::new(2),
            fds: (0..2)
                .map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap())
                .collect(),
        });
        let m = Msix::new(
            MsixConfig {
                vectors: 2,
                table_bar: 0,
                table_offset: 0,
                pba_bar: 0,
                pba_offset: 0x100,
            },
            g.clone(),
        )
        .unwrap();
        assert!(m.notifier(0).is_none(), "disabled");
        m.set_control(true, false);
        assert!(m.notifier(0).is_none(), "vector masked");
        program(&m, 0, 0xfee0_0000, 0x20, false);
        let fd = m.notifier(0).unwrap();
        assert!(std::ptr::eq(fd, &g.fds[0]));
        assert!(m.notifier(1).is_none());
        assert!(m.notifier(7).is_none());
        m.set_control(true, true);
        assert!(m.notifier(0).is_none(), "function masked");
    }
}
