// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio-rng (virtio 1.2, section 5.4): fills the driver's device-writable buffers with
//! bytes from the host's `getrandom(2)`.
//!
//! ```
//! use vmkit_virtio::devices::rng::Rng;
//! use vmkit_virtio::VirtioDevice;
//!
//! let rng = Rng::new(256).expect("valid queue size");
//! assert_eq!(rng.device_type(), vmkit_virtio::device_type::RNG);
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddressSpace};
use vmkit_migration::{decode_section, encode_section, Section, VersionedState};

use super::worker::{EventControl, EventHandler, Parked, WorkerSet};
use super::{drain_queue, GuestMem};
use crate::{
    device_type, features, ActivateContext, VirtioDevice, VirtioError, VirtioInterrupt,
    VirtioMemory,
};

/// Most bytes written into one request (one descriptor chain); a larger buffer gets this
/// many bytes and the used length says so.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// Errors building an entropy device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RngError {
    /// The queue size is not a power of two in 1..=32768.
    #[error("virtio-rng: queue size {0} is not a power of two between 1 and 32768")]
    QueueSize(u16),
}

/// Fills `buf` from `getrandom(2)`, retrying on `EINTR` and short reads.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes owned by us for
        // the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Processes one chain: random bytes into its writable descriptors, up to
/// [`MAX_BYTES_PER_REQUEST`]. Returns the bytes written (the used length). Readable
/// descriptors and descriptors outside guest memory are skipped.
pub fn process_chain(chain: DescriptorChain<&GuestMem>, mem: &GuestMem) -> u32 {
    let mut written = 0u32;
    let mut buf = [0u8; 4096];
    for desc in chain.writable() {
        let mut addr = desc.addr();
        let mut left = desc.len().min(MAX_BYTES_PER_REQUEST - written);
        while left > 0 {
            let n = (left as usize).min(buf.len());
            let chunk = &mut buf[..n];
            if let Err(e) = fill_random(chunk) {
                log::error!("virtio-rng: getrandom failed: {e}");
                return written;
            }
            if mem.write_slice(chunk, addr).is_err() {
                // Outside guest memory: what was written so far is what the driver gets.
                return written;
            }
            written += n as u32;
            left -= n as u32;
            addr = match addr.checked_add(n as u64) {
                Some(a) => a,
                None => return written,
            };
        }
        if written >= MAX_BYTES_PER_REQUEST {
            break;
        }
    }
    written
}

/// The queue handler of virtio-rng: usable without a thread ([`RngHandler::process`]).
pub struct RngHandler {
    mem: VirtioMemory,
    queue: Queue,
    index: u16,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl RngHandler {
    /// A handler serving `queue` (queue `index` of the device).
    pub fn new(
        mem: VirtioMemory,
        queue: Queue,
        index: u16,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        RngHandler {
            mem,
            queue,
            index,
            interrupt,
        }
    }

    /// Serves every available chain; returns how many were completed.
    pub fn process(&mut self) -> usize {
        let guard = self.mem.memory();
        let mem: &GuestMem = &guard;
        drain_queue(
            &mut self.queue,
            self.index,
            mem,
            self.interrupt.as_ref(),
            |chain| process_chain(chain, mem),
        )
    }
}

impl EventHandler for RngHandler {
    fn start(&mut self, _ctl: &EventControl<'_>) {
        // Buffers posted before activation (or while paused) are served now.
        self.process();
    }

    fn queue_notified(&mut self, _slot: usize, _ctl: &EventControl<'_>) {
        self.process();
    }
}

/// Saved state of the entropy device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// Negotiated features.
    pub acked_features: u64,
    /// Maximum queue size the device was built with.
    pub queue_size: u16,
}

impl VersionedState for RngState {
    const NAME: &'static str = "vmkit-virtio/rng";
    const VERSION: u16 = 1;
}

/// The virtio-rng device: one request queue.
pub struct Rng {
    queue_size: u16,
    acked_features: u64,
    workers: WorkerSet<RngHandler>,
}

