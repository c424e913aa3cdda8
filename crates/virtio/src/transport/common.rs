// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The transport core shared by virtio-mmio and virtio-pci: device status state machine,
//! feature windows, queue configuration, notification eventfds and their ioeventfd
//! registrations, interrupt status and configuration generation, and transport state.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};
use vmkit_device::{InterruptError, IoEventAddress, IoEventMatch, IoEventSpace};
use vmkit_migration::{Section, VersionedState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::TransportError;
use crate::device::{
    features, status, ActivateContext, ActiveQueue, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType, VirtioMemory,
};

/// "No MSI-X vector" (`VIRTIO_MSI_NO_VECTOR`): the driver assigned none.
pub const NO_VECTOR: u16 = 0xffff;

/// Feature bits the transports do not implement and never offer, whatever the device
/// says: packed rings (34), SR-IOV (37), notification data (38), notification config data
/// (39), queue reset (40) and admin virtqueues (41).
pub const TRANSPORT_UNSUPPORTED_FEATURES: u64 =
    (1 << 34) | (1 << 37) | (1 << 38) | (1 << 39) | (1 << 40) | (1 << 41);

/// Interrupt status bit: a queue has new used buffers.
pub const INTERRUPT_STATUS_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INTERRUPT_STATUS_CONFIG_CHANGED: u32 = 2;

/// State shared, lock-free, between the transport (vCPU threads) and the interrupt handle
/// the device's workers hold. Workers never take the transport lock, so a device can stop
/// its workers from `reset` (called under that lock) without deadlocking.
pub(crate) struct Shared {
    /// Interrupt status (ISR / InterruptStatus).
    pub(crate) isr: AtomicU32,
    /// `DEVICE_NEEDS_RESET` set by the device or by a failed activation.
    pub(crate) needs_reset: AtomicBool,
    /// Configuration generation counter.
    pub(crate) config_generation: AtomicU32,
    /// MSI-X vector for configuration changes.
    pub(crate) config_vector: AtomicU16,
    /// MSI-X vector per queue.
    pub(crate) queue_vectors: Vec<AtomicU16>,
}

impl Shared {
    fn new(queues: usize) -> Self {
        Self {
            isr: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        }
    }

    /// The MSI-X vector assigned to `kind` (`NO_VECTOR` when none).
    pub(crate) fn vector(&self, kind: VirtioInterruptType) -> u16 {
        match kind {
            VirtioInterruptType::Config => self.config_vector.load(Ordering::Acquire),
            VirtioInterruptType::Queue(q) => self
                .queue_vectors
                .get(usize::from(q))
                .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire)),
        }
    }
}

/// How a transport delivers an interrupt once the interrupt status is updated.
pub(crate) trait InterruptSink: Send + Sync {
    /// Delivers the interrupt for `kind`.
    fn raise(&self, shared: &Shared, kind: VirtioInterruptType) -> Result<(), InterruptError>;

    /// An eventfd that delivers the interrupt for `kind` when written, if there is one.
    fn notifier(&self, shared: &Shared, kind: VirtioInterruptType) -> Option<&EventFd> {
        let _ = (shared, kind);
        None
    }
}

/// The [`VirtioInterrupt`] handed to devices by both transports.
pub(crate) struct TransportInterrupt {
    pub(crate) shared: Arc<Shared>,
    pub(crate) sink: Arc<dyn InterruptSink>,
}

impl VirtioInterrupt for TransportInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> Result<(), InterruptError> {
        let bit = match kind {
            VirtioInterruptType::Config => {
                self.shared.config_generation.fetch_add(1, Ordering::AcqRel);
                INTERRUPT_STATUS_CONFIG_CHANGED
            }
            VirtioInterruptType::Queue(_) => INTERRUPT_STATUS_USED_RING,
        };
        self.shared.isr.fetch_or(bit, Ordering::AcqRel);
        self.sink.raise(&self.shared, kind)
    }

    fn notifier(&self, kind: VirtioInterruptType) -> Option<&EventFd> {
        self.sink.notifier(&self.shared, kind)
    }

    fn set_needs_reset(&self) {
        self.shared.needs_reset.store(true, Ordering::Release);
        if let Err(e) = self.trigger(VirtioInterruptType::Config) {
            log::warn!("virtio: cannot raise the configuration interrupt: {e}");
        }
    }
}

