// SPDX-License-Identifier: Apache-2.0 OR MIT
//! PCI for vmkit: a root complex with a host bridge, configuration access through the
//! legacy `0xCF8`/`0xCFC` ports and through ECAM, type 0 and type 1 (PCI-to-PCI bridge)
//! configuration headers, BAR sizing / allocation / relocation, the capability list, MSI and
//! MSI-X, and a fixed slot plan that keeps every device at the same address and BARs across
//! restarts and migrations.
//!
//! The pieces:
//! - [`PciConfigSpace`]: the 4 KiB configuration space of one function, with the
//!   register semantics (read-only bits, BAR sizing, capability list, MSI and MSI-X control).
//!   A device model (e.g. the virtio-pci transport) embeds one and implements [`PciDevice`].
//! - [`Msix`] / [`Msi`]: the interrupt capabilities, shared between the configuration space
//!   (where the guest enables them) and the device's worker threads (which trigger vectors).
//!   Every vector maps onto one vector of a [`vmkit_device::MsiVectors`] group (a KVM MSI
//!   route in a real VMM); masked triggers set the pending bit and are delivered on unmask.
//! - [`PciRoot`]: bus 0 with the [`PciHostBridge`] at 00:00.0, [`PciBridge`]s, the
//!   configuration access devices [`PciConfigIo`] (ports `0xCF8..0xD00`) and [`PciEcam`]
//!   (MMIO at [`ECAM_BASE`]), and the mapping of every decoded BAR onto the MMIO/PIO
//!   [`vmkit_device::Bus`].
//! - [`SlotPlan`]: which device sits in which slot and where its BARs go (see the
//!   [`slots`] module documentation for the platform layout).
//!
//! INTx is not supported (every function reports interrupt pin 0); MSI-X is the interrupt
//! path.
//!
//! # Wiring a machine
//!
//! 1. `PciRoot::new(SlotPlan::default(), mmio_bus, pio_bus)` and
//!    [`PciRoot::register_config_access`] (CF8/CFC ports and the ECAM window). Describe the
//!    ECAM window in the ACPI MCFG table (segment 0, buses 0..=255, [`ECAM_BASE`]) and
//!    reserve it, as e820 reserved memory and/or in the `_CRS` of a `PNP0C02` motherboard
//!    resource device (Linux stops using an MCFG region it finds reserved in neither, and
//!    falls back to CF8/CFC). The host bridge's `_CRS` (`PNP0A08`/`PNP0A03`) lists bus
//!    numbers 0..=255 and the windows of [`SlotPlan::mmio_window`] and
//!    [`SlotPlan::io_window`], but not the ECAM window itself.
//! 2. [`PciRoot::add_role`] (or [`PciRoot::add_device`] at an explicit address) for every
//!    device: it gets its slot plan address, BAR addresses from the slot area, and decoding
//!    enabled, as firmware would do. Devices report their BARs through
//!    [`PciDevice::bar_info`] and accept addresses through [`PciDevice::set_bar_address`].
//!
//! # Snapshot and restore
//!
//! Each function saves its own [`PciConfigState`] (registers, BAR addresses, MSI and MSI-X
//! state): [`PciConfigSpace::save`] / [`PciConfigSpace::restore_state`] for device models,
//! [`vmkit_migration::Snapshot`] / [`vmkit_migration::Restore`] for [`PciHostBridge`] and
//! [`PciBridge`]. The `CONFIG_ADDRESS` latch is [`PciConfigIo::address`]. On the
//! destination, build the root with [`PciRoot::with_host_bridge`], re-register the access
//! devices, and re-insert bridges and functions with [`PciRoot::attach_bridge`] /
//! [`PciRoot::attach_device`], which map the BARs where the guest had programmed them
//! instead of assigning them again.
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_device::testing::RecordingMsi;
//! use vmkit_pci::{MsixConfig, PciBarKind, PciConfigSpace, PciHeader};
//!
//! let mut cfg = PciConfigSpace::new(PciHeader {
//!     vendor_id: 0x1af4,
//!     device_id: 0x1042,
//!     revision: 1,
//!     class_code: 0x01,
//!     subclass: 0x00,
//!     prog_if: 0,
//!     subsystem_vendor_id: 0x1af4,
//!     subsystem_id: 0x0040,
//! });
//! cfg.add_bar(0, PciBarKind::Memory64, 0x4000, false)?;
//! let vectors = Arc::new(RecordingMsi::new(2));
//! let msix = cfg.add_msix(
//!     MsixConfig { vectors: 2, table_bar: 0, table_offset: 0x2000, pba_bar: 0, pba_offset: 0x3000 },
//!     vectors.clone(),
//! )?;
//!
//! // The guest sizes BAR 0: write all ones, read back the size mask.
//! cfg.write(0x10, &0xffff_ffffu32.to_le_bytes());
//! let mut v = [0u8; 4];
//! cfg.read(0x10, &mut v);
//! assert_eq!(u32::from_le_bytes(v), 0xffff_c004); // 16 KiB, 64-bit, not prefetchable
//!
//! // A trigger before MSI-X is enabled only sets the pending bit.
//! msix.trigger(1)?;
//! let mut pba = [0u8; 8];
//! msix.pba_read(0, &mut pba);
//! assert_eq!(u64::from_le_bytes(pba), 0b10);
//! # Ok::<(), vmkit_pci::PciError>(())
//! ```

