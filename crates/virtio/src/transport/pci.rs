// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The modern virtio-pci transport (virtio 1.2, section 4.1).
//!
//! One function, vendor 0x1af4, device `0x1040 + device type`, revision 1, with one 64-bit
//! memory BAR (BAR 0) holding every virtio structure and the MSI-X table and PBA:
//!
//! | BAR 0 offset          | structure                                                   |
//! |-----------------------|-------------------------------------------------------------|
//! | [`COMMON_CFG_OFFSET`] | `virtio_pci_common_cfg`                                     |
//! | [`ISR_OFFSET`]        | ISR status (read clears)                                    |
//! | [`DEVICE_CFG_OFFSET`] | device configuration                                        |
//! | [`NOTIFY_OFFSET`]     | notifications: queue `n` at `n * 4` (multiplier 4)          |
//! | [`MSIX_TABLE_OFFSET`] | MSI-X table, `num_queues + 1` vectors                       |
//! | [`MSIX_PBA_OFFSET`]   | MSI-X pending bit array                                     |
//!
//! Capabilities: common, notify, ISR, device and the PCI configuration access capability
//! (`VIRTIO_PCI_CAP_PCI_CFG`), then MSI-X. No INTx: interrupts are MSI-X only.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use vmkit_device::{
    InterruptError, InterruptManager, IoEventAddress, IoEventMatch, IoEventSpace, MsiVectors,
};
use vmkit_migration::{MigrationError, Pausable, VersionedState};
use vmkit_pci::{
    BarChange, Msix, MsixConfig, PciBarInfo, PciBarKind, PciBarRegion, PciConfigSpace,
    PciConfigState, PciDevice, PciError, PciHeader, CAP_ID_VENDOR,
};
use vmm_sys_util::eventfd::EventFd;

use super::common::{Core, InterruptSink, NotifyAddress, Shared, TransportState, NO_VECTOR};
use super::TransportError;
use crate::device::{device_type, VirtioDevice, VirtioInterruptType, VirtioMemory};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio-pci device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The BAR holding every virtio structure.
pub const VIRTIO_BAR: u8 = 0;
/// Size of [`VIRTIO_BAR`].
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure in the BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Size of the common configuration region.
pub const COMMON_CFG_SIZE: u64 = 0x1000;
/// Offset of the ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// Size of the ISR region.
pub const ISR_SIZE: u64 = 0x1000;
/// Offset of the device configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Size of the device configuration region.
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
/// Offset of the notification region.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Size of the notification region.
pub const NOTIFY_SIZE: u64 = 0x1000;
/// `notify_off_multiplier`: queue `n` is notified at `NOTIFY_OFFSET + 4 * n`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u32 = 0x4000;
/// Offset of the MSI-X pending bit array.
pub const MSIX_PBA_OFFSET: u32 = 0x5000;
/// Most queues a device may have on this transport (one MSI-X vector each, plus one for
/// configuration changes, in a 4 KiB table).
pub const MAX_QUEUES: usize = 255;

/// `cfg_type` values of the virtio PCI capabilities.
pub mod cap_type {
    /// Common configuration.
    pub const COMMON_CFG: u8 = 1;
    /// Notifications.
    pub const NOTIFY_CFG: u8 = 2;
    /// ISR status.
    pub const ISR_CFG: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE_CFG: u8 = 4;
    /// PCI configuration access.
    pub const PCI_CFG: u8 = 5;
}

