// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The device models: [`block`] (virtio-blk), [`console`] (virtio-console with
//! `VIRTIO_CONSOLE_F_MULTIPORT`) and [`rng`] (virtio-rng), plus the [`worker`] threads that
//! serve their queues.
//!
//! Each device splits into a handler that processes a queue when asked (testable without
//! threads: pop chains, process them, `add_used`, signal) and the wiring in [`worker`] that
//! runs handlers on threads woken by epoll over the queues' notification eventfds.

pub mod block;
pub mod console;
pub mod rng;
pub mod worker;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

use crate::{VirtioInterrupt, VirtioInterruptType};

/// The guest memory type handlers work on (what `VirtioMemory::memory()` dereferences to).
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Raises the used-buffer interrupt of queue `index`, logging (not failing) on error.
pub(crate) fn signal_queue(interrupt: &dyn VirtioInterrupt, index: u16) {
    if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(index)) {
        log::warn!("virtio: queue {index} interrupt failed: {e}");
    }
}

/// Runs the standard "drain the available ring" loop on `queue`: notifications are
/// suppressed while chains are processed, every chain gets `process`'s used length, and the
/// driver is signalled once at the end if it asked to be (`EVENT_IDX` aware).
///
/// Returns the number of chains completed. A queue whose rings are not readable (addresses
/// outside guest memory) makes the device need a reset.
pub(crate) fn drain_queue<F>(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMem,
    interrupt: &dyn VirtioInterrupt,
    mut process: F,
) -> usize
where
    F: FnMut(DescriptorChain<&GuestMem>) -> u32,
{
    drain_queue_batched(queue, index, mem, interrupt, 1, &|| false, |chains| {
        chains.into_iter().map(&mut process).collect()
    })
}

/// Like [`drain_queue`], but hands `process` every chain available at once (at most
/// `max_batch`), so that a device can run them concurrently; `process` returns one used
/// length per chain, in the same order. Returns early, leaving chains in the ring, once
/// `stop` says so (checked between batches), so that a guest that keeps the queue busy
/// cannot hold up a reset or pause.
pub(crate) fn drain_queue_batched<F>(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMem,
    interrupt: &dyn VirtioInterrupt,
    max_batch: usize,
    stop: &dyn Fn() -> bool,
    mut process: F,
) -> usize
where
    F: FnMut(Vec<DescriptorChain<&GuestMem>>) -> Vec<u32>,
{
    let max_batch = max_batch.max(1);
    let mut done = 0usize;
    let result: Result<(), String> = (|| {
        loop {
            queue.disable_notification(mem).map_err(|e| e.to_string())?;
            loop {
                let mut chains = Vec::new();
                while chains.len() < max_batch {
                    match queue.pop_descriptor_chain(mem) {
                        Some(chain) => chains.push(chain),
                        None => break,
                    }
                }
                if chains.is_empty() {
                    break;
                }
                let heads: Vec<u16> = chains.iter().map(|c| c.head_index()).collect();
                let lens = process(chains);
                for (i, head) in heads.into_iter().enumerate() {
                    let len = lens.get(i).copied().unwrap_or(0);
                    queue
                        .add_used(mem, head, len)
                        .map_err(|e| format!("chain head {head}: {e}"))?;
                    done += 1;
                }
                if stop() {
                    return Ok(());
                }
            }
            if !queue.enable_notification(mem).map_err(|e| e.to_string())? {
                break;
            }
            check_avail_index(queue, mem)?;
        }
        Ok(())
    })();
    end_of_pass(queue, index, mem, interrupt, done, result);
    done
}

/// The end of a pass over a queue: a broken ring makes the device need a reset, and after
/// `done` completions the driver is signalled if it asked to be (`EVENT_IDX` aware).
pub(crate) fn end_of_pass(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMem,
    interrupt: &dyn VirtioInterrupt,
    done: usize,
    result: Result<(), String>,
) {
    if let Err(e) = result {
        log::error!("virtio: queue {index} is broken: {e}; device needs reset");
        interrupt.set_needs_reset();
    }
    if done > 0 {
        match queue.needs_notification(mem) {
            Ok(true) => signal_queue(interrupt, index),
            Ok(false) => {}
            Err(e) => {
                log::error!("virtio: queue {index}: reading used_event failed: {e}");
                interrupt.set_needs_reset();
            }
        }
    }
}

/// Fails if the driver's available index is more than a queue size ahead of the device's
/// position (virtio 1.2, 2.7.6: such a ring cannot be processed).
pub(crate) fn check_avail_index(queue: &Queue, mem: &GuestMem) -> Result<(), String> {
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(|e| e.to_string())?;
    let pending = avail.0.wrapping_sub(queue.next_avail());
    if pending > queue.size() {
        return Err(format!(
            "available index {} is {pending} entries ahead of {}",
            avail.0,
            queue.next_avail()
        ));
    }
    Ok(())
}

/// Test helpers shared by the device tests: guest memory, a recording interrupt and a
/// split-queue builder for direct and indirect chains.
#[cfg(test)]
pub(crate) mod testutil;
