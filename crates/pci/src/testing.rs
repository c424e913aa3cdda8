// SPDX-License-Identifier: Apache-2.0 OR MIT
//! A small but real PCI function for tests and fuzzing of the root complex.
//!
//! [`TestDevice`] has a 64-bit memory BAR 0 (16 KiB: scratch registers at 0..0x1000,
//! the MSI-X table at 0x2000 and PBA at 0x3000), a 32-byte I/O BAR 2 (scratch), and an
//! MSI-X capability with four vectors. It records every [`PciDevice::bar_moved`] call.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmkit_device::MsiVectors;

use crate::{
    BarChange, Msix, MsixConfig, PciBarInfo, PciBarKind, PciBarRegion, PciConfigSpace, PciDevice,
    PciError, PciHeader,
};

/// Offset of the MSI-X table in BAR 0 of [`TestDevice`].
pub const TEST_MSIX_TABLE: u32 = 0x2000;
/// Offset of the MSI-X PBA in BAR 0 of [`TestDevice`].
pub const TEST_MSIX_PBA: u32 = 0x3000;

/// A PCI function with a memory BAR, an I/O BAR and MSI-X (see the module docs).
pub struct TestDevice {
    config: Mutex<PciConfigSpace>,
    msix: Arc<Msix>,
    scratch: Mutex<Vec<u8>>,
    moves: Mutex<Vec<BarChange>>,
}

impl std::fmt::Debug for TestDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDevice").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TestDevice {
    /// A device whose four MSI-X vectors are delivered through `vectors`.
    pub fn new(vectors: Arc<dyn MsiVectors>) -> Result<Self, PciError> {
        let mut config = PciConfigSpace::new(PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            revision: 1,
            class_code: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0x1234,
            subsystem_id: 1,
        });
        config.add_bar(0, PciBarKind::Memory64, 0x4000, false)?;
        config.add_bar(2, PciBarKind::Io, 0x20, false)?;
        let msix = config.add_msix(
            MsixConfig {
                vectors: 4,
                table_bar: 0,
                table_offset: TEST_MSIX_TABLE,
                pba_bar: 0,
                pba_offset: TEST_MSIX_PBA,
            },
            vectors,
        )?;
        Ok(Self {
            config: Mutex::new(config),
            msix,
            scratch: Mutex::new(vec![0; 0x1000 + 0x20]),
            moves: Mutex::new(Vec::new()),
        })
    }

    /// The MSI-X capability.
    pub fn msix(&self) -> &Arc<Msix> {
        &self.msix
    }

    /// Saves the configuration space (MSI-X included).
    pub fn save(&self) -> crate::PciConfigState {
        lock(&self.config).save()
    }

    /// Restores a state saved by [`TestDevice::save`] into this (fresh) device.
    pub fn restore(&self, state: &crate::PciConfigState) -> Result<(), PciError> {
        lock(&self.config).restore_state(state)
    }

    /// The `bar_moved` calls so far.
    pub fn moves(&self) -> Vec<BarChange> {
        lock(&self.moves).clone()
    }

    fn scratch_range(bar: u8, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let (base, size) = match bar {
            0 => (0usize, 0x1000u64),
            2 => (0x1000, 0x20),
            _ => return None,
        };
        let end = offset.checked_add(len as u64)?;
        (end <= size).then(|| base + offset as usize..base + end as usize)
    }
}

impl PciDevice for TestDevice {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        lock(&self.config).read(offset, data);
    }

    fn config_write(&self, offset: u16, data: &[u8]) -> Vec<BarChange> {
        lock(&self.config).write(offset, data)
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if self.msix.bar_read(bar, offset, data) {
            return;
        }
        match Self::scratch_range(bar, offset, data.len()) {
            Some(r) => data.copy_from_slice(&lock(&self.scratch)[r]),
            None => data.fill(0xff),
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if self.msix.bar_write(bar, offset, data) {
            return;
        }
        if let Some(r) = Self::scratch_range(bar, offset, data.len()) {
            lock(&self.scratch)[r].copy_from_slice(data);
        }
    }

    fn bars(&self) -> Vec<PciBarRegion> {
        lock(&self.config).bars()
    }

    fn bar_moved(&self, change: &BarChange) {
        lock(&self.moves).push(*change);
    }

    fn bar_info(&self) -> Vec<PciBarInfo> {
        lock(&self.config).bar_info()
    }

    fn set_bar_address(&self, index: u8, addr: u64) -> Result<(), PciError> {
        lock(&self.config).set_bar_address(index, addr)
    }
}
