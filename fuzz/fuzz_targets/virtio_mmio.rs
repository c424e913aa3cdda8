// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The virtio-mmio transport of vmkit-virtio under arbitrary register accesses (any offset,
//! any size, any value), arbitrary guest memory contents (rings included), device-side
//! queue processing and interrupts, and save/restore. Nothing may panic; a saved state
//! restores and saves again to an equal state.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmkit_device::testing::{CountingLine, RecordingIoEvents};
use vmkit_device::{BusDevice, InterruptLine, IoEventSpace, TriggerMode};
use vmkit_migration::{decode, encode, Pausable};
use vmkit_virtio::features;
use vmkit_virtio::transport::{mmio_regs as r, VirtioMmio, VirtioMmioState};

const MEM_SIZE: usize = 64 << 10;
const BASE: u64 = 0xd000_0000;

/// Registers worth hitting with full 32-bit writes.
const REGS: [u64; 22] = [
    r::DEVICE_FEATURES_SEL,
    r::DRIVER_FEATURES,
    r::DRIVER_FEATURES_SEL,
    r::QUEUE_SEL,
    r::QUEUE_NUM,
    r::QUEUE_READY,
    r::QUEUE_NOTIFY,
    r::INTERRUPT_ACK,
    r::STATUS,
    r::QUEUE_DESC_LOW,
    r::QUEUE_DESC_HIGH,
    r::QUEUE_DRIVER_LOW,
    r::QUEUE_DRIVER_HIGH,
    r::QUEUE_DEVICE_LOW,
    r::QUEUE_DEVICE_HIGH,
    r::SHM_SEL,
    r::QUEUE_RESET,
    r::CONFIG_GENERATION,
    r::MAGIC_VALUE,
    r::CONFIG,
    r::CONFIG + 4,
    r::INTERRUPT_STATUS,
];

#[derive(Arbitrary, Debug)]
enum Op {
    /// A read of up to 8 bytes anywhere in (or beyond) the window.
    Read { offset: u16, size: u8 },
    /// A write of up to 8 bytes anywhere.
    Write { offset: u16, data: Vec<u8> },
    /// A 32-bit write of `value` to a known register.
    Reg { reg: u8, value: u32 },
    /// A register write that is likely to be accepted: a small guest address or size.
    SmallReg { reg: u8, value: u16 },
    /// Guest memory contents (rings, descriptors, buffers).
    Mem { addr: u16, data: Vec<u8> },
    /// A driver's standard bring-up (all offered features, both queues in guest memory,
    /// DRIVER_OK), so that activated states are reached quickly.
    BringUp { event_idx: bool },
    /// Posts descriptor `head` in queue `queue`'s available ring and notifies.
    Kick { queue: bool, head: u16 },
    /// The device processes its queues.
    Process,
    /// The device raises an interrupt.
    Interrupt { config: bool, queue: u16 },
    /// The device asks for a reset.
    NeedsReset,
    /// Pause, save, encode, decode, restore around a fresh device, compare.
    SaveRestore,
    /// Restore from arbitrary bytes: errors are fine.
    RestoreBytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    level: bool,
    ioevents: bool,
    ops: Vec<Op>,
}

#[path = "common/virtio_dev.rs"]
mod virtio_dev;
use virtio_dev::{needs_reset, post_head, process, raise, FuzzDev, Slot};

