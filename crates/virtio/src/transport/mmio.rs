// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use vmkit_device::{
    BusDevice, BusRange, InterruptError, InterruptLine, IoEventAddress, IoEventMatch, IoEventSpace,
    TriggerMode,
};
use vmkit_migration::{MigrationError, Pausable, VersionedState};

use super::common::{Core, InterruptSink, Shared, TransportState};
use super::TransportError;
use crate::device::{VirtioDevice, VirtioInterruptType, VirtioMemory};

/// Size of a virtio-mmio register window (registers at 0..0x100, configuration above).
pub const MMIO_SIZE: u64 = 0x1000;

/// Vendor ID reported in the `VendorID` register (the virtio PCI vendor, 0x1af4).
pub const MMIO_VENDOR_ID: u32 = 0x1af4;

/// virtio-mmio register offsets (virtio 1.2, 4.2.2).
pub mod mmio_regs {
    /// `MagicValue`: "virt".
    pub const MAGIC_VALUE: u64 = 0x000;
    /// `Version`: 2.
    pub const VERSION: u64 = 0x004;
    /// `DeviceID`.
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID`.
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel`.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel`.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel`.
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax`.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum`.
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady`.
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify`.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `InterruptStatus`.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptACK`.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status`.
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow`.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh`.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow` (available ring).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QueueDriverHigh`.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QueueDeviceLow` (used ring).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh`.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `SHMSel`.
    pub const SHM_SEL: u64 = 0x0ac;
    /// `SHMLenLow`.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// `SHMLenHigh`.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// `SHMBaseLow`.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// `SHMBaseHigh`.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// `QueueReset`.
    pub const QUEUE_RESET: u64 = 0x0c0;
    /// `ConfigGeneration`.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
    /// The magic value, "virt" in little endian.
    pub const MAGIC: u32 = 0x7472_6976;
}

use mmio_regs as r;

struct MmioSink {
    line: Arc<dyn InterruptLine>,
}

impl InterruptSink for MmioSink {
    fn raise(&self, _shared: &Shared, _kind: VirtioInterruptType) -> Result<(), InterruptError> {
        match self.line.trigger_mode() {
            TriggerMode::Edge => self.line.trigger(),
            TriggerMode::Level => self.line.set_level(true),
        }
    }
}

/// Saved state of a [`VirtioMmio`] transport.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// Base address of the register window.
    pub base: u64,
    /// Transport and device state.
    pub transport: TransportState,
}

impl VersionedState for VirtioMmioState {
    const NAME: &'static str = "vmkit-virtio/mmio";
    const VERSION: u16 = 1;
}

/// A virtio device behind a virtio-mmio (version 2) register window.
///
/// Register it on the MMIO bus at [`VirtioMmio::range`]. With an [`IoEventSpace`], queue
/// notifications (`QueueNotify` writes of the queue index) are registered as ioeventfds at
/// `base + 0x50` while the device is active and never reach the bus. The interrupt line may
/// be edge- or level-triggered; a level line is lowered when the driver acknowledges every
/// pending `InterruptStatus` bit.
pub struct VirtioMmio {
    core: Mutex<Core>,
    line: Arc<dyn InterruptLine>,
    base: u64,
    range: BusRange,
}