struct QueueSlot {
    queue: Queue,
    notify: EventFd,
}

/// A notification address a transport wants an ioeventfd on, per queue.
pub(crate) type NotifyAddress = Option<(IoEventAddress, IoEventMatch)>;

/// Saved state of one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver enabled it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` in use.
    pub event_idx: bool,
    /// MSI-X vector (virtio-pci; `NO_VECTOR` elsewhere).
    pub msix_vector: u16,
}

/// Saved state of a virtio transport and its device (both transports use it; virtio-pci
/// adds its configuration space around it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    /// Virtio device type of the device the state belongs to.
    pub device_type: u32,
    /// Device status as the driver set it (without `DEVICE_NEEDS_RESET`).
    pub status: u8,
    /// `DEVICE_NEEDS_RESET` was set.
    pub needs_reset: bool,
    /// Device feature window selector.
    pub device_feature_select: u32,
    /// Driver feature window selector.
    pub driver_feature_select: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// Features agreed at `FEATURES_OK`.
    pub acked_features: u64,
    /// Selected queue.
    pub queue_select: u16,
    /// Every queue of the device.
    pub queues: Vec<QueueSnapshot>,
    /// Configuration generation.
    pub config_generation: u32,
    /// Pending interrupt status bits.
    pub interrupt_status: u32,
    /// MSI-X vector for configuration changes (virtio-pci).
    pub config_msix_vector: u16,
    /// The device's own section ([`VirtioDevice::save_state`]).
    pub device: Section,
}

impl VersionedState for TransportState {
    const NAME: &'static str = "vmkit-virtio/transport";
    const VERSION: u16 = 1;
}

/// The transport core: everything virtio-mmio and virtio-pci have in common.
pub(crate) struct Core {
    device: Box<dyn VirtioDevice>,
    mem: VirtioMemory,
    pub(crate) shared: Arc<Shared>,
    sink: Arc<dyn InterruptSink>,
    offered: u64,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    driver_features_beyond_64: bool,
    acked_features: u64,
    queue_select: u16,
    queues: Vec<QueueSlot>,
    active: bool,
    ioevents: Option<Arc<dyn IoEventSpace>>,
    notify_addresses: Vec<NotifyAddress>,
    registered: Vec<(usize, IoEventAddress, IoEventMatch)>,
}

