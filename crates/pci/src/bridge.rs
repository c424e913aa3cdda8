// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The host bridge (00:00.0) and PCI-to-PCI bridges (type 1 headers).

use std::sync::{Mutex, MutexGuard, PoisonError};

use vmkit_migration::{MigrationError, Snapshot};

use crate::{
    BarChange, PciBarKind, PciBarRegion, PciConfigSpace, PciConfigState, PciDevice, PciHeader,
};

/// Vendor ID used by the bridges (Red Hat, Inc., the ID QEMU's generic bridges carry;
/// guests drive them by class code, without a specific driver).
pub const BRIDGE_VENDOR_ID: u16 = 0x1b36;
/// Device ID of the host bridge (as QEMU's generic PCIe host bridge).
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
/// Device ID of the PCI-to-PCI bridge (as QEMU's `pci-bridge`).
pub const PCI_BRIDGE_DEVICE_ID: u16 = 0x0001;

fn lock(m: &Mutex<PciConfigSpace>) -> MutexGuard<'_, PciConfigSpace> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_migration(e: crate::PciError) -> MigrationError {
    MigrationError::InvalidState {
        name: <PciConfigState as vmkit_migration::VersionedState>::NAME,
        reason: e.to_string(),
    }
}

/// The snapshot, restore and [`PciDevice`] implementations of a function that is only a
/// configuration space (no BARs): the host bridge and PCI-to-PCI bridges. The type has a
/// `config: Mutex<PciConfigSpace>` field and a `from_state` constructor.
macro_rules! config_space_only_function {
    ($t:ty) => {
        impl Snapshot for $t {
            type State = PciConfigState;
            fn save(&self) -> Result<PciConfigState, MigrationError> {
                Ok(lock(&self.config).save())
            }
        }

        impl vmkit_migration::Restore for $t {
            type Args = ();
            fn restore(_args: (), state: &PciConfigState) -> Result<Self, MigrationError> {
                Self::from_state(state).map_err(to_migration)
            }
        }

        impl PciDevice for $t {
            fn config_read(&self, offset: u16, data: &mut [u8]) {
                lock(&self.config).read(offset, data);
            }

            fn config_write(&self, offset: u16, data: &[u8]) -> Vec<BarChange> {
                lock(&self.config).write(offset, data)
            }

            fn bar_read(&self, _bar: u8, _offset: u64, data: &mut [u8]) {
                data.fill(0xff);
            }

            fn bar_write(&self, _bar: u8, _offset: u64, _data: &[u8]) {}

            fn bars(&self) -> Vec<PciBarRegion> {
                Vec::new()
            }
        }
    };
}

/// The host bridge at 00:00.0: a type 0 function of class 06/00 with no BARs.
#[derive(Debug)]
pub struct PciHostBridge {
    config: Mutex<PciConfigSpace>,
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHostBridge {
    /// A host bridge in its reset state.
    pub fn new() -> Self {
        Self {
            config: Mutex::new(PciConfigSpace::new(PciHeader {
                vendor_id: BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                revision: 0,
                class_code: 0x06,
                subclass: 0x00,
                prog_if: 0,
                subsystem_vendor_id: BRIDGE_VENDOR_ID,
                subsystem_id: 0x1100,
            })),
        }
    }

    /// A host bridge with a saved configuration state.
    pub fn from_state(state: &PciConfigState) -> Result<Self, crate::PciError> {
        let b = Self::new();
        lock(&b.config).restore_state(state)?;
        Ok(b)
    }
}

config_space_only_function!(PciHostBridge);

/// A PCI-to-PCI bridge (type 1 header, class 06/04, no BARs).
///
/// The root complex forwards configuration cycles for bus numbers in
/// `secondary..=subordinate` through it, and maps a BAR behind it only while the bridge
/// forwards that range (memory or I/O enable set and the range inside one of its windows),
/// as hardware does. The guest may reprogram bus numbers and windows at any time.
#[derive(Debug)]
pub struct PciBridge {
    config: Mutex<PciConfigSpace>,
}

impl Default for PciBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBridge {
    /// A bridge in its reset state (bus numbers 0, windows closed, forwarding disabled).
    pub fn new() -> Self {
        Self {
            config: Mutex::new(PciConfigSpace::new_bridge(PciHeader {
                vendor_id: BRIDGE_VENDOR_ID,
                device_id: PCI_BRIDGE_DEVICE_ID,
                revision: 0,
                class_code: 0x06,
                subclass: 0x04,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            })),
        }
    }

    /// A bridge with a saved configuration state.
    pub fn from_state(state: &PciConfigState) -> Result<Self, crate::PciError> {
        let b = Self::new();
        lock(&b.config).restore_state(state)?;
        Ok(b)
    }

    fn byte(&self, off: u16) -> u8 {
        let mut b = [0u8; 1];
        lock(&self.config).read(off, &mut b);
        b[0]
    }

    fn word(&self, off: u16) -> u16 {
        let mut b = [0u8; 2];
        lock(&self.config).read(off, &mut b);
        u16::from_le_bytes(b)
    }