impl VirtioMmio {
    /// Wraps `device` in a virtio-mmio window at guest-physical `base`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: VirtioMemory,
        line: Arc<dyn InterruptLine>,
        base: u64,
        ioevents: Option<Arc<dyn IoEventSpace>>,
    ) -> Result<Self, TransportError> {
        let range = BusRange::new(base, MMIO_SIZE).map_err(|_| TransportError::Address(base))?;
        let sink = Arc::new(MmioSink {
            line: Arc::clone(&line),
        });
        let mut core = Core::new(device, mem, sink, ioevents)?;
        let notify = base.wrapping_add(r::QUEUE_NOTIFY);
        let addresses = (0..core.num_queues())
            .map(|q| {
                Some((
                    IoEventAddress::Mmio(notify),
                    IoEventMatch::U32(u32::try_from(q).unwrap_or(u32::MAX)),
                ))
            })
            .collect();
        core.set_notify_addresses(addresses);
        Ok(Self {
            core: Mutex::new(core),
            line,
            base,
            range,
        })
    }

    /// Lowers a level-triggered line once nothing is pending. Workers raise interrupts
    /// without the transport lock (they set the status bit, then the line), so one may have
    /// raised between our look at the status and the lowering: look again afterwards and
    /// raise the line back if so, or that interrupt would be lost.
    fn lower_level_line(&self) {
        if self.line.trigger_mode() != TriggerMode::Level {
            return;
        }
        if let Err(e) = self.line.set_level(false) {
            log::warn!("virtio-mmio: cannot lower the interrupt line: {e}");
            return;
        }
        if self.lock().interrupt_status(false) != 0 {
            if let Err(e) = self.line.set_level(true) {
                log::warn!("virtio-mmio: cannot raise the interrupt line: {e}");
            }
        }
    }

    /// Rebuilds a transport from saved state around a freshly built `device` (same type and
    /// configuration as the saved one). A device that was `DRIVER_OK` is activated again,
    /// with its ioeventfds registered.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: VirtioMemory,
        line: Arc<dyn InterruptLine>,
        ioevents: Option<Arc<dyn IoEventSpace>>,
        state: &VirtioMmioState,
    ) -> Result<Self, TransportError> {
        let t = Self::new(device, mem, line, state.base, ioevents)?;
        t.lock().restore(&state.transport, |_| false)?;
        if state.transport.interrupt_status != 0 && t.line.trigger_mode() == TriggerMode::Level {
            t.line
                .set_level(true)
                .map_err(|e| TransportError::InvalidState(format!("interrupt line: {e}")))?;
        }
        Ok(t)
    }

    /// Saves the transport and device state; pause the device first ([`Pausable::pause`]).
    pub fn save_state(&self) -> Result<VirtioMmioState, TransportError> {
        Ok(VirtioMmioState {
            base: self.base,
            transport: self.lock().save()?,
        })
    }

    /// The bus range to register this transport at.
    pub fn range(&self) -> BusRange {
        self.range
    }

    /// The base address of the register window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u8 {
        self.lock().status()
    }

    /// Whether the device is activated (`DRIVER_OK` accepted and `activate` succeeded).
    pub fn is_active(&self) -> bool {
        self.lock().is_active()
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let core = self.lock();
        match offset {
            r::MAGIC_VALUE => r::MAGIC,
            r::VERSION => 2,
            r::DEVICE_ID => core.device_type(),
            r::VENDOR_ID => MMIO_VENDOR_ID,
            r::DEVICE_FEATURES => core.device_features_window(),
            r::DEVICE_FEATURES_SEL => core.device_feature_select(),
            r::DRIVER_FEATURES => core.driver_features_window(),
            r::DRIVER_FEATURES_SEL => core.driver_feature_select(),
            r::QUEUE_SEL => u32::from(core.queue_select()),
            r::QUEUE_NUM_MAX => u32::from(core.queue_max_size()),
            r::QUEUE_NUM => u32::from(core.queue_size()),
            r::QUEUE_READY => u32::from(core.queue_ready()),
            r::INTERRUPT_STATUS => core.interrupt_status(false),
            r::STATUS => u32::from(core.status()),
            r::QUEUE_DESC_LOW => core.queue_desc() as u32,
            r::QUEUE_DESC_HIGH => (core.queue_desc() >> 32) as u32,
            r::QUEUE_DRIVER_LOW => core.queue_avail() as u32,
            r::QUEUE_DRIVER_HIGH => (core.queue_avail() >> 32) as u32,
            r::QUEUE_DEVICE_LOW => core.queue_used() as u32,
            r::QUEUE_DEVICE_HIGH => (core.queue_used() >> 32) as u32,
            // No shared memory regions: a length of -1 says "no such region".
            r::SHM_LEN_LOW | r::SHM_LEN_HIGH | r::SHM_BASE_LOW | r::SHM_BASE_HIGH => u32::MAX,
            r::CONFIG_GENERATION => core.config_generation(),
            _ => 0,
        }
    }

    fn write_reg(&self, offset: u64, v: u32) {
        if offset == r::QUEUE_NOTIFY {
            // Only the low 16 bits name the queue (the rest is notification data).
            self.lock().notify(usize::from(v as u16));
            return;
        }
        let mut core = self.lock();
        match offset {
            r::DEVICE_FEATURES_SEL => core.set_device_feature_select(v),
            r::DRIVER_FEATURES => core.set_driver_features_window(v),
            r::DRIVER_FEATURES_SEL => core.set_driver_feature_select(v),
            r::QUEUE_SEL => core.set_queue_select(u16::try_from(v).unwrap_or(u16::MAX)),
            r::QUEUE_NUM => core.set_queue_size(u16::try_from(v).unwrap_or(0)),
            r::QUEUE_READY => core.set_queue_ready(v & 1 == 1),
            r::INTERRUPT_ACK => {
                let pending = core.ack_interrupt(v);
                drop(core);
                if pending == 0 {
                    self.lower_level_line();
                }
            }
            r::STATUS => {
                core.set_status(v as u8);
                let pending = core.interrupt_status(false);
                drop(core);
                // A reset clears the interrupt status: lower a level line with it.
                if v == 0 && pending == 0 {
                    self.lower_level_line();
                }
            }
            r::QUEUE_DESC_LOW => core.set_queue_address(0, false, v),
            r::QUEUE_DESC_HIGH => core.set_queue_address(0, true, v),
            r::QUEUE_DRIVER_LOW => core.set_queue_address(1, false, v),
            r::QUEUE_DRIVER_HIGH => core.set_queue_address(1, true, v),
            r::QUEUE_DEVICE_LOW => core.set_queue_address(2, false, v),
            r::QUEUE_DEVICE_HIGH => core.set_queue_address(2, true, v),
            _ => log::debug!("virtio-mmio: write {v:#x} to read-only/unknown {offset:#x}"),
        }
    }
}