/// Offsets in `virtio_pci_common_cfg` (virtio 1.2, 4.1.4.3).
pub mod common_cfg {
    /// `device_feature_select` (le32).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature` (le32, read-only).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select` (le32).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature` (le32).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `config_msix_vector` (le16).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// `num_queues` (le16, read-only).
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status` (u8).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `config_generation` (u8, read-only).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `queue_select` (le16).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size` (le16).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector` (le16).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `queue_enable` (le16).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `queue_notify_off` (le16, read-only).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `queue_desc` (le64).
    pub const QUEUE_DESC: u64 = 0x20;
    /// `queue_driver` (le64, available ring).
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// `queue_device` (le64, used ring).
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// `queue_notif_config_data` (le16, read-only).
    pub const QUEUE_NOTIF_CONFIG_DATA: u64 = 0x38;
    /// `queue_reset` (le16).
    pub const QUEUE_RESET: u64 = 0x3a;
    /// Size of the structure.
    pub const SIZE: u64 = 0x3c;
}

use common_cfg as cc;

/// PCI class, subclass and programming interface for a virtio device type.
pub fn pci_class(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        device_type::NET => (0x02, 0x00, 0x00),
        device_type::BLOCK | device_type::SCSI => (0x01, 0x00, 0x00),
        device_type::CONSOLE => (0x07, 0x80, 0x00),
        _ => (0xff, 0x00, 0x00),
    }
}

struct PciSink {
    msix: Arc<Msix>,
}

impl InterruptSink for PciSink {
    fn raise(&self, shared: &Shared, kind: VirtioInterruptType) -> Result<(), InterruptError> {
        let vector = shared.vector(kind);
        if vector == NO_VECTOR {
            return Ok(());
        }
        self.msix.trigger(vector).map_err(|e| match e {
            PciError::InvalidVector { vector, count } => InterruptError::InvalidVector {
                index: usize::from(vector),
                len: usize::from(count),
            },
            PciError::Interrupt(e) => e,
            other => InterruptError::Io(std::io::Error::other(other.to_string())),
        })
    }

    fn notifier(&self, shared: &Shared, kind: VirtioInterruptType) -> Option<&EventFd> {
        let vector = shared.vector(kind);
        if vector == NO_VECTOR {
            return None;
        }
        self.msix.notifier(vector)
    }
}

/// Saved state of a [`VirtioPci`] function.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// Configuration space, BAR addresses and MSI-X table.
    pub config: PciConfigState,
    /// Transport and device state (MSI-X vector assignments included).
    pub transport: TransportState,
}

impl VersionedState for VirtioPciState {
    const NAME: &'static str = "vmkit-virtio/pci";
    const VERSION: u16 = 1;
}

/// A virtio device behind a modern virtio-pci function.
///
/// Add it to the PCI root complex as a [`PciDevice`]; the root complex maps BAR 0 on the
/// MMIO bus and calls [`PciDevice::bar_moved`] when the guest moves it, which moves the
/// queue notification ioeventfds (registered while the device is active and BAR 0
/// decodes) along with it.
pub struct VirtioPci {
    core: Mutex<Core>,
    cfg: Mutex<PciConfigSpace>,
    msix: Arc<Msix>,
    pci_cfg_cap: u16,
    num_queues: u16,
}

impl VirtioPci {
    /// MSI-X vectors a function for `device` needs (one per queue, one for configuration
    /// changes): the size of the [`MsiVectors`] group to pass to [`VirtioPci::new`].
    pub fn vectors_needed(device: &dyn VirtioDevice) -> usize {
        device.queue_max_sizes().len() + 1
    }

    /// Wraps `device` in a virtio-pci function. `vectors` must hold at least
    /// [`VirtioPci::vectors_needed`] vectors (MSI-X vector `i` is delivered through vector
    /// `i` of the group).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: VirtioMemory,
        vectors: Arc<dyn MsiVectors>,
        ioevents: Option<Arc<dyn IoEventSpace>>,
    ) -> Result<Self, TransportError> {
        let queues = device.queue_max_sizes().len();
        if queues == 0 || queues > MAX_QUEUES {
            return Err(TransportError::QueueCount(queues));
        }
        let nvec = queues + 1;
        if vectors.len() < nvec {
            return Err(TransportError::Pci(format!(
                "the MSI vector group has {} vectors, {nvec} are needed",
                vectors.len()
            )));
        }
        let dtype = device.device_type();
        let device_id = u16::try_from(dtype)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or_else(|| TransportError::Pci(format!("device type {dtype} too large")))?;
        let (class_code, subclass, prog_if) = pci_class(dtype);
        let pci_err = |e: PciError| TransportError::Pci(e.to_string());
        let mut cfg = PciConfigSpace::new(PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision: 1,
            class_code,
            subclass,
            prog_if,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x0040,
        });
        cfg.add_bar(VIRTIO_BAR, PciBarKind::Memory64, VIRTIO_BAR_SIZE, false)
            .map_err(pci_err)?;
        let cap = |cfg_type: u8, offset: u64, length: u64, extra: &[u8], len: u8| {
            let mut body = vec![len, cfg_type, VIRTIO_BAR, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(length as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        cfg.add_capability(
            CAP_ID_VENDOR,
            &cap(
                cap_type::COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_SIZE,
                &[],
                16,
            ),
        )
        .map_err(pci_err)?;
        cfg.add_capability(
            CAP_ID_VENDOR,
            &cap(
                cap_type::NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
                20,
            ),
        )
        .map_err(pci_err)?;
        cfg.add_capability(
            CAP_ID_VENDOR,
            &cap(cap_type::ISR_CFG, ISR_OFFSET, ISR_SIZE, &[], 16),
        )
        .map_err(pci_err)?;
        cfg.add_capability(
            CAP_ID_VENDOR,
            &cap(
                cap_type::DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_SIZE,
                &[],
                16,
            ),
        )
        .map_err(pci_err)?;
        // PCI configuration access: bar, offset and length are guest-writable; the data
        // window is served by this transport.
        let mut writable = [0u8; 18];
        writable[2] = 0xff;
        writable[6..14].fill(0xff);
        let pci_cfg_cap = cfg
            .add_capability_rw(
                CAP_ID_VENDOR,
                &cap(cap_type::PCI_CFG, 0, 0, &[0; 4], 20),
                &writable,
            )
            .map_err(pci_err)?;
        let nvec16 = u16::try_from(nvec).map_err(|_| TransportError::QueueCount(queues))?;
        let msix = cfg
            .add_msix(
                MsixConfig {
                    vectors: nvec16,
                    table_bar: VIRTIO_BAR,
                    table_offset: MSIX_TABLE_OFFSET,
                    pba_bar: VIRTIO_BAR,
                    pba_offset: MSIX_PBA_OFFSET,
                },
                vectors,
            )
            .map_err(pci_err)?;
        let sink = Arc::new(PciSink {
            msix: Arc::clone(&msix),
        });
        let core = Core::new(device, mem, sink, ioevents)?;
        Ok(Self {
            core: Mutex::new(core),
            cfg: Mutex::new(cfg),
            msix,
            pci_cfg_cap,
            num_queues: queues as u16,
        })
    }

    /// [`VirtioPci::new`] with an MSI vector group of the right size allocated from
    /// `interrupts` (a VMM passes its KVM interrupt manager).
    pub fn with_interrupt_manager(
        device: Box<dyn VirtioDevice>,
        mem: VirtioMemory,
        interrupts: &dyn InterruptManager,
        ioevents: Option<Arc<dyn IoEventSpace>>,
    ) -> Result<Self, TransportError> {
        let vectors = interrupts
            .msi_vectors(Self::vectors_needed(device.as_ref()))
            .map_err(|e| TransportError::Pci(format!("MSI vectors: {e}")))?;
        Self::new(device, mem, vectors, ioevents)
    }

    /// Rebuilds a function from saved state around a freshly built `device`: restores the
    /// configuration space (BAR addresses, MSI-X table), the transport and the device, and
    /// re-activates a device that was `DRIVER_OK`, with its ioeventfds at the restored BAR
    /// address.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: VirtioMemory,
        vectors: Arc<dyn MsiVectors>,
        ioevents: Option<Arc<dyn IoEventSpace>>,
        state: &VirtioPciState,
    ) -> Result<Self, TransportError> {
        let t = Self::new(device, mem, vectors, ioevents)?;
        t.lock_cfg()
            .restore_state(&state.config)
            .map_err(|e| TransportError::InvalidState(e.to_string()))?;
        let addresses = t.notify_addresses();
        let count = t.msix.vector_count();
        {
            let mut core = t.lock_core();
            core.set_notify_addresses(addresses);
            core.restore(&state.transport, |v| v < count)?;
        }
        Ok(t)
    }

    /// Saves the function; pause it first ([`Pausable::pause`]).
    pub fn save_state(&self) -> Result<VirtioPciState, TransportError> {
        let config = self.lock_cfg().save();
        Ok(VirtioPciState {
            config,
            transport: self.lock_core().save()?,
        })
    }

    /// The MSI-X capability (for inspection; the transport triggers it).
    pub fn msix(&self) -> &Arc<Msix> {
        &self.msix
    }

    /// Offset of the PCI configuration access capability in configuration space.
    pub fn pci_cfg_capability(&self) -> u16 {
        self.pci_cfg_cap
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u8 {
        self.lock_core().status()
    }

    /// Whether the device is activated.
    pub fn is_active(&self) -> bool {
        self.lock_core().is_active()
    }

    fn lock_core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_cfg(&self) -> MutexGuard<'_, PciConfigSpace> {
        self.cfg.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notification addresses for the current BAR 0 placement (none when it does not
    /// decode).
    fn notify_addresses(&self) -> Vec<NotifyAddress> {
        let bar = self
            .lock_cfg()
            .bars()
            .into_iter()
            .find(|b| b.index == VIRTIO_BAR);
        self.notify_addresses_at(bar.map(|b| b.addr))
    }

    fn notify_addresses_at(&self, base: Option<u64>) -> Vec<NotifyAddress> {
        (0..u64::from(self.num_queues))
            .map(|q| {
                base.map(|b| {
                    (
                        IoEventAddress::Mmio(
                            b + NOTIFY_OFFSET + q * u64::from(NOTIFY_OFF_MULTIPLIER),
                        ),
                        IoEventMatch::Any,
                    )
                })
            })
            .collect()
    }

    fn common_image(&self) -> [u8; cc::SIZE as usize] {
        let core = self.lock_core();
        let mut img = [0u8; cc::SIZE as usize];
        let mut put = |off: u64, bytes: &[u8]| {
            let o = off as usize;
            img[o..o + bytes.len()].copy_from_slice(bytes);
        };
        put(
            cc::DEVICE_FEATURE_SELECT,
            &core.device_feature_select().to_le_bytes(),
        );
        put(
            cc::DEVICE_FEATURE,
            &core.device_features_window().to_le_bytes(),
        );
        put(
            cc::DRIVER_FEATURE_SELECT,
            &core.driver_feature_select().to_le_bytes(),
        );
        put(
            cc::DRIVER_FEATURE,
            &core.driver_features_window().to_le_bytes(),
        );
        put(cc::CONFIG_MSIX_VECTOR, &core.config_vector().to_le_bytes());
        put(cc::NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(cc::DEVICE_STATUS, &[core.status()]);
        put(cc::CONFIG_GENERATION, &[core.config_generation() as u8]);
        let sel = core.queue_select();
        put(cc::QUEUE_SELECT, &sel.to_le_bytes());
        let exists = sel < self.num_queues;
        put(cc::QUEUE_SIZE, &core.queue_size().to_le_bytes());
        let vector = if exists {
            core.queue_vector()
        } else {
            NO_VECTOR
        };
        put(cc::QUEUE_MSIX_VECTOR, &vector.to_le_bytes());
        put(
            cc::QUEUE_ENABLE,
            &u16::from(core.queue_ready()).to_le_bytes(),
        );
        put(
            cc::QUEUE_NOTIFY_OFF,
            &(if exists { sel } else { 0 }).to_le_bytes(),
        );
        put(cc::QUEUE_DESC, &core.queue_desc().to_le_bytes());
        put(cc::QUEUE_DRIVER, &core.queue_avail().to_le_bytes());
        put(cc::QUEUE_DEVICE, &core.queue_used().to_le_bytes());
        img
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let img = self.common_image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| img.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn common_write(&self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let Some(dst) = raw.get_mut(..data.len()) else {
            return;
        };
        dst.copy_from_slice(data);
        let v = u64::from_le_bytes(raw);
        let count = self.msix.vector_count();
        let mut core = self.lock_core();
        match (offset, data.len()) {
            (cc::DEVICE_FEATURE_SELECT, 4) => core.set_device_feature_select(v as u32),
            (cc::DRIVER_FEATURE_SELECT, 4) => core.set_driver_feature_select(v as u32),
            (cc::DRIVER_FEATURE, 4) => core.set_driver_features_window(v as u32),
            (cc::CONFIG_MSIX_VECTOR, 2) => {
                let vec = v as u16;
                core.set_config_vector(vec, vec < count);
            }
            (cc::DEVICE_STATUS, 1) => core.set_status(v as u8),
            (cc::QUEUE_SELECT, 2) => core.set_queue_select(v as u16),
            (cc::QUEUE_SIZE, 2) => core.set_queue_size(v as u16),
            (cc::QUEUE_MSIX_VECTOR, 2) => {
                let vec = v as u16;
                core.set_queue_vector(vec, vec < count);
            }
            (cc::QUEUE_ENABLE, 2) => {
                // Only enabling is defined (disabling needs VIRTIO_F_RING_RESET).
                if v == 1 {
                    core.set_queue_ready(true);
                }
            }
            (cc::QUEUE_DESC | cc::QUEUE_DRIVER | cc::QUEUE_DEVICE, 8) => {
                let ring = ((offset - cc::QUEUE_DESC) / 8) as u8;
                core.set_queue_address(ring, false, v as u32);
                core.set_queue_address(ring, true, (v >> 32) as u32);
            }
            (o, 4) if (cc::QUEUE_DESC..cc::QUEUE_NOTIF_CONFIG_DATA).contains(&o) => {
                let ring = ((o - cc::QUEUE_DESC) / 8) as u8;
                core.set_queue_address(ring, o % 8 == 4, v as u32);
            }
            _ => log::debug!(
                "virtio-pci: ignoring {}-byte common cfg write at {offset:#x}",
                data.len()
            ),
        }
    }

    fn virtio_bar_read(&self, offset: u64, data: &mut [u8]) {
        if self.msix.bar_read(VIRTIO_BAR, offset, data) {
            return;
        }
        data.fill(0);
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => self.common_read(o, data),
            // The ISR byte; the rest of its region reads as zero.
            ISR_OFFSET => {
                if let Some(b) = data.first_mut() {
                    *b = self.lock_core().interrupt_status(true) as u8;
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.lock_core().read_config(o - DEVICE_CFG_OFFSET, data);
            }
            _ => {}
        }
    }

    fn virtio_bar_write(&self, offset: u64, data: &[u8]) {
        if self.msix.bar_write(VIRTIO_BAR, offset, data) {
            return;
        }
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_SIZE => self.common_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.lock_core().write_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                self.lock_core().notify(q as usize);
            }
            _ => log::debug!("virtio-pci: ignoring BAR write at {offset:#x}"),
        }
    }

    /// The `(bar, offset, length)` the PCI configuration access capability points at.
    fn pci_cfg_window(&self) -> (u8, u32, u32) {
        let cfg = self.lock_cfg();
        let base = self.pci_cfg_cap;
        let mut bar = [0u8; 1];
        let mut off = [0u8; 4];
        let mut len = [0u8; 4];
        cfg.read(base + 4, &mut bar);
        cfg.read(base + 8, &mut off);
        cfg.read(base + 12, &mut len);
        (bar[0], u32::from_le_bytes(off), u32::from_le_bytes(len))
    }

    /// Whether a configuration access at `offset` hits the `pci_cfg_data` window; returns
    /// the BAR offset to access.
    fn pci_cfg_target(&self, offset: u16, len: usize) -> Option<Option<u64>> {
        let data = self.pci_cfg_cap + 16;
        if offset < data || offset >= data + 4 {
            return None;
        }
        let (bar, off, length) = self.pci_cfg_window();
        let rel = u64::from(offset - data);
        let ok = bar == VIRTIO_BAR
            && matches!(length, 1 | 2 | 4)
            && len as u64 + rel <= u64::from(length)
            && u64::from(off) + u64::from(length) <= VIRTIO_BAR_SIZE;
        Some(ok.then_some(u64::from(off) + rel))
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        match self.pci_cfg_target(offset, data.len()) {
            Some(Some(bar_offset)) => self.virtio_bar_read(bar_offset, data),
            Some(None) => data.fill(0),
            None => self.lock_cfg().read(offset, data),
        }
    }

    fn config_write(&self, offset: u16, data: &[u8]) -> Vec<BarChange> {
        match self.pci_cfg_target(offset, data.len()) {
            Some(Some(bar_offset)) => {
                self.virtio_bar_write(bar_offset, data);
                Vec::new()
            }
            Some(None) => Vec::new(),
            None => self.lock_cfg().write(offset, data),
        }
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == VIRTIO_BAR {
            self.virtio_bar_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if bar == VIRTIO_BAR {
            self.virtio_bar_write(offset, data);
        }
    }

    fn bars(&self) -> Vec<PciBarRegion> {
        self.lock_cfg().bars()
    }

    fn bar_moved(&self, change: &BarChange) {
        let concerns = |r: &Option<PciBarRegion>| r.is_some_and(|r| r.index == VIRTIO_BAR);
        if !concerns(&change.old) && !concerns(&change.new) {
            return;
        }
        let base = change.new.filter(|r| r.index == VIRTIO_BAR).map(|r| r.addr);
        let addresses = self.notify_addresses_at(base);
        self.lock_core().set_notify_addresses(addresses);
    }

    fn bar_info(&self) -> Vec<PciBarInfo> {
        self.lock_cfg().bar_info()
    }

    fn set_bar_address(&self, index: u8, addr: u64) -> Result<(), PciError> {
        self.lock_cfg().set_bar_address(index, addr)
    }
}

impl Pausable for VirtioPci {
    fn pause(&self) -> Result<(), MigrationError> {
        self.lock_core()
            .pause()
            .map_err(|e| MigrationError::Component {
                component: "virtio-pci".into(),
                source: Box::new(e),
            })
    }

    fn resume(&self) -> Result<(), MigrationError> {
        self.lock_core()
            .resume()
            .map_err(|e| MigrationError::Component {
                component: "virtio-pci".into(),
                source: Box::new(e),
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    use vmkit_device::testing::{RecordingIoEvents, RecordingMsi};
    use vmkit_pci::CAP_ID_MSIX;

    use super::*;
    use crate::conformance::guest_memory;
    use crate::conformance::testdev::{Flaw, TestDev};
    use crate::device::{features, status};

    const BAR_ADDR: u64 = 0xe000_0000;
    const DESC: u64 = 0x10_0000;
    const AVAIL: u64 = 0x10_1000;
    const USED: u64 = 0x10_2000;
    const BUF: u64 = 0x20_0000;

    struct Rig {
        pci: VirtioPci,
        msi: Arc<RecordingMsi>,
        io: Arc<RecordingIoEvents>,
        mem: VirtioMemory,
    }

    fn rig_with(flaw: Flaw) -> Rig {
        let mem = guest_memory().unwrap();
        let msi = Arc::new(RecordingMsi::new(2));
        let io = Arc::new(RecordingIoEvents::default());
        let pci = VirtioPci::new(
            Box::new(TestDev::new(flaw)),
            mem.clone(),
            msi.clone(),
            Some(io.clone()),
        )
        .unwrap();
        Rig { pci, msi, io, mem }
    }

    fn rig() -> Rig {
        rig_with(Flaw::None)
    }

    impl Rig {
        fn cfg_read(&self, off: u16, len: usize) -> u32 {
            let mut b = [0u8; 4];
            self.pci.config_read(off, &mut b[..len]);
            u32::from_le_bytes(b)
        }

        fn cfg_write(&self, off: u16, v: u32, len: usize) {
            for change in self.pci.config_write(off, &v.to_le_bytes()[..len]) {
                // What the root complex does after moving the bus range.
                self.pci.bar_moved(&change);
            }
        }

        fn common_read(&self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.pci.bar_read(0, COMMON_CFG_OFFSET + off, &mut b[..len]);
            u64::from_le_bytes(b)
        }

        fn common_write(&self, off: u64, v: u64, len: usize) {
            self.pci
                .bar_write(0, COMMON_CFG_OFFSET + off, &v.to_le_bytes()[..len]);
        }

        fn caps(&self) -> Vec<(u16, u8, u8)> {
            let mut out = Vec::new();
            let mut p = self.cfg_read(0x34, 1) as u16;
            while p != 0 {
                let id = self.cfg_read(p, 1) as u8;
                let ty = if id == CAP_ID_VENDOR {
                    self.cfg_read(p + 3, 1) as u8
                } else {
                    0
                };
                out.push((p, id, ty));
                p = self.cfg_read(p + 1, 1) as u16;
            }
            out
        }

        fn map_bar(&self, addr: u64) {
            self.cfg_write(0x10, addr as u32, 4);
            self.cfg_write(0x14, (addr >> 32) as u32, 4);
            self.cfg_write(0x04, 0x6, 2);
        }

        fn enable_msix(&self) {
            let cap = self.caps().iter().find(|c| c.1 == CAP_ID_MSIX).unwrap().0;
            self.cfg_write(cap + 2, 0x8000, 2);
            for v in 0..2u64 {
                let e = u64::from(MSIX_TABLE_OFFSET) + 16 * v;
                self.pci.bar_write(0, e, &0xfee0_0000u32.to_le_bytes());
                self.pci.bar_write(0, e + 4, &0u32.to_le_bytes());
                self.pci
                    .bar_write(0, e + 8, &(0x40 + v as u32).to_le_bytes());
                self.pci.bar_write(0, e + 12, &0u32.to_le_bytes());
            }
        }

        fn bring_up(&self, feats: u64) {
            self.common_write(cc::DEVICE_STATUS, 1, 1);
            self.common_write(cc::DEVICE_STATUS, 3, 1);
            self.common_write(cc::DRIVER_FEATURE_SELECT, 0, 4);
            self.common_write(cc::DRIVER_FEATURE, feats & 0xffff_ffff, 4);
            self.common_write(cc::DRIVER_FEATURE_SELECT, 1, 4);
            self.common_write(cc::DRIVER_FEATURE, feats >> 32, 4);
            self.common_write(cc::DEVICE_STATUS, 0xb, 1);
            assert_eq!(self.common_read(cc::DEVICE_STATUS, 1), 0xb);
            self.common_write(cc::CONFIG_MSIX_VECTOR, 0, 2);
            self.common_write(cc::QUEUE_SELECT, 0, 2);
            self.common_write(cc::QUEUE_SIZE, 16, 2);
            self.common_write(cc::QUEUE_MSIX_VECTOR, 1, 2);
            let zero = vec![0u8; 0x3000];
            self.mem
                .memory()
                .write_slice(&zero, GuestAddress(DESC))
                .unwrap();
            self.common_write(cc::QUEUE_DESC, DESC, 8);
            // 32-bit halves work as well.
            self.common_write(cc::QUEUE_DRIVER, AVAIL, 4);
            self.common_write(cc::QUEUE_DRIVER + 4, 0, 4);
            self.common_write(cc::QUEUE_DEVICE, USED, 8);
            self.common_write(cc::QUEUE_ENABLE, 1, 2);
            assert_eq!(self.common_read(cc::QUEUE_ENABLE, 2), 1);
            self.common_write(cc::DEVICE_STATUS, 0xf, 1);
        }

        /// Posts one 32-byte writable buffer as request number `n` (0-based).
        fn post(&self, n: u16) {
            let m = self.mem.memory();
            let d = DESC + 16 * u64::from(n % 16);
            m.write_obj(BUF + 64 * u64::from(n), GuestAddress(d))
                .unwrap();
            m.write_obj(32u32, GuestAddress(d + 8)).unwrap();
            m.write_obj(2u16, GuestAddress(d + 12)).unwrap();
            m.write_obj(n % 16, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 16)))
                .unwrap();
            // used_event: interrupt once entry n is used.
            m.write_obj(n, GuestAddress(AVAIL + 4 + 2 * 16)).unwrap();
            m.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
        }

        fn wait_used(&self, idx: u16) -> bool {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let u: u16 = self.mem.memory().read_obj(GuestAddress(USED + 2)).unwrap();
                if u == idx {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        }
    }

    #[test]
    fn identification_and_capabilities() {
        let r = rig();
        assert_eq!(r.cfg_read(0, 2), 0x1af4);
        assert_eq!(r.cfg_read(2, 2), 0x1040 + crate::device_type::RNG);
        assert_eq!(r.cfg_read(8, 1), 1, "revision 1");
        assert_eq!(r.cfg_read(0x2c, 2), 0x1af4);
        assert!(r.cfg_read(0x2e, 2) >= 0x40);
        let caps = r.caps();
        let types: Vec<u8> = caps
            .iter()
            .filter(|c| c.1 == CAP_ID_VENDOR)
            .map(|c| c.2)
            .collect();
        assert_eq!(types, vec![1, 2, 3, 4, 5]);
        for (off, id, ty) in &caps {
            if *id != CAP_ID_VENDOR {
                continue;
            }
            assert_eq!(r.cfg_read(off + 4, 1), 0, "BAR 0");
            let (offset, len) = (r.cfg_read(off + 8, 4), r.cfg_read(off + 12, 4));
            match *ty {
                cap_type::COMMON_CFG => assert_eq!(offset as u64, COMMON_CFG_OFFSET),
                cap_type::NOTIFY_CFG => {
                    assert_eq!(offset as u64, NOTIFY_OFFSET);
                    assert_eq!(r.cfg_read(off + 2, 1), 20, "cap_len");
                    assert_eq!(r.cfg_read(off + 16, 4), NOTIFY_OFF_MULTIPLIER);
                }
                cap_type::ISR_CFG => assert_eq!(offset as u64, ISR_OFFSET),
                cap_type::DEVICE_CFG => assert_eq!(offset as u64, DEVICE_CFG_OFFSET),
                _ => assert_eq!((offset, len), (0, 0)),
            }
        }
        let msix = caps.iter().find(|c| c.1 == CAP_ID_MSIX).unwrap().0;
        assert_eq!(r.cfg_read(msix + 2, 2) & 0x7ff, 1, "2 vectors");
        assert_eq!(r.pci.bar_info()[0].kind, PciBarKind::Memory64);
        assert_eq!(r.pci.bar_info()[0].size, VIRTIO_BAR_SIZE);
        // The interrupt manager hands out a group of the right size.
        let mgr = vmkit_device::testing::RecordingInterruptManager::default();
        VirtioPci::with_interrupt_manager(
            Box::new(TestDev::new(Flaw::None)),
            guest_memory().unwrap(),
            &mgr,
            None,
        )
        .unwrap();
        assert_eq!(mgr.msi_groups()[0].len(), 2);
        // A device that needs more vectors than the group has is refused.
        let small = Arc::new(RecordingMsi::new(1));
        assert!(VirtioPci::new(
            Box::new(TestDev::new(Flaw::None)),
            guest_memory().unwrap(),
            small,
            None
        )
        .is_err());
    }

    #[test]
    fn common_cfg_registers() {
        let r = rig();
        assert_eq!(r.common_read(cc::NUM_QUEUES, 2), 1);
        r.common_write(cc::DEVICE_FEATURE_SELECT, 1, 4);
        assert_eq!(r.common_read(cc::DEVICE_FEATURE, 4), 1, "VERSION_1");
        r.common_write(cc::DEVICE_FEATURE_SELECT, 0, 4);
        assert_eq!(
            r.common_read(cc::DEVICE_FEATURE, 4),
            features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
        );
        assert_eq!(r.common_read(cc::QUEUE_SIZE, 2), 64);
        assert_eq!(r.common_read(cc::QUEUE_NOTIFY_OFF, 2), 0);
        assert_eq!(r.common_read(cc::QUEUE_MSIX_VECTOR, 2), 0xffff);
        r.common_write(cc::QUEUE_MSIX_VECTOR, 7, 2);
        assert_eq!(
            r.common_read(cc::QUEUE_MSIX_VECTOR, 2),
            0xffff,
            "no vector 7"
        );
        r.common_write(cc::QUEUE_MSIX_VECTOR, 1, 2);
        assert_eq!(r.common_read(cc::QUEUE_MSIX_VECTOR, 2), 1);
        r.common_write(cc::QUEUE_SELECT, 1, 2);
        assert_eq!(r.common_read(cc::QUEUE_SIZE, 2), 0, "no queue 1");
        assert_eq!(r.common_read(cc::QUEUE_MSIX_VECTOR, 2), 0xffff);
        // Features without VERSION_1 are refused.
        r.common_write(cc::DEVICE_STATUS, 3, 1);
        r.common_write(cc::DEVICE_STATUS, 0xb, 1);
        assert_eq!(r.common_read(cc::DEVICE_STATUS, 1), 3);
        // Odd-sized accesses read consistently and writes are ignored.
        assert_eq!(r.common_read(cc::NUM_QUEUES, 1), 1);
        r.common_write(cc::QUEUE_SELECT, 0, 4);
        assert_eq!(r.common_read(cc::QUEUE_SELECT, 2), 1);
        // Reset.
        r.common_write(cc::DEVICE_STATUS, 0, 1);
        assert_eq!(r.common_read(cc::DEVICE_STATUS, 1), 0);
        assert_eq!(r.common_read(cc::QUEUE_SELECT, 2), 0);
        assert_eq!(r.common_read(cc::QUEUE_MSIX_VECTOR, 2), 0xffff);
    }

    #[test]
    fn msix_delivery_ioeventfds_and_bar_moves() {
        let r = rig();
        r.map_bar(BAR_ADDR);
        r.enable_msix();
        assert!(r.io.registered().is_empty(), "not active yet");
        r.bring_up(features::VERSION_1 | features::RING_EVENT_IDX);
        assert!(r.pci.is_active());
        let notify = IoEventAddress::Mmio(BAR_ADDR + NOTIFY_OFFSET);
        assert_eq!(r.io.registered(), vec![(notify, IoEventMatch::Any)]);

        r.post(0);
        assert_eq!(r.io.guest_write(notify, &0u16.to_le_bytes()), 1);
        assert!(r.wait_used(1));
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.msi.delivered(1) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(r.msi.delivered(1), 1);
        assert_eq!(r.msi.delivered(0), 0);

        // The guest moves the BAR: the ioeventfd follows.
        r.map_bar(BAR_ADDR + 0x10_0000);
        let moved = IoEventAddress::Mmio(BAR_ADDR + 0x10_0000 + NOTIFY_OFFSET);
        assert_eq!(r.io.registered(), vec![(moved, IoEventMatch::Any)]);
        // Memory decoding off: no registration; the bus path still works.
        r.cfg_write(0x04, 0x4, 2);
        assert!(r.io.registered().is_empty());
        r.post(1);
        r.pci.bar_write(0, NOTIFY_OFFSET, &0u16.to_le_bytes());
        assert!(r.wait_used(2));
        r.cfg_write(0x04, 0x6, 2);
        assert_eq!(r.io.registered().len(), 1);

        // ISR is read-and-clear.
        let mut isr = [0u8; 1];
        r.pci.bar_read(0, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0] & 1, 1);
        r.pci.bar_read(0, ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], 0);

        r.common_write(cc::DEVICE_STATUS, 0, 1);
        assert!(r.io.registered().is_empty());
        assert!(!r.pci.is_active());
    }

    #[test]
    fn masked_vector_sets_pending_and_config_vector_on_needs_reset() {
        let r = rig_with(Flaw::FailsActivate);
        r.map_bar(BAR_ADDR);
        r.enable_msix();
        // Mask vector 0 (configuration).
        r.pci
            .bar_write(0, u64::from(MSIX_TABLE_OFFSET) + 12, &1u32.to_le_bytes());
        r.bring_up(features::VERSION_1);
        assert_ne!(
            r.common_read(cc::DEVICE_STATUS, 1) as u8 & status::DEVICE_NEEDS_RESET,
            0
        );
        assert!(r.pci.msix().pending(0));
        assert_eq!(r.msi.delivered(0), 0);
        r.pci
            .bar_write(0, u64::from(MSIX_TABLE_OFFSET) + 12, &0u32.to_le_bytes());
        assert_eq!(r.msi.delivered(0), 1, "delivered on unmask");
        assert_eq!(r.common_read(cc::CONFIG_GENERATION, 1), 1);
    }

    #[test]
    fn pci_cfg_access_capability() {
        let r = rig();
        let cap = r.pci.pci_cfg_capability();
        r.cfg_write(cap + 4, 0, 1);
        r.cfg_write(cap + 8, (COMMON_CFG_OFFSET + cc::NUM_QUEUES) as u32, 4);
        r.cfg_write(cap + 12, 2, 4);
        assert_eq!(r.cfg_read(cap + 16, 2), 1, "num_queues through the window");
        r.cfg_write(cap + 8, (COMMON_CFG_OFFSET + cc::DEVICE_STATUS) as u32, 4);
        r.cfg_write(cap + 12, 1, 4);
        r.cfg_write(cap + 16, 1, 1);
        assert_eq!(r.common_read(cc::DEVICE_STATUS, 1), 1);
        // A window outside the BAR or a bad length reads zero and ignores writes.
        r.cfg_write(cap + 8, VIRTIO_BAR_SIZE as u32, 4);
        assert_eq!(r.cfg_read(cap + 16, 1), 0);
        r.cfg_write(cap + 8, 0, 4);
        r.cfg_write(cap + 12, 3, 4);
        assert_eq!(r.cfg_read(cap + 16, 1), 0);
        r.cfg_write(cap + 4, 1, 1);
        r.cfg_write(cap + 12, 4, 4);
        assert_eq!(r.cfg_read(cap + 16, 4), 0);
    }

    #[test]
    fn save_and_restore_an_active_function() {
        let r = rig();
        r.map_bar(BAR_ADDR);
        r.enable_msix();
        r.bring_up(features::VERSION_1 | features::RING_EVENT_IDX);
        r.post(0);
        r.pci.bar_write(0, NOTIFY_OFFSET, &0u16.to_le_bytes());
        assert!(r.wait_used(1));
        r.pci.pause().unwrap();
        let state = r.pci.save_state().unwrap();
        let bytes = vmkit_migration::encode(&state).unwrap();
        let state: VirtioPciState = vmkit_migration::decode(&bytes).unwrap();
        assert_eq!(state.transport.queues[0].msix_vector, 1);
        assert_eq!(state.transport.config_msix_vector, 0);
        assert_eq!(state.transport.queues[0].next_avail, 1);
        let Rig { pci, mem, .. } = r;
        drop(pci);

        let msi = Arc::new(RecordingMsi::new(2));
        let io = Arc::new(RecordingIoEvents::default());
        let pci = VirtioPci::restore(
            Box::new(TestDev::new(Flaw::None)),
            mem.clone(),
            msi.clone(),
            Some(io.clone()),
            &state,
        )
        .unwrap();
        let r = Rig { pci, msi, io, mem };
        assert!(r.pci.is_active());
        assert_eq!(
            r.io.registered(),
            vec![(
                IoEventAddress::Mmio(BAR_ADDR + NOTIFY_OFFSET),
                IoEventMatch::Any
            )]
        );
        assert_eq!(r.common_read(cc::QUEUE_MSIX_VECTOR, 2), 1);
        r.pci.pause().unwrap();
        assert_eq!(r.pci.save_state().unwrap(), state);
        r.pci.resume().unwrap();
        // The restored device carries on from the saved ring position.
        r.post(1);
        r.io.guest_write(IoEventAddress::Mmio(BAR_ADDR + NOTIFY_OFFSET), &[0, 0]);
        assert!(r.wait_used(2));
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.msi.delivered(1) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(r.msi.delivered(1), 1, "MSI-X table restored");

        // A state whose vectors do not fit is refused.
        let mut bad = state.clone();
        bad.transport.queues[0].msix_vector = 9;
        assert!(VirtioPci::restore(
            Box::new(TestDev::new(Flaw::None)),
            guest_memory().unwrap(),
            Arc::new(RecordingMsi::new(2)),
            None,
            &bad
        )
        .is_err());
    }

    #[test]
    fn behind_the_root_complex() {
        use vmkit_device::Bus;
        use vmkit_pci::{PciAddress, PciRoot, SlotPlan};

        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let root = PciRoot::new(SlotPlan::default(), mmio.clone(), pio);
        let mem = guest_memory().unwrap();
        let msi = Arc::new(RecordingMsi::new(2));
        let io = Arc::new(RecordingIoEvents::default());
        let pci = Arc::new(
            VirtioPci::new(
                Box::new(TestDev::new(Flaw::None)),
                mem,
                msi,
                Some(io.clone() as Arc<dyn IoEventSpace>),
            )
            .unwrap(),
        );
        let addr = PciAddress::new(0, 3, 0).unwrap();
        let bars = root.add_device(addr, pci.clone()).unwrap();
        assert_eq!(bars.len(), 1);
        let bar = bars[0].addr;
        // The guest reaches the common configuration through the MMIO bus.
        let mut n = [0u8; 2];
        mmio.read(bar + COMMON_CFG_OFFSET + cc::NUM_QUEUES, &mut n)
            .unwrap();
        assert_eq!(u16::from_le_bytes(n), 1);
        // Bring the device up through the bus; the ioeventfd lands at the mapped BAR.
        let w = |off: u64, v: &[u8]| mmio.write(bar + COMMON_CFG_OFFSET + off, v).unwrap();
        w(cc::DEVICE_STATUS, &[3]);
        w(cc::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        w(cc::DRIVER_FEATURE, &1u32.to_le_bytes());
        w(cc::DEVICE_STATUS, &[0xb]);
        w(cc::QUEUE_DESC, &0x10_0000u64.to_le_bytes());
        w(cc::QUEUE_DRIVER, &0x10_1000u64.to_le_bytes());
        w(cc::QUEUE_DEVICE, &0x10_2000u64.to_le_bytes());
        w(cc::QUEUE_ENABLE, &1u16.to_le_bytes());
        w(cc::DEVICE_STATUS, &[0xf]);
        assert!(pci.is_active());
        assert_eq!(
            io.registered(),
            vec![(IoEventAddress::Mmio(bar + NOTIFY_OFFSET), IoEventMatch::Any)]
        );
        // Removing the function unmaps the BAR and takes the ioeventfd with it.
        root.remove_device(addr).unwrap();
        assert!(io.registered().is_empty());
    }
}
