// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The virtio-pci transport of vmkit-virtio under arbitrary configuration-space and BAR
//! accesses (any offset, any size, any value; BAR moves applied as the root complex
//! would), arbitrary guest memory, device-side queue processing and interrupts, and
//! save/restore. Nothing may panic; a saved state restores and saves again to an equal
//! state.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmkit_device::testing::{RecordingIoEvents, RecordingMsi};
use vmkit_device::{IoEventSpace, MsiVectors};
use vmkit_migration::{decode, encode, Pausable};
use vmkit_pci::PciDevice;
use vmkit_virtio::features;
use vmkit_virtio::transport::{
    common_cfg as cc, VirtioPci, VirtioPciState, COMMON_CFG_OFFSET, MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET,
};

const MEM_SIZE: usize = 64 << 10;
const BAR_ADDR: u64 = 0xe000_0000;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A configuration-space read (any offset in the 4 KiB space, any size up to 8).
    ConfigRead { offset: u16, size: u8 },
    /// A configuration-space write.
    ConfigWrite { offset: u16, data: Vec<u8> },
    /// A BAR read (BAR index taken modulo 8, offset within 64 KiB).
    BarRead { bar: u8, offset: u16, size: u8 },
    /// A BAR write.
    BarWrite { bar: u8, offset: u16, data: Vec<u8> },
    /// A write of `value` (1, 2, 4 or 8 bytes) to a common configuration field.
    Common { field: u8, value: u64 },
    /// Map BAR 0, enable memory decoding and MSI-X, program the vectors, negotiate, set up
    /// both queues in guest memory and set DRIVER_OK.
    BringUp { event_idx: bool, mask_vectors: bool },
    /// Guest memory contents.
    Mem { addr: u16, data: Vec<u8> },
    /// Posts `head` on a queue and notifies through the notify region.
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
    ioevents: bool,
    ops: Vec<Op>,
}

/// Common configuration fields and their widths.
const FIELDS: [(u64, usize); 15] = [
    (cc::DEVICE_FEATURE_SELECT, 4),
    (cc::DRIVER_FEATURE_SELECT, 4),
    (cc::DRIVER_FEATURE, 4),
    (cc::CONFIG_MSIX_VECTOR, 2),
    (cc::DEVICE_STATUS, 1),
    (cc::QUEUE_SELECT, 2),
    (cc::QUEUE_SIZE, 2),
    (cc::QUEUE_MSIX_VECTOR, 2),
    (cc::QUEUE_ENABLE, 2),
    (cc::QUEUE_DESC, 8),
    (cc::QUEUE_DRIVER, 8),
    (cc::QUEUE_DEVICE, 8),
    (cc::QUEUE_DESC + 4, 4),
    (cc::QUEUE_RESET, 2),
    (cc::NUM_QUEUES, 2),
];

#[path = "common/virtio_dev.rs"]
mod virtio_dev;
use virtio_dev::{needs_reset, post_head, process, raise, FuzzDev, Slot};

/// A configuration write, with BAR moves applied as the root complex would.
fn cfg_write(t: &VirtioPci, offset: u16, data: &[u8]) {
    for change in t.config_write(offset, data) {
        t.bar_moved(&change);
    }
}