fuzz_target!(|input: Input| {
    let Ok(m) = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let mem = GuestMemoryAtomic::new(m);
    let mode = if input.level {
        TriggerMode::Level
    } else {
        TriggerMode::Edge
    };
    let line = Arc::new(CountingLine::new(mode));
    let io = Arc::new(RecordingIoEvents::default());
    let ioevents = || input.ioevents.then(|| io.clone() as Arc<dyn IoEventSpace>);
    let new_dev = |slot: &Slot| {
        Box::new(FuzzDev {
            slot: slot.clone(),
            acked: 0,
            config: *b"fuzz-config-0123",
        })
    };
    let mut slot: Slot = Arc::new(Mutex::new(None));
    let Ok(t) = VirtioMmio::new(
        new_dev(&slot),
        mem.clone(),
        line.clone() as Arc<dyn InterruptLine>,
        BASE,
        ioevents(),
    ) else {
        return;
    };
    let mut t = Arc::new(t);
    for op in input.ops.into_iter().take(2048) {
        match op {
            Op::Read { offset, size } => {
                let mut buf = vec![0u8; usize::from(size % 9)];
                t.read(BASE, u64::from(offset), &mut buf);
            }
            Op::Write { offset, data } => {
                let data = data.get(..data.len().min(8)).unwrap_or_default();
                t.write(BASE, u64::from(offset), data);
            }
            Op::Reg { reg, value } => {
                let off = REGS[usize::from(reg) % REGS.len()];
                t.write(BASE, off, &value.to_le_bytes());
            }
            Op::SmallReg { reg, value } => {
                let off = REGS[usize::from(reg) % REGS.len()];
                t.write(BASE, off, &u32::from(value).to_le_bytes());
            }
            Op::Mem { addr, data } => {
                let _ = mem
                    .memory()
                    .write_slice(&data, GuestAddress(u64::from(addr)));
            }
            Op::BringUp { event_idx } => {
                let w = |off: u64, v: u32| t.write(BASE, off, &v.to_le_bytes());
                w(r::STATUS, 1);
                w(r::STATUS, 3);
                w(r::DRIVER_FEATURES_SEL, 0);
                let lo = features::RING_INDIRECT_DESC
                    | if event_idx {
                        features::RING_EVENT_IDX
                    } else {
                        0
                    };
                w(r::DRIVER_FEATURES, lo as u32);
                w(r::DRIVER_FEATURES_SEL, 1);
                w(r::DRIVER_FEATURES, (features::VERSION_1 >> 32) as u32);
                w(r::STATUS, 0xb);
                for (q, size) in [(0u32, 16u32), (1, 4)] {
                    let base = 0x1000 + u64::from(q) * 0x3000;
                    w(r::QUEUE_SEL, q);
                    w(r::QUEUE_NUM, size);
                    w(r::QUEUE_DESC_LOW, base as u32);
                    w(r::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
                    w(r::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
                    w(r::QUEUE_READY, 1);
                }
                w(r::STATUS, 0xf);
            }
            Op::Kick { queue, head } => {
                let q = post_head(&mem, queue, head);
                t.write(BASE, r::QUEUE_NOTIFY, &(q as u32).to_le_bytes());
            }
            Op::Process => process(&slot),
            Op::Interrupt { config, queue } => raise(&slot, config, queue),
            Op::NeedsReset => needs_reset(&slot),
            Op::SaveRestore => {
                t.pause().expect("pause");
                let state = t.save_state().expect("save");
                let bytes = encode(&state).expect("encode");
                let back: VirtioMmioState = decode(&bytes).expect("decode what was encoded");
                assert_eq!(back, state);
                let new_slot: Slot = Arc::new(Mutex::new(None));
                // The old transport unregisters its ioeventfds and resets its device when
                // dropped; only then may the new one register the same addresses.
                drop(t);
                let restored = VirtioMmio::restore(
                    new_dev(&new_slot),
                    mem.clone(),
                    line.clone() as Arc<dyn InterruptLine>,
                    ioevents(),
                    &back,
                )
                .expect("a saved state restores");
                restored.pause().expect("pause");
                assert_eq!(restored.save_state().expect("save"), state);
                restored.resume().expect("resume");
                slot = new_slot;
                t = Arc::new(restored);
            }
            Op::RestoreBytes(bytes) => {
                if let Ok(state) = decode::<VirtioMmioState>(&bytes) {
                    let new_slot: Slot = Arc::new(Mutex::new(None));
                    // Another transport at the same base would collide on ioeventfds.
                    let r = VirtioMmio::restore(
                        new_dev(&new_slot),
                        mem.clone(),
                        line.clone() as Arc<dyn InterruptLine>,
                        None,
                        &state,
                    );
                    drop(r);
                }
            }
        }
    }
});