impl BusDevice for VirtioMmio {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= r::CONFIG {
            self.lock().read_config(offset - r::CONFIG, data);
            return;
        }
        // Registers are 32 bits wide and accessed as such; anything else reads as zero.
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(bytes) if offset % 4 == 0 => *bytes = self.read_reg(offset).to_le_bytes(),
            _ => data.fill(0),
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= r::CONFIG {
            self.lock().write_config(offset - r::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_reg(offset, u32::from_le_bytes(bytes)),
            _ => log::debug!(
                "virtio-mmio: ignoring {}-byte write at {offset:#x}",
                data.len()
            ),
        }
    }
}

impl Pausable for VirtioMmio {
    fn pause(&self) -> Result<(), MigrationError> {
        self.lock().pause().map_err(|e| MigrationError::Component {
            component: "virtio-mmio".into(),
            source: Box::new(e),
        })
    }

    fn resume(&self) -> Result<(), MigrationError> {
        self.lock().resume().map_err(|e| MigrationError::Component {
            component: "virtio-mmio".into(),
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    use vmkit_device::testing::{CountingLine, RecordingIoEvents};

    use super::*;
    use crate::conformance::testdev::{Flaw, TestDev};
    use crate::conformance::{guest_memory, Driver, Probe, MMIO_BASE};
    use crate::device::{features, status};

    fn driver_with(
        flaw: Flaw,
        mode: TriggerMode,
        ioevents: Option<Arc<RecordingIoEvents>>,
    ) -> Driver {
        let mem = guest_memory().unwrap();
        let line = Arc::new(CountingLine::new(mode));
        let t = VirtioMmio::new(
            Box::new(TestDev::new(flaw)),
            mem.clone(),
            line.clone(),
            MMIO_BASE,
            ioevents.map(|i| i as Arc<dyn IoEventSpace>),
        )
        .unwrap();
        Driver::with_transport(Arc::new(t), mem, line)
    }

    fn driver() -> Driver {
        driver_with(Flaw::None, TriggerMode::Edge, None)
    }

    #[test]
    fn identification_registers() {
        let d = driver();
        assert_eq!(d.read(r::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(d.read(r::VERSION), 2);
        assert_eq!(d.read(r::DEVICE_ID), crate::device_type::RNG);
        assert_eq!(d.read(r::VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(d.read(r::SHM_LEN_LOW), u32::MAX);
        assert_eq!(d.transport.range().base(), MMIO_BASE);
        assert_eq!(d.transport.range().len(), MMIO_SIZE);
        // Narrow or misaligned register accesses read as zero and are ignored.
        let mut b = [0xffu8; 2];
        d.transport.read(MMIO_BASE, r::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        d.transport.read(MMIO_BASE, 1, &mut b);
        assert_eq!(b, [0; 4]);
        d.transport.write(MMIO_BASE, r::STATUS, &[1]);
        assert_eq!(d.status(), 0);
        // Unknown registers read zero.
        assert_eq!(d.read(0x0e0), 0);
    }

    #[test]
    fn feature_windows_and_negotiation() {
        let mut d = driver();
        let offered = d.device_features();
        assert_eq!(
            offered,
            features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
        );
        d.write(r::DEVICE_FEATURES_SEL, 2);
        assert_eq!(d.read(r::DEVICE_FEATURES), 0);
        // FEATURES_OK before ACKNOWLEDGE | DRIVER is refused.
        d.write(r::STATUS, u32::from(status::FEATURES_OK));
        assert_eq!(d.status() & status::FEATURES_OK, 0);
        d.reset(Duration::from_secs(5)).unwrap();
        assert!(!d.negotiate(features::RING_EVENT_IDX), "no VERSION_1");
        d.reset(Duration::from_secs(5)).unwrap();
        assert!(!d.negotiate(offered | 1), "unoffered bit 0");
        d.reset(Duration::from_secs(5)).unwrap();
        assert!(d.negotiate(features::VERSION_1));
        d.write(r::DRIVER_FEATURES_SEL, 1);
        assert_eq!(d.read(r::DRIVER_FEATURES), 1);
        // A status write that clears bits keeps them.
        d.write(r::STATUS, u32::from(status::ACKNOWLEDGE));
        assert_eq!(
            d.status(),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        // DRIVER_OK without FEATURES_OK is ignored.
        d.reset(Duration::from_secs(5)).unwrap();
        d.write(
            r::STATUS,
            u32::from(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK),
        );
        assert_eq!(d.status() & status::DRIVER_OK, 0);
        assert!(!d.transport.is_active());
        // ACKNOWLEDGE, DRIVER and FEATURES_OK may come in one write.
        d.reset(Duration::from_secs(5)).unwrap();
        d.write(r::DRIVER_FEATURES_SEL, 1);
        d.write(r::DRIVER_FEATURES, 1);
        d.write(
            r::STATUS,
            u32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        assert_eq!(
            d.status(),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
    }

    #[test]
    fn features_the_transport_cannot_serve_are_not_offered() {
        let d = driver_with(Flaw::OffersPacked, TriggerMode::Edge, None);
        assert_eq!(d.device_features() & (1 << 34), 0);
        assert!(!d.negotiate(d.device_features() | (1 << 34)));
    }

    #[test]
    fn queue_configuration_is_validated() {
        let d = driver();
        d.write(r::QUEUE_SEL, 0);
        assert_eq!(d.read(r::QUEUE_NUM_MAX), 64);
        assert_eq!(d.read(r::QUEUE_NUM), 64);
        d.write(r::QUEUE_NUM, 3);
        assert_eq!(d.read(r::QUEUE_NUM), 64, "not a power of two");
        d.write(r::QUEUE_NUM, 128);
        assert_eq!(d.read(r::QUEUE_NUM), 64, "above the maximum");
        d.write(r::QUEUE_NUM, 16);
        assert_eq!(d.read(r::QUEUE_NUM), 16);
        // Rings outside guest memory: the queue does not become ready.
        d.write(r::QUEUE_DESC_LOW, 0);
        d.write(r::QUEUE_DESC_HIGH, 1);
        d.write(r::QUEUE_DRIVER_LOW, 0x1000);
        d.write(r::QUEUE_DEVICE_LOW, 0x2000);
        d.write(r::QUEUE_READY, 1);
        assert_eq!(d.read(r::QUEUE_READY), 0);
        d.write(r::QUEUE_DESC_HIGH, 0);
        assert_eq!(d.read(r::QUEUE_DESC_HIGH), 0);
        // A misaligned address is ignored.
        d.write(r::QUEUE_DEVICE_LOW, 0x2002);
        assert_eq!(d.read(r::QUEUE_DEVICE_LOW), 0x2000);
        d.write(r::QUEUE_READY, 1);
        assert_eq!(d.read(r::QUEUE_READY), 1);
        // While ready, the configuration is frozen.
        d.write(r::QUEUE_NUM, 8);
        d.write(r::QUEUE_DESC_LOW, 0x4000);
        assert_eq!(d.read(r::QUEUE_NUM), 16);
        assert_eq!(d.read(r::QUEUE_DESC_LOW), 0);
        // Queues that do not exist read as absent.
        d.write(r::QUEUE_SEL, 1);
        assert_eq!(d.read(r::QUEUE_NUM_MAX), 0);
        d.write(r::QUEUE_READY, 1);
        assert_eq!(d.read(r::QUEUE_READY), 0);
    }

    #[test]
    fn bus_notification_interrupt_and_ack() {
        let mut d = driver();
        d.bring_up().unwrap();
        let before = d.line.count();
        d.run_probe(&Probe::writable(0, &[32]), Duration::from_secs(5))
            .unwrap();
        // The interrupt follows the used-ring update; give the worker a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while d.line.count() == before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(d.line.count() > before);
        assert_eq!(d.read(r::INTERRUPT_STATUS) & 1, 1);
        d.write(r::INTERRUPT_ACK, 1);
        assert_eq!(d.read(r::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn level_line_is_lowered_when_every_bit_is_acknowledged() {
        let mut d = driver_with(Flaw::None, TriggerMode::Level, None);
        d.bring_up().unwrap();
        d.run_probe(&Probe::writable(0, &[32]), Duration::from_secs(5))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !d.line.level() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(d.line.level());
        d.write(r::INTERRUPT_ACK, 2);
        assert!(d.line.level(), "bit 0 still pending");
        d.write(r::INTERRUPT_ACK, 1);
        assert!(!d.line.level());
        // A reset with an interrupt pending lowers the line too.
        d.run_probe(&Probe::writable(0, &[32]), Duration::from_secs(5))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !d.line.level() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(d.line.level());
        d.reset(Duration::from_secs(5)).unwrap();
        assert!(!d.line.level());
    }

    #[test]
    fn ioeventfd_registered_while_active_and_removed_on_reset() {
        let io = Arc::new(RecordingIoEvents::default());
        let mut d = driver_with(Flaw::None, TriggerMode::Edge, Some(io.clone()));
        assert!(io.registered().is_empty());
        d.bring_up().unwrap();
        assert_eq!(
            io.registered(),
            vec![(
                IoEventAddress::Mmio(MMIO_BASE + r::QUEUE_NOTIFY),
                IoEventMatch::U32(0)
            )]
        );
        // A request notified only through the ioeventfd is completed.
        let q = 0;
        let table = d.desc_table(q);
        let ids = d.take_descs(q, 1);
        let buf = d.alloc(16);
        d.write_desc(
            table,
            ids[0],
            buf,
            16,
            crate::conformance::VIRTQ_DESC_F_WRITE,
            0,
        );
        d.push_avail(q, ids[0]);
        let fired = io.guest_write(
            IoEventAddress::Mmio(MMIO_BASE + r::QUEUE_NOTIFY),
            &0u32.to_le_bytes(),
        );
        assert_eq!(fired, 1);
        assert_eq!(d.wait_used(q, ids[0], Duration::from_secs(5)), Some(16));
        let mut out = [0u8; 16];
        d.mem
            .memory()
            .read_slice(&mut out, GuestAddress(buf))
            .unwrap();
        assert_eq!(out, [0xa5; 16]);
        d.reset(Duration::from_secs(5)).unwrap();
        assert!(io.registered().is_empty());
        // And again after re-activation.
        d.bring_up().unwrap();
        assert_eq!(io.registered().len(), 1);
        drop(d);
        assert!(
            io.registered().is_empty(),
            "dropping the transport unregisters"
        );
    }

    #[test]
    fn event_idx_is_set_on_the_queue_only_when_negotiated() {
        for with in [true, false] {
            let mut d = driver();
            let f = if with {
                features::VERSION_1 | features::RING_EVENT_IDX
            } else {
                features::VERSION_1
            };
            assert!(d.negotiate(f));
            d.setup_queues().unwrap();
            d.driver_ok();
            d.run_probe(&Probe::writable(0, &[8]), Duration::from_secs(5))
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            // avail_event lives after the used ring's entries (size 64).
            let used = 0x10_0000 + 0x2000;
            let avail_event: u16 = d
                .mem
                .memory()
                .read_obj(GuestAddress(used + 4 + 8 * 64))
                .unwrap();
            assert_eq!(avail_event == 1, with, "EVENT_IDX {with}");
        }
    }

    #[test]
    fn failed_activation_sets_needs_reset_and_reset_clears_it() {
        let mut d = driver_with(Flaw::FailsActivate, TriggerMode::Edge, None);
        let gen = d.read(r::CONFIG_GENERATION);
        assert!(d
            .bring_up()
            .unwrap_err()
            .to_string()
            .contains("NEEDS_RESET"));
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(d.read(r::INTERRUPT_STATUS), 2);
        assert_eq!(d.line.count(), 1);
        assert_ne!(d.read(r::CONFIG_GENERATION), gen);
        // The driver cannot clear NEEDS_RESET by writing the status.
        d.write(r::STATUS, 0x4f);
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        d.reset(Duration::from_secs(5)).unwrap();
        assert_eq!(d.read(r::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn config_space_passes_through() {
        let d = driver();
        let mut b = [0u8; 8];
        d.transport.read(MMIO_BASE, r::CONFIG, &mut b);
        assert_eq!(&b, b"vmkitdev");
        d.transport.write(MMIO_BASE, r::CONFIG + 1, b"XY");
        let mut b = [0u8; 4];
        d.transport.read(MMIO_BASE, r::CONFIG, &mut b);
        assert_eq!(&b, b"vXYi");
        let mut far = [0xffu8; 4];
        d.transport.read(MMIO_BASE, MMIO_SIZE - 4, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn restore_rejects_state_of_another_device_and_reactivates() {
        let io = Arc::new(RecordingIoEvents::default());
        let mut d = driver_with(Flaw::None, TriggerMode::Edge, Some(io.clone()));
        d.bring_up().unwrap();
        d.run_probe(&Probe::writable(0, &[8]), Duration::from_secs(5))
            .unwrap();
        d.transport.pause().unwrap();
        let s = d.transport.save_state().unwrap();
        assert_eq!(s.transport.queues[0].next_avail, 1);
        assert_eq!(s.transport.queues[0].next_used, 1);
        assert!(s.transport.queues[0].event_idx);
        drop(d);
        assert!(io.registered().is_empty());

        let mem = guest_memory().unwrap();
        let line: Arc<dyn InterruptLine> = Arc::new(CountingLine::new(TriggerMode::Edge));
        let mut bad = s.clone();
        bad.transport.device_type = 1;
        assert!(matches!(
            VirtioMmio::restore(
                Box::new(TestDev::new(Flaw::None)),
                mem.clone(),
                line.clone(),
                None,
                &bad
            ),
            Err(TransportError::InvalidState(_))
        ));
        let mut bad = s.clone();
        bad.transport.queues.push(Default::default());
        assert!(VirtioMmio::restore(
            Box::new(TestDev::new(Flaw::None)),
            mem.clone(),
            line.clone(),
            None,
            &bad
        )
        .is_err());
        let mut bad = s.clone();
        bad.transport.queues[0].size = 3;
        assert!(VirtioMmio::restore(
            Box::new(TestDev::new(Flaw::None)),
            mem.clone(),
            line.clone(),
            None,
            &bad
        )
        .is_err());

        let t = VirtioMmio::restore(
            Box::new(TestDev::new(Flaw::None)),
            mem,
            line,
            Some(io.clone()),
            &s,
        )
        .unwrap();
        assert!(t.is_active());
        assert_eq!(io.registered().len(), 1);
        assert_eq!(t.status(), s.transport.status);
    }

    #[test]
    fn device_requested_reset_is_visible_and_recoverable() {
        let mut d = driver();
        d.bring_up().unwrap();
        crate::conformance::post_malformed(
            &mut d,
            0,
            crate::conformance::Malformation::AvailIndexJump,
            1,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while d.status() & status::DEVICE_NEEDS_RESET == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            d.read(r::INTERRUPT_STATUS) & 2,
            2,
            "configuration interrupt"
        );
        d.reset(Duration::from_secs(5)).unwrap();
        d.bring_up().unwrap();
        d.run_probe(&Probe::writable(0, &[8]), Duration::from_secs(5))
            .unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Arbitrary register traffic never panics, and the status the driver reads never
        /// shows DRIVER_OK without FEATURES_OK or FEATURES_OK with unoffered features.
        #[test]
        fn arbitrary_register_traffic(
            ops in proptest::collection::vec(
                (0u64..0x180, 0usize..9, proptest::prelude::any::<u32>(), proptest::prelude::any::<bool>()),
                1..200,
            )
        ) {
            let d = driver();
            for (offset, size, value, write) in ops {
                let offset = if size == 4 { offset & !3 } else { offset };
                let bytes = value.to_le_bytes();
                if write {
                    let data: Vec<u8> = bytes.iter().copied().cycle().take(size).collect();
                    d.transport.write(MMIO_BASE, offset, &data);
                } else {
                    let mut data = vec![0u8; size];
                    d.transport.read(MMIO_BASE, offset, &mut data);
                }
                let s = d.status();
                if s & status::DRIVER_OK != 0 {
                    proptest::prop_assert!(s & status::FEATURES_OK != 0);
                }
                if s & status::FEATURES_OK != 0 {
                    d.write(r::DRIVER_FEATURES_SEL, 1);
                    let hi = u64::from(d.read(r::DRIVER_FEATURES));
                    d.write(r::DRIVER_FEATURES_SEL, 0);
                    let lo = u64::from(d.read(r::DRIVER_FEATURES));
                    let offered = d.device_features();
                    proptest::prop_assert_eq!((lo | hi << 32) & !offered, 0);
                }
            }
        }
    }
}

#[cfg(test)]
mod golden {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::transport::{QueueSnapshot, NO_VECTOR};

    fn sample() -> VirtioMmioState {
        VirtioMmioState {
            base: 0xd000_0000,
            transport: TransportState {
                device_type: 4,
                status: 0xf,
                needs_reset: false,
                device_feature_select: 1,
                driver_feature_select: 1,
                driver_features: 0x1_2000_0000,
                acked_features: 0x1_2000_0000,
                queue_select: 0,
                queues: vec![QueueSnapshot {
                    size: 64,
                    ready: true,
                    desc_table: 0x10_0000,
                    avail_ring: 0x10_1000,
                    used_ring: 0x10_2000,
                    next_avail: 7,
                    next_used: 7,
                    event_idx: true,
                    msix_vector: NO_VECTOR,
                }],
                config_generation: 2,
                interrupt_status: 1,
                config_msix_vector: NO_VECTOR,
                device: vmkit_migration::Section {
                    name: "vmkit-virtio/testdev".into(),
                    version: 1,
                    state: vmkit_migration::Value::Null,
                },
            },
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The version-1 encoding, frozen: a change of the serialised form must bump the
    /// version and add an upgrade step, not silently change these bytes.
    const V1: &str = concat!(
        "a3646e616d6571766d6b69742d76697274696f2f6d6d696f6776657273696f6e01657374617465a2",
        "64626173651ad0000000697472616e73706f7274ad6b6465766963655f7479706504667374617475",
        "730f6b6e656564735f7265736574f4756465766963655f666561747572655f73656c656374017564",
        "72697665725f666561747572655f73656c656374016f6472697665725f66656174757265731b0000",
        "0001200000006e61636b65645f66656174757265731b00000001200000006c71756575655f73656c",
        "656374006671756575657381a96473697a651840657265616479f56a646573635f7461626c651a00",
        "1000006a617661696c5f72696e671a0010100069757365645f72696e671a001020006a6e6578745f",
        "617661696c07696e6578745f7573656407696576656e745f696478f56b6d7369785f766563746f72",
        "19ffff71636f6e6669675f67656e65726174696f6e0270696e746572727570745f73746174757301",
        "72636f6e6669675f6d7369785f766563746f7219ffff66646576696365a3646e616d6574766d6b69",
        "742d76697274696f2f746573746465766776657273696f6e01657374617465f6",
    );

    #[test]
    fn version_1_encoding_is_stable() {
        let bytes = vmkit_migration::encode(&sample()).unwrap();
        if std::env::var_os("VMKIT_BLESS").is_some() {
            println!("{}", hex(&bytes));
        }
        assert_eq!(hex(&bytes), V1);
        let back: VirtioMmioState = vmkit_migration::decode(&bytes).unwrap();
        assert_eq!(back, sample());
    }
}