fn lo(v: u64) -> u32 {
    v as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

impl Core {
    /// Wraps `device`. Fails when the device reports no queues or a bad maximum size.
    pub(crate) fn new(
        device: Box<dyn VirtioDevice>,
        mem: VirtioMemory,
        sink: Arc<dyn InterruptSink>,
        ioevents: Option<Arc<dyn IoEventSpace>>,
    ) -> Result<Self, TransportError> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.is_empty() || max_sizes.len() > usize::from(u16::MAX) {
            return Err(TransportError::QueueCount(max_sizes.len()));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, max) in max_sizes.iter().enumerate() {
            let queue =
                Queue::new(*max).map_err(|_| TransportError::QueueMaxSize { index, max: *max })?;
            let notify = EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?;
            queues.push(QueueSlot { queue, notify });
        }
        let offered = device.device_features() & !TRANSPORT_UNSUPPORTED_FEATURES;
        Ok(Self {
            shared: Arc::new(Shared::new(queues.len())),
            notify_addresses: vec![None; queues.len()],
            device,
            mem,
            sink,
            offered,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            driver_features_beyond_64: false,
            acked_features: 0,
            queue_select: 0,
            queues,
            active: false,
            ioevents,
            registered: Vec::new(),
        })
    }

    pub(crate) fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub(crate) fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Device status as the driver reads it.
    pub(crate) fn status(&self) -> u8 {
        let mut s = self.status;
        if self.shared.needs_reset.load(Ordering::Acquire) {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active
    }

    fn features_locked(&self) -> bool {
        self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER_OK != 0
    }

    fn queues_locked(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    // ---- feature windows -------------------------------------------------------------

    pub(crate) fn device_feature_select(&self) -> u32 {
        self.device_feature_select
    }

    pub(crate) fn set_device_feature_select(&mut self, v: u32) {
        self.device_feature_select = v;
    }

    pub(crate) fn device_features_window(&self) -> u32 {
        match self.device_feature_select {
            0 => lo(self.offered),
            1 => hi(self.offered),
            _ => 0,
        }
    }

    pub(crate) fn driver_feature_select(&self) -> u32 {
        self.driver_feature_select
    }

    pub(crate) fn set_driver_feature_select(&mut self, v: u32) {
        self.driver_feature_select = v;
    }

    pub(crate) fn driver_features_window(&self) -> u32 {
        match self.driver_feature_select {
            0 => lo(self.driver_features),
            1 => hi(self.driver_features),
            _ => 0,
        }
    }

    /// A driver write to the driver-features window. Ignored once `FEATURES_OK` is set.
    pub(crate) fn set_driver_features_window(&mut self, v: u32) {
        if self.features_locked() {
            return;
        }
        let v = u64::from(v);
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            // Feature bits beyond 64 do not exist: a set bit is an unoffered feature, which
            // FEATURES_OK then refuses.
            _ => {
                if v != 0 {
                    self.driver_features_beyond_64 = true;
                }
            }
        }
    }

    // ---- queues ----------------------------------------------------------------------

    pub(crate) fn queue_select(&self) -> u16 {
        self.queue_select
    }

    pub(crate) fn set_queue_select(&mut self, v: u16) {
        self.queue_select = v;
    }

    fn selected(&self) -> Option<&QueueSlot> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn selected_mut(&mut self) -> Option<&mut QueueSlot> {
        if self.queues_locked() {
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_select))
    }

    pub(crate) fn queue_max_size(&self) -> u16 {
        self.selected().map_or(0, |q| q.queue.max_size())
    }

    pub(crate) fn queue_size(&self) -> u16 {
        self.selected().map_or(0, |q| q.queue.size())
    }

    /// Sets the selected queue's size; a size that is zero, not a power of two or above
    /// the maximum is ignored.
    pub(crate) fn set_queue_size(&mut self, size: u16) {
        if let Some(q) = self.selected_mut() {
            if !q.queue.ready() && q.queue.try_set_size(size).is_err() {
                log::debug!("virtio: ignoring queue size {size}");
            }
        }
    }

    pub(crate) fn queue_ready(&self) -> bool {
        self.selected().is_some_and(|q| q.queue.ready())
    }

    /// Enables or disables the selected queue. Enabling a queue whose rings do not lie in
    /// guest memory is refused (it reads back as disabled and is not activated).
    pub(crate) fn set_queue_ready(&mut self, ready: bool) {
        let mem = self.mem.memory();
        let Some(slot) = self.queues.get_mut(usize::from(self.queue_select)) else {
            return;
        };
        if self.status & status::DRIVER_OK != 0 {
            return;
        }
        slot.queue.set_ready(ready);
        if ready && !slot.queue.is_valid(&*mem) {
            log::warn!(
                "virtio: queue {} rings are not in guest memory; not enabling it",
                self.queue_select
            );
            slot.queue.set_ready(false);
        }
    }

    pub(crate) fn queue_desc(&self) -> u64 {
        self.selected().map_or(0, |q| q.queue.desc_table())
    }

    pub(crate) fn queue_avail(&self) -> u64 {
        self.selected().map_or(0, |q| q.queue.avail_ring())
    }

    pub(crate) fn queue_used(&self) -> u64 {
        self.selected().map_or(0, |q| q.queue.used_ring())
    }

    /// Writes half (`high == false`: bits 0..32) of a ring address of the selected queue.
    /// `ring` 0 = descriptor table, 1 = available ring, 2 = used ring. Ignored while the
    /// queue is enabled; misaligned addresses are ignored.
    pub(crate) fn set_queue_address(&mut self, ring: u8, high: bool, v: u32) {
        let Some(q) = self.selected_mut() else {
            return;
        };
        if q.queue.ready() {
            return;
        }
        let (lo_v, hi_v) = if high {
            (None, Some(v))
        } else {
            (Some(v), None)
        };
        match ring {
            0 => q.queue.set_desc_table_address(lo_v, hi_v),
            1 => q.queue.set_avail_ring_address(lo_v, hi_v),
            _ => q.queue.set_used_ring_address(lo_v, hi_v),
        }
    }

    pub(crate) fn queue_vector(&self) -> u16 {
        self.shared
            .queue_vectors
            .get(usize::from(self.queue_select))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    /// Assigns an MSI-X vector to the selected queue; `valid` says whether the transport
    /// can deliver `vector` (otherwise `NO_VECTOR` is stored, which the driver reads back).
    pub(crate) fn set_queue_vector(&mut self, vector: u16, valid: bool) {
        if let Some(v) = self
            .shared
            .queue_vectors
            .get(usize::from(self.queue_select))
        {
            v.store(if valid { vector } else { NO_VECTOR }, Ordering::Release);
        }
    }

    pub(crate) fn config_vector(&self) -> u16 {
        self.shared.config_vector.load(Ordering::Acquire)
    }

    pub(crate) fn set_config_vector(&mut self, vector: u16, valid: bool) {
        self.shared
            .config_vector
            .store(if valid { vector } else { NO_VECTOR }, Ordering::Release);
    }

    /// A notification that reached the bus (no ioeventfd caught it): signal the queue's
    /// eventfd. Unknown queues are ignored.
    pub(crate) fn notify(&self, index: usize) {
        if let Some(q) = self.queues.get(index) {
            if let Err(e) = q.notify.write(1) {
                log::warn!("virtio: cannot signal queue {index}: {e}");
            }
        }
    }

    // ---- config space ----------------------------------------------------------------

    pub(crate) fn config_generation(&self) -> u32 {
        self.shared.config_generation.load(Ordering::Acquire)
    }

    pub(crate) fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        self.device.read_config(offset, data);
    }

    pub(crate) fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data);
    }

    /// Reads and clears (`clear == true`, PCI ISR) or only reads the interrupt status.
    pub(crate) fn interrupt_status(&self, clear: bool) -> u32 {
        if clear {
            self.shared.isr.swap(0, Ordering::AcqRel)
        } else {
            self.shared.isr.load(Ordering::Acquire)
        }
    }

    /// Acknowledges interrupt status bits; returns the bits still pending.
    pub(crate) fn ack_interrupt(&self, bits: u32) -> u32 {
        self.shared.isr.fetch_and(!bits, Ordering::AcqRel) & !bits
    }

    // ---- notifications ---------------------------------------------------------------

    /// Sets where each queue's notifications are written, re-registering the ioeventfds of
    /// an active device at the new addresses.
    pub(crate) fn set_notify_addresses(&mut self, addresses: Vec<NotifyAddress>) {
        self.unregister_ioevents();
        self.notify_addresses = addresses;
        if self.active {
            self.register_ioevents();
        }
    }

    fn register_ioevents(&mut self) {
        let Some(space) = self.ioevents.clone() else {
            return;
        };
        for (index, addr) in self.notify_addresses.iter().enumerate() {
            let (Some((address, filter)), Some(slot)) = (addr, self.queues.get(index)) else {
                continue;
            };
            match space.register(*address, *filter, &slot.notify) {
                Ok(()) => self.registered.push((index, *address, *filter)),
                // The write then reaches the bus, which signals the same eventfd.
                Err(e) => log::warn!("virtio: no ioeventfd for queue {index}: {e}"),
            }
        }
    }

    fn unregister_ioevents(&mut self) {
        let Some(space) = self.ioevents.clone() else {
            self.registered.clear();
            return;
        };
        for (index, address, filter) in self.registered.drain(..) {
            if let Some(slot) = self.queues.get(index) {
                if let Err(e) = space.unregister(address, filter, &slot.notify) {
                    log::warn!("virtio: cannot remove the ioeventfd of queue {index}: {e}");
                }
            }
        }
    }

    // ---- status ----------------------------------------------------------------------

    /// A driver write to the device status.
    pub(crate) fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver never clears bits (other than by writing 0): keep the ones set.
        let value = value & !status::DEVICE_NEEDS_RESET;
        let new_bits = value & !self.status;
        let mut next = self.status | new_bits;

        if new_bits & status::FEATURES_OK != 0 && !self.try_features_ok(next) {
            next &= !status::FEATURES_OK;
        }
        if new_bits & status::DRIVER_OK != 0 {
            if next & status::FEATURES_OK == 0 {
                log::warn!("virtio: DRIVER_OK without FEATURES_OK ignored");
                next &= !status::DRIVER_OK;
            } else {
                self.status = next;
                self.activate();
                return;
            }
        }
        self.status = next;
    }

    /// `next` is the status the write asks for: a driver may set ACKNOWLEDGE, DRIVER and
    /// FEATURES_OK in one write.
    fn try_features_ok(&mut self, next: u8) -> bool {
        let wanted = self.driver_features;
        if next & (status::ACKNOWLEDGE | status::DRIVER) != (status::ACKNOWLEDGE | status::DRIVER) {
            log::debug!("virtio: FEATURES_OK before ACKNOWLEDGE and DRIVER refused");
            return false;
        }
        if wanted & !self.offered != 0 || self.driver_features_beyond_64 {
            log::warn!(
                "virtio: driver accepted unoffered features {:#x}",
                wanted & !self.offered
            );
            return false;
        }
        if wanted & features::VERSION_1 == 0 {
            log::warn!("virtio: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        match self.device.negotiate_features(wanted) {
            Ok(()) => {
                self.acked_features = wanted;
                true
            }
            Err(e) => {
                log::warn!("virtio: device refused features {wanted:#x}: {e}");
                false
            }
        }
    }

    fn activate(&mut self) {
        let mem = self.mem.memory();
        let event_idx = self.acked_features & features::RING_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (index, slot) in self.queues.iter_mut().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            if !slot.queue.is_valid(&*mem) {
                log::debug!("virtio: queue {index} is not valid; left out of activation");
                continue;
            }
            slot.queue.set_event_idx(event_idx);
            let notify = match slot.notify.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    log::error!("virtio: cannot clone the notify eventfd of queue {index}: {e}");
                    // NEEDS_RESET after DRIVER_OK comes with a configuration interrupt.
                    let interrupt = TransportInterrupt {
                        shared: Arc::clone(&self.shared),
                        sink: Arc::clone(&self.sink),
                    };
                    interrupt.set_needs_reset();
                    return;
                }
            };
            // virtio-queue's Queue is not Clone; its state round trip is exact.
            let queue = match Queue::try_from(slot.queue.state()) {
                Ok(q) => q,
                Err(e) => {
                    log::warn!("virtio: queue {index} cannot be handed over: {e}");
                    continue;
                }
            };
            active.push(ActiveQueue {
                index: index as u16,
                queue,
                notify,
            });
        }
        drop(mem);
        self.register_ioevents();
        let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(TransportInterrupt {
            shared: Arc::clone(&self.shared),
            sink: Arc::clone(&self.sink),
        });
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: active,
            interrupt: Arc::clone(&interrupt),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => self.active = true,
            Err(e) => {
                log::warn!("virtio: activation failed: {e}");
                self.unregister_ioevents();
                interrupt.set_needs_reset();
            }
        }
    }

    /// Device reset (status 0): stops the device, returns every register to its default.
    pub(crate) fn reset(&mut self) {
        self.unregister_ioevents();
        self.device.reset();
        self.active = false;
        self.status = 0;
        self.acked_features = 0;
        self.driver_features = 0;
        self.driver_features_beyond_64 = false;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for slot in &mut self.queues {
            slot.queue.reset();
            // Drop notifications nobody will read.
            let _ = slot.notify.read();
        }
        self.shared.isr.store(0, Ordering::Release);
        self.shared.needs_reset.store(false, Ordering::Release);
        self.shared
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
        for v in &self.shared.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        // The device may offer other features after a reset (e.g. a backend changed).
        self.offered = self.device.device_features() & !TRANSPORT_UNSUPPORTED_FEATURES;
    }

    // ---- pause / state ---------------------------------------------------------------

    pub(crate) fn pause(&mut self) -> Result<(), TransportError> {
        self.device.pause().map_err(TransportError::Device)
    }

    pub(crate) fn resume(&mut self) -> Result<(), TransportError> {
        self.device.resume().map_err(TransportError::Device)
    }

    fn used_idx(&self, used_ring: u64) -> Option<u16> {
        let mem = self.mem.memory();
        let addr = GuestAddress(used_ring).checked_add(2)?;
        mem.read_obj::<u16>(addr).ok().map(u16::from_le)
    }

    /// Saves the transport and device state. The device should be paused.
    pub(crate) fn save(&self) -> Result<TransportState, TransportError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, slot) in self.queues.iter().enumerate() {
            let q = &slot.queue;
            let (next_avail, next_used) = if self.active && q.ready() {
                match self.device.queue_positions(index as u16) {
                    Some(p) => p,
                    None => {
                        let used = self.used_idx(q.used_ring()).unwrap_or(q.next_used());
                        (used, used)
                    }
                }
            } else {
                (q.next_avail(), q.next_used())
            };
            queues.push(QueueSnapshot {
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                next_avail,
                next_used,
                event_idx: q.event_idx_enabled(),
                msix_vector: self.shared.vector(VirtioInterruptType::Queue(index as u16)),
            });
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            needs_reset: self.shared.needs_reset.load(Ordering::Acquire),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            queues,
            config_generation: self.config_generation(),
            interrupt_status: self.shared.isr.load(Ordering::Acquire),
            config_msix_vector: self.config_vector(),
            device: self.device.save_state().map_err(TransportError::Device)?,
        })
    }

    /// Applies `state` to a freshly built core (nothing negotiated yet) and re-activates a
    /// device that was `DRIVER_OK`. `vector_valid` checks saved MSI-X vectors.
    pub(crate) fn restore(
        &mut self,
        state: &TransportState,
        vector_valid: impl Fn(u16) -> bool,
    ) -> Result<(), TransportError> {
        let invalid = |reason: String| TransportError::InvalidState(reason);
        if state.device_type != self.device.device_type() {
            return Err(invalid(format!(
                "state is for device type {}, device is type {}",
                state.device_type,
                self.device.device_type()
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(invalid(format!(
                "state has {} queues, device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        if state.acked_features & !self.offered != 0 {
            return Err(invalid(format!(
                "negotiated features {:#x} are not offered by the device ({:#x})",
                state.acked_features, self.offered
            )));
        }
        let check_vector = |v: u16| v == NO_VECTOR || vector_valid(v);
        if !check_vector(state.config_msix_vector) {
            return Err(invalid(format!(
                "configuration MSI-X vector {}",
                state.config_msix_vector
            )));
        }
        let mut rebuilt = Vec::with_capacity(state.queues.len());
        for (index, (saved, slot)) in state.queues.iter().zip(&self.queues).enumerate() {
            let mut q = Queue::new(slot.queue.max_size())
                .map_err(|e| invalid(format!("queue {index}: {e}")))?;
            q.try_set_size(saved.size)
                .map_err(|e| invalid(format!("queue {index} size {}: {e}", saved.size)))?;
            q.try_set_desc_table_address(GuestAddress(saved.desc_table))
                .map_err(|e| invalid(format!("queue {index}: {e}")))?;
            q.try_set_avail_ring_address(GuestAddress(saved.avail_ring))
                .map_err(|e| invalid(format!("queue {index}: {e}")))?;
            q.try_set_used_ring_address(GuestAddress(saved.used_ring))
                .map_err(|e| invalid(format!("queue {index}: {e}")))?;
            q.set_next_avail(saved.next_avail);
            q.set_next_used(saved.next_used);
            q.set_event_idx(saved.event_idx);
            q.set_ready(saved.ready);
            if !check_vector(saved.msix_vector) {
                return Err(invalid(format!(
                    "queue {index} MSI-X vector {}",
                    saved.msix_vector
                )));
            }
            rebuilt.push(q);
        }
        self.device
            .restore_state(&state.device)
            .map_err(TransportError::Device)?;
        for (slot, q) in self.queues.iter_mut().zip(rebuilt) {
            slot.queue = q;
        }
        for (v, saved) in self.shared.queue_vectors.iter().zip(&state.queues) {
            v.store(saved.msix_vector, Ordering::Release);
        }
        self.shared
            .config_vector
            .store(state.config_msix_vector, Ordering::Release);
        self.shared
            .config_generation
            .store(state.config_generation, Ordering::Release);
        self.shared
            .isr
            .store(state.interrupt_status, Ordering::Release);
        self.shared
            .needs_reset
            .store(state.needs_reset, Ordering::Release);
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.status = state.status & !status::DEVICE_NEEDS_RESET;
        if self.status & status::FEATURES_OK != 0 {
            self.device
                .negotiate_features(state.acked_features)
                .map_err(TransportError::Device)?;
        }
        if self.status & status::DRIVER_OK != 0 && !state.needs_reset {
            self.activate();
            if !self.active {
                return Err(TransportError::Device(crate::VirtioError::Activate(
                    "the restored device did not activate".into(),
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.unregister_ioevents();
        if self.active {
            self.device.reset();
        }
    }
}