mod bridge;
mod config;
mod device;
mod msi;
mod msix;
mod root;
pub mod slots;
pub mod testing;

pub use bridge::{
    PciBridge, PciHostBridge, BRIDGE_VENDOR_ID, HOST_BRIDGE_DEVICE_ID, PCI_BRIDGE_DEVICE_ID,
};
pub use config::{
    HeaderType, PciConfigSpace, PciConfigState, PciHeader, CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_VENDOR,
    CONFIG_SPACE_SIZE,
};
pub use device::{BarChange, PciBarInfo, PciBarKind, PciBarRegion, PciDevice};
pub use msi::{Msi, MsiConfig};
pub use msix::{Msix, MsixConfig, MsixEntryState, MsixState};
pub use root::{PciConfigIo, PciEcam, PciRoot, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_SIZE};
pub use slots::{
    SlotPlan, SlotRole, ECAM_BASE, ECAM_BUSES, ECAM_SIZE, PCI_IO_WINDOW_BASE, PCI_IO_WINDOW_SIZE,
    PCI_MMIO_WINDOW_BASE, PCI_MMIO_WINDOW_SIZE, SLOT_IO_SIZE, SLOT_MMIO_SIZE,
};

use std::fmt;

use vmkit_device::{BusError, InterruptError};

/// Errors from building and wiring PCI functions.
///
/// Guest accesses never produce errors (they get the PCI-defined behaviour); these are for
/// the VMM assembling the machine and for bad snapshots.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PciError {
    /// A BAR index outside the header (0..=5 for type 0, 0..=1 for type 1), or the upper
    /// half of a 64-bit BAR.
    #[error("invalid BAR index {0}")]
    InvalidBar(u8),
    /// The BAR register (or the second register a 64-bit BAR needs) is already used.
    #[error("BAR {0} is already in use")]
    BarInUse(u8),
    /// The BAR size is not a power of two or outside what its kind allows.
    #[error("invalid size {size:#x} for a {kind:?} BAR")]
    InvalidBarSize {
        /// The size asked for.
        size: u64,
        /// The BAR kind.
        kind: PciBarKind,
    },
    /// An address not aligned to the BAR's size or not representable by its kind.
    #[error("address {addr:#x} is invalid for BAR {index} (size {size:#x})")]
    InvalidBarAddress {
        /// BAR index.
        index: u8,
        /// The address.
        addr: u64,
        /// The BAR size.
        size: u64,
    },
    /// No space left in the capability area (0x40..0x100).
    #[error("no room for a {0}-byte capability")]
    NoCapabilitySpace(usize),
    /// The function already has this capability (MSI or MSI-X can appear once).
    #[error("capability {0:#04x} already present")]
    DuplicateCapability(u8),
    /// An MSI or MSI-X configuration that cannot work.
    #[error("invalid interrupt capability: {0}")]
    InvalidInterruptConfig(String),
    /// A vector index outside the capability.
    #[error("vector {vector} out of range ({count} vectors)")]
    InvalidVector {
        /// The vector.
        vector: u16,
        /// Number of vectors.
        count: u16,
    },
    /// The interrupt backend failed.
    #[error("interrupt backend: {0}")]
    Interrupt(#[from] InterruptError),
    /// An invalid bus/device/function or slot.
    #[error("invalid PCI address {0}")]
    InvalidAddress(PciAddress),
    /// Another function already sits at this address.
    #[error("PCI address {0} is already in use")]
    AddressInUse(PciAddress),
    /// No bridge leads to this bus.
    #[error("no bridge leads to bus {0}")]
    NoSuchBus(u8),
    /// A device's BARs do not fit into the area the slot plan gives its slot.
    #[error("BARs of the device at {addr} do not fit its slot area: {reason}")]
    BarAllocation {
        /// The device.
        addr: PciAddress,
        /// What did not fit.
        reason: String,
    },
    /// Registering on the MMIO/PIO bus failed.
    #[error("bus registration: {0}")]
    Bus(#[from] BusError),
    /// A saved state that does not fit this function (other layout, bad values).
    #[error("invalid PCI state: {0}")]
    InvalidState(String),
}

/// A PCI function address: segment 0, `bus:device.function`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl PciAddress {
    /// `bus:device.function`; fails when `device > 31` or `function > 7`.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, PciError> {
        let a = Self {
            bus,
            device,
            function,
        };
        if device > 31 || function > 7 {
            return Err(PciError::InvalidAddress(a));
        }
        Ok(a)
    }

    /// Device and function packed as in a configuration address (`device << 3 | function`).
    pub fn devfn(&self) -> u8 {
        (self.device << 3) | (self.function & 7)
    }

    /// The offset of this function's configuration space in the ECAM window.
    pub fn ecam_offset(&self) -> u64 {
        (u64::from(self.bus) << 20)
            | (u64::from(self.device) << 15)
            | (u64::from(self.function) << 12)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{}",
            self.bus, self.device, self.function
        )
    }
}
