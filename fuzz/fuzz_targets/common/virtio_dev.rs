// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The small virtio device the transport fuzz targets (virtio_mmio, virtio_pci) wrap: two
//! queues, 16 bytes of configuration, queues processed when the fuzzer asks.

use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmkit_migration::{decode_section, encode_section, Section, VersionedState};
use vmkit_virtio::{
    device_type, features, ActivateContext, ActiveQueue, VirtioDevice, VirtioError,
    VirtioInterrupt, VirtioInterruptType, VirtioMemory,
};

pub struct Active {
    pub mem: VirtioMemory,
    pub queues: Vec<ActiveQueue>,
    pub irq: Arc<dyn VirtioInterrupt>,
}

pub type Slot = Arc<Mutex<Option<Active>>>;

#[derive(Serialize, Deserialize)]
pub struct FuzzDevState {
    pub acked: u64,
    pub config: [u8; 16],
}

impl VersionedState for FuzzDevState {
    const NAME: &'static str = "fuzz/virtio-dev";
    const VERSION: u16 = 1;
}

/// Two queues, 16 bytes of configuration, queues processed on request.
pub struct FuzzDev {
    pub slot: Slot,
    pub acked: u64,
    pub config: [u8; 16],
}

impl VirtioDevice for FuzzDev {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 4]
    }

    fn device_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    fn negotiate_features(&mut self, f: u64) -> Result<(), VirtioError> {
        self.acked = f;
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get_mut(o))
            {
                *c = *b;
            }
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            irq: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.acked = 0;
    }

    fn save_state(&self) -> Result<Section, VirtioError> {
        encode_section(&FuzzDevState {
            acked: self.acked,
            config: self.config,
        })
        .map_err(|e| VirtioError::State(e.to_string()))
    }

    fn restore_state(&mut self, state: &Section) -> Result<(), VirtioError> {
        let s: FuzzDevState =
            decode_section(state).map_err(|e| VirtioError::State(e.to_string()))?;
        self.acked = s.acked;
        self.config = s.config;
        Ok(())
    }
}

pub fn process(slot: &Slot) {
    let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(active) = guard.as_mut() else {
        return;
    };
    let mem = active.mem.memory();
    for aq in &mut active.queues {
        for _ in 0..64 {
            let Some(chain) = aq.queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for d in chain {
                if d.is_write_only() {
                    let len = d.len().min(256) as usize;
                    if mem.write_slice(&vec![0x5a; len], d.addr()).is_ok() {
                        written += len as u32;
                    }
                }
            }
            if aq.queue.add_used(&*mem, head, written).is_err() {
                break;
            }
        }
        if aq.queue.needs_notification(&*mem).unwrap_or(true) {
            let _ = active.irq.trigger(VirtioInterruptType::Queue(aq.index));
        }
    }
}

/// Posts `head` on queue `q` (0: 16 entries, 1: 4 entries; rings laid out as the targets'
/// bring-up does) and returns the queue index to notify.
pub fn post_head(mem: &VirtioMemory, second_queue: bool, head: u16) -> u64 {
    let (q, size) = if second_queue { (1u64, 4u16) } else { (0, 16) };
    let avail = 0x1000 + q * 0x3000 + 0x1000;
    let m = mem.memory();
    if let Ok(idx) = m.read_obj::<u16>(GuestAddress(avail + 2)) {
        let slot_addr = avail + 4 + 2 * u64::from(idx % size);
        let _ = m.write_obj(head, GuestAddress(slot_addr));
        let _ = m.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
    }
    q
}

/// The activated device raises an interrupt (nothing when it is not active).
pub fn raise(slot: &Slot, config: bool, queue: u16) {
    let guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(a) = guard.as_ref() {
        let kind = if config {
            VirtioInterruptType::Config
        } else {
            VirtioInterruptType::Queue(queue)
        };
        let _ = a.irq.trigger(kind);
    }
}

/// The activated device asks for a reset (nothing when it is not active).
pub fn needs_reset(slot: &Slot) {
    let guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(a) = guard.as_ref() {
        a.irq.set_needs_reset();
    }
}