fuzz_target!(|input: Input| {
    let Ok(m) = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let mem = GuestMemoryAtomic::new(m);
    let io = Arc::new(RecordingIoEvents::default());
    let ioevents = || input.ioevents.then(|| io.clone() as Arc<dyn IoEventSpace>);
    let vectors = || Arc::new(RecordingMsi::new(3)) as Arc<dyn MsiVectors>;
    let new_dev = |slot: &Slot| {
        Box::new(FuzzDev {
            slot: slot.clone(),
            acked: 0,
            config: *b"fuzz-config-0123",
        })
    };
    let mut slot: Slot = Arc::new(Mutex::new(None));
    let Ok(t) = VirtioPci::new(new_dev(&slot), mem.clone(), vectors(), ioevents()) else {
        return;
    };
    let mut t = Arc::new(t);
    for op in input.ops.into_iter().take(2048) {
        match op {
            Op::ConfigRead { offset, size } => {
                let mut buf = vec![0u8; usize::from(size % 9)];
                t.config_read(offset % 4096, &mut buf);
            }
            Op::ConfigWrite { offset, data } => {
                let data = data.get(..data.len().min(8)).unwrap_or_default();
                cfg_write(&t, offset % 4096, data);
            }
            Op::BarRead { bar, offset, size } => {
                let mut buf = vec![0u8; usize::from(size % 9)];
                t.bar_read(bar % 8, u64::from(offset), &mut buf);
            }
            Op::BarWrite { bar, offset, data } => {
                let data = data.get(..data.len().min(8)).unwrap_or_default();
                t.bar_write(bar % 8, u64::from(offset), data);
            }
            Op::Common { field, value } => {
                let (off, len) = FIELDS[usize::from(field) % FIELDS.len()];
                t.bar_write(0, COMMON_CFG_OFFSET + off, &value.to_le_bytes()[..len]);
            }
            Op::BringUp {
                event_idx,
                mask_vectors,
            } => {
                cfg_write(&t, 0x10, &(BAR_ADDR as u32).to_le_bytes());
                cfg_write(&t, 0x14, &((BAR_ADDR >> 32) as u32).to_le_bytes());
                cfg_write(&t, 0x04, &6u16.to_le_bytes());
                let mut p = [0u8; 1];
                t.config_read(0x34, &mut p);
                let mut cap = u16::from(p[0]);
                for _ in 0..16 {
                    if cap == 0 {
                        break;
                    }
                    let mut id = [0u8; 2];
                    t.config_read(cap, &mut id);
                    if id[0] == 0x11 {
                        cfg_write(&t, cap + 2, &0x8000u16.to_le_bytes());
                    }
                    cap = u16::from(id[1]);
                }
                for v in 0..3u64 {
                    let e = u64::from(MSIX_TABLE_OFFSET) + 16 * v;
                    t.bar_write(0, e, &0xfee0_0000u32.to_le_bytes());
                    t.bar_write(0, e + 8, &(0x30 + v as u32).to_le_bytes());
                    t.bar_write(0, e + 12, &u32::from(mask_vectors).to_le_bytes());
                }
                let w = |off: u64, v: u64, len: usize| {
                    t.bar_write(0, COMMON_CFG_OFFSET + off, &v.to_le_bytes()[..len])
                };
                w(cc::DEVICE_STATUS, 1, 1);
                w(cc::DEVICE_STATUS, 3, 1);
                w(cc::DRIVER_FEATURE_SELECT, 0, 4);
                let lo = features::RING_INDIRECT_DESC
                    | if event_idx {
                        features::RING_EVENT_IDX
                    } else {
                        0
                    };
                w(cc::DRIVER_FEATURE, lo, 4);
                w(cc::DRIVER_FEATURE_SELECT, 1, 4);
                w(cc::DRIVER_FEATURE, features::VERSION_1 >> 32, 4);
                w(cc::DEVICE_STATUS, 0xb, 1);
                w(cc::CONFIG_MSIX_VECTOR, 0, 2);
                for (q, size) in [(0u64, 16u64), (1, 4)] {
                    let base = 0x1000 + q * 0x3000;
                    w(cc::QUEUE_SELECT, q, 2);
                    w(cc::QUEUE_SIZE, size, 2);
                    w(cc::QUEUE_MSIX_VECTOR, q + 1, 2);
                    w(cc::QUEUE_DESC, base, 8);
                    w(cc::QUEUE_DRIVER, base + 0x1000, 8);
                    w(cc::QUEUE_DEVICE, base + 0x2000, 8);
                    w(cc::QUEUE_ENABLE, 1, 2);
                }
                w(cc::DEVICE_STATUS, 0xf, 1);
            }
            Op::Mem { addr, data } => {
                let _ = mem
                    .memory()
                    .write_slice(&data, GuestAddress(u64::from(addr)));
            }
            Op::Kick { queue, head } => {
                let q = post_head(&mem, queue, head);
                t.bar_write(0, NOTIFY_OFFSET + 4 * q, &(q as u16).to_le_bytes());
            }
            Op::Process => process(&slot),
            Op::Interrupt { config, queue } => raise(&slot, config, queue),
            Op::NeedsReset => needs_reset(&slot),
            Op::SaveRestore => {
                t.pause().expect("pause");
                let state = t.save_state().expect("save");
                let bytes = encode(&state).expect("encode");
                let back: VirtioPciState = decode(&bytes).expect("decode what was encoded");
                assert_eq!(back, state);
                let new_slot: Slot = Arc::new(Mutex::new(None));
                // The old function unregisters its ioeventfds and resets its device when
                // dropped; only then may the new one register the same addresses.
                drop(t);
                let restored = VirtioPci::restore(
                    new_dev(&new_slot),
                    mem.clone(),
                    vectors(),
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
                if let Ok(state) = decode::<VirtioPciState>(&bytes) {
                    let new_slot: Slot = Arc::new(Mutex::new(None));
                    let r = VirtioPci::restore(
                        new_dev(&new_slot),
                        mem.clone(),
                        vectors(),
                        None,
                        &state,
                    );
                    drop(r);
                }
            }
        }
    }
});