    fn dword(&self, off: u16) -> u32 {
        let mut b = [0u8; 4];
        lock(&self.config).read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Primary bus number.
    pub fn primary_bus(&self) -> u8 {
        self.byte(0x18)
    }

    /// Secondary bus number (the bus directly behind the bridge).
    pub fn secondary_bus(&self) -> u8 {
        self.byte(0x19)
    }

    /// Subordinate bus number (the highest bus behind the bridge).
    pub fn subordinate_bus(&self) -> u8 {
        self.byte(0x1a)
    }

    /// The memory window `[base, limit]` (1 MiB granularity), `None` when closed.
    pub fn memory_window(&self) -> Option<(u64, u64)> {
        let base = u64::from(self.word(0x20) & 0xfff0) << 16;
        let limit = (u64::from(self.word(0x22) & 0xfff0) << 16) | 0xf_ffff;
        (base <= limit).then_some((base, limit))
    }

    /// The prefetchable memory window `[base, limit]` (64-bit), `None` when closed.
    pub fn prefetchable_window(&self) -> Option<(u64, u64)> {
        let base =
            (u64::from(self.word(0x24) & 0xfff0) << 16) | (u64::from(self.dword(0x28)) << 32);
        let limit = (u64::from(self.word(0x26) & 0xfff0) << 16)
            | 0xf_ffff
            | (u64::from(self.dword(0x2c)) << 32);
        (base <= limit).then_some((base, limit))
    }

    /// The I/O window `[base, limit]` (4 KiB granularity, 16-bit), `None` when closed.
    pub fn io_window(&self) -> Option<(u64, u64)> {
        let base = u64::from(self.byte(0x1c) & 0xf0) << 8;
        let limit = (u64::from(self.byte(0x1d) & 0xf0) << 8) | 0xfff;
        (base <= limit).then_some((base, limit))
    }

    /// Whether the bridge forwards accesses to `region` to its secondary side.
    pub fn forwards(&self, region: &PciBarRegion) -> bool {
        let cmd = self.word(0x04);
        let Some(last) = region.addr.checked_add(region.size - 1) else {
            return false;
        };
        let inside = |w: Option<(u64, u64)>| w.is_some_and(|(b, l)| region.addr >= b && last <= l);
        match region.kind {
            PciBarKind::Io => cmd & 1 != 0 && inside(self.io_window()),
            _ => {
                cmd & 2 != 0 && (inside(self.memory_window()) || inside(self.prefetchable_window()))
            }
        }
    }

    /// Programs bus numbers and the memory window as firmware does, closes the I/O and
    /// prefetchable windows and enables memory forwarding and bus mastering.
    pub(crate) fn preset(&self, primary: u8, secondary: u8, subordinate: u8, mem: (u64, u64)) {
        let mut c = lock(&self.config);
        c.write(0x18, &[primary, secondary, subordinate, 0]);
        let (base, size) = mem;
        let limit = base + size - 1;
        let base_reg = ((base >> 16) as u16) & 0xfff0;
        let limit_reg = ((limit >> 16) as u16) & 0xfff0;
        c.write(0x20, &base_reg.to_le_bytes());
        c.write(0x22, &limit_reg.to_le_bytes());
        c.write(0x24, &0xfff0u16.to_le_bytes());
        c.write(0x26, &0u16.to_le_bytes());
        c.write(0x28, &0u32.to_le_bytes());
        c.write(0x2c, &0u32.to_le_bytes());
        c.write(0x1c, &[0xf0]);
        c.write(0x1d, &[0x00]);
        c.write(0x04, &0x0006u16.to_le_bytes());
    }

    pub(crate) fn set_subordinate(&self, bus: u8) {
        lock(&self.config).write(0x1a, &[bus]);
    }
}

config_space_only_function!(PciBridge);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmkit_migration::Restore;

    #[test]
    fn windows_and_forwarding() {
        let b = PciBridge::new();
        assert_eq!(
            b.memory_window(),
            Some((0, 0xf_ffff)),
            "reset window is 0..1MiB"
        );
        b.preset(0, 1, 1, (0xc300_0000, 0x100_0000));
        assert_eq!(
            (b.primary_bus(), b.secondary_bus(), b.subordinate_bus()),
            (0, 1, 1)
        );
        assert_eq!(b.memory_window(), Some((0xc300_0000, 0xc3ff_ffff)));
        assert_eq!(b.prefetchable_window(), None);
        assert_eq!(b.io_window(), None);
        let r = |addr, size| PciBarRegion {
            index: 0,
            kind: PciBarKind::Memory32,
            addr,
            size,
        };
        assert!(b.forwards(&r(0xc300_0000, 0x1000)));
        assert!(b.forwards(&r(0xc3ff_f000, 0x1000)));
        assert!(!b.forwards(&r(0xc400_0000, 0x1000)));
        assert!(!b.forwards(&r(0xc3ff_f000, 0x2000)));
        assert!(!b.forwards(&PciBarRegion {
            kind: PciBarKind::Io,
            ..r(0xc000, 0x20)
        }));
        b.config_write(4, &[0, 0]);
        assert!(!b.forwards(&r(0xc300_0000, 0x1000)), "memory enable off");
        // Prefetchable 64-bit window above 4 GiB.
        b.config_write(4, &[2, 0]);
        b.config_write(0x24, &0x0010u16.to_le_bytes());
        b.config_write(0x26, &0x0010u16.to_le_bytes());
        b.config_write(0x28, &1u32.to_le_bytes());
        b.config_write(0x2c, &1u32.to_le_bytes());
        assert_eq!(
            b.prefetchable_window(),
            Some((0x1_0010_0000, 0x1_001f_ffff))
        );
        assert!(b.forwards(&r(0x1_0010_0000, 0x10_0000)));

        let s = b.save().unwrap();
        let c = PciBridge::restore((), &s).unwrap();
        assert_eq!(c.save().unwrap(), s);
        assert!(
            PciHostBridge::restore((), &s).is_err(),
            "bridge state is not a host bridge's"
        );
        let h = PciHostBridge::new();
        let mut v = [0u8; 4];
        h.config_read(8, &mut v);
        assert_eq!(u32::from_le_bytes(v) >> 16, 0x0600);
    }
}