impl Rng {
    /// An entropy device whose queue holds at most `queue_size` entries (a power of two).
    pub fn new(queue_size: u16) -> Result<Self, RngError> {
        if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > 32768 {
            return Err(RngError::QueueSize(queue_size));
        }
        Ok(Rng {
            queue_size,
            acked_features: 0,
            workers: WorkerSet::new("virtio-rng"),
        })
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size]
    }

    fn device_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    fn negotiate_features(&mut self, features: u64) -> Result<(), VirtioError> {
        if features & !self.device_features() != 0 {
            return Err(VirtioError::Features(features));
        }
        self.acked_features = features;
        Ok(())
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-rng: ignored config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        self.workers.clear();
        let mut queues = ctx.queues.into_iter();
        let q = match queues.next() {
            Some(q) if q.index == 0 => q,
            _ => {
                return Err(VirtioError::Queue {
                    index: 0,
                    reason: "the request queue is not enabled".into(),
                })
            }
        };
        let handler = RngHandler::new(ctx.mem, q.queue, 0, ctx.interrupt);
        self.workers
            .start(vec![Parked {
                handler,
                notifiers: vec![q.notify],
            }])
            .map_err(|e| VirtioError::Activate(format!("virtio-rng worker: {e}")))
    }

    fn reset(&mut self) {
        self.workers.clear();
        self.acked_features = 0;
    }

    fn save_state(&self) -> Result<Section, VirtioError> {
        encode_section(&RngState {
            acked_features: self.acked_features,
            queue_size: self.queue_size,
        })
        .map_err(|e| VirtioError::State(e.to_string()))
    }

    fn restore_state(&mut self, state: &Section) -> Result<(), VirtioError> {
        let s: RngState = decode_section(state).map_err(|e| VirtioError::State(e.to_string()))?;
        if s.queue_size != self.queue_size {
            return Err(VirtioError::State(format!(
                "virtio-rng: saved queue size {} differs from this device's {}",
                s.queue_size, self.queue_size
            )));
        }
        if s.acked_features & !self.device_features() != 0 {
            return Err(VirtioError::State(format!(
                "virtio-rng: saved features {:#x} not offered by this device",
                s.acked_features
            )));
        }
        self.acked_features = s.acked_features;
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VirtioError> {
        self.workers.pause();
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        self.workers
            .resume()
            .map_err(|e| VirtioError::Activate(format!("virtio-rng worker: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::devices::testutil::{atomic, memory, TestInterrupt, TestQueue, D};
    use crate::{ActiveQueue, VirtioInterruptType};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn handler(mem: &GuestMem, tq: &TestQueue<'_>) -> (RngHandler, Arc<TestInterrupt>) {
        let irq = Arc::new(TestInterrupt::default());
        let h = RngHandler::new(atomic(mem), tq.queue(), 0, irq.clone());
        (h, irq)
    }

    #[test]
    fn fills_direct_and_indirect_chains() {
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        tq.add(&[D(0x10_0000, 256, true), D(0x10_1000, 256, true)]);
        tq.add_indirect(&[D(0x20_0000, 100, true)]);
        let (mut h, irq) = handler(&mem, &tq);
        assert_eq!(h.process(), 2);
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(tq.used(0), (0, 512));
        assert_eq!(tq.used(1).1, 100);
        let mut buf = [0u8; 256];
        mem.read_slice(&mut buf, GuestAddress(0x10_1000)).unwrap();
        assert!(buf.iter().any(|b| *b != 0), "random bytes were written");
        assert_eq!(irq.count(VirtioInterruptType::Queue(0)), 1);
    }

    #[test]
    fn caps_and_skips_bad_descriptors() {
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        // Larger than the cap.
        tq.add(&[D(0x10_0000, 2 * MAX_BYTES_PER_REQUEST, true)]);
        // Readable only: nothing written.
        tq.add(&[D(0x10_0000, 64, false)]);
        // Outside guest memory.
        tq.add(&[D(0xffff_0000_0000, 64, true)]);
        let (mut h, irq) = handler(&mem, &tq);
        assert_eq!(h.process(), 3);
        assert_eq!(tq.used(0).1, MAX_BYTES_PER_REQUEST);
        assert_eq!(tq.used(1).1, 0);
        assert_eq!(tq.used(2).1, 0);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn activate_reset_activate() {
        let mem = memory();
        let mut rng = Rng::new(16).unwrap();
        assert!(Rng::new(3).is_err());
        rng.negotiate_features(rng.device_features()).unwrap();
        for round in 0..2u16 {
            let mut tq = TestQueue::new(&mem, 0, 16);
            tq.add(&[D(0x10_0000, 32, true)]);
            let irq = Arc::new(TestInterrupt::default());
            let notify = EventFd::new(EFD_NONBLOCK).unwrap();
            let kick = notify.try_clone().unwrap();
            rng.activate(ActivateContext {
                mem: atomic(&mem),
                queues: vec![ActiveQueue {
                    index: 0,
                    queue: tq.queue(),
                    notify,
                }],
                interrupt: irq.clone(),
                acked_features: rng.acked_features(),
            })
            .unwrap();
            assert!(
                irq.wait_for(VirtioInterruptType::Queue(0), 1),
                "round {round}"
            );
            rng.pause().unwrap();
            tq.add(&[D(0x10_0000, 32, true)]);
            kick.write(1).unwrap();
            rng.resume().unwrap();
            assert!(
                irq.wait_for(VirtioInterruptType::Queue(0), 2),
                "round {round}"
            );
            assert_eq!(tq.used_idx(), 2);
            rng.reset();
            assert_eq!(rng.acked_features(), 0);
            rng.negotiate_features(features::VERSION_1).unwrap();
        }
        let saved = rng.save_state().unwrap();
        let mut other = Rng::new(16).unwrap();
        other.restore_state(&saved).unwrap();
        assert_eq!(other.acked_features(), features::VERSION_1);
        assert!(Rng::new(32).unwrap().restore_state(&saved).is_err());
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let irq = Arc::new(TestInterrupt::default());
        let mut q = tq.queue();
        q.set_event_idx(true);
        let mut h = RngHandler::new(atomic(&mem), q, 0, irq.clone());
        // The driver wants an interrupt only once used_idx passes 5.
        mem.write_obj(5u16, tq.used_event_addr()).unwrap();
        tq.add(&[D(0x10_0000, 8, true)]);
        assert_eq!(h.process(), 1);
        assert_eq!(irq.count(VirtioInterruptType::Queue(0)), 0);
        // Now after the next one (used_idx 1 -> 2 crosses used_event 1).
        mem.write_obj(1u16, tq.used_event_addr()).unwrap();
        tq.add(&[D(0x10_0000, 8, true)]);
        assert_eq!(h.process(), 1);
        assert_eq!(irq.count(VirtioInterruptType::Queue(0)), 1);
    }

    #[test]
    fn missing_queue_is_an_error() {
        let mem = memory();
        let mut rng = Rng::new(16).unwrap();
        let err = rng.activate(ActivateContext {
            mem: atomic(&mem),
            queues: vec![],
            interrupt: Arc::new(TestInterrupt::default()),
            acked_features: 0,
        });
        assert!(err.is_err());
    }
}

crate::virtio_conformance_tests!(
    conformance,
    Box::new(Rng::new(256).expect("queue size")),
    vec![crate::conformance::Probe::writable(0, &[64, 32])]
);
