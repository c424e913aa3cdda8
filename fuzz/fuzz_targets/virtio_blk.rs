// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio-blk request processing over an arbitrary descriptor table, available ring and
//! guest memory image (direct and indirect chains, any flags, any addresses): nothing
//! panics, every chain is returned, and whenever the device reports a written status byte
//! it is one of VIRTIO_BLK_S_OK / IOERR / UNSUPP.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, VolatileSlice};
use vmkit_block::{BlockBackend, BlockError, BlockStatus, CacheMode};
use vmkit_virtio::devices::block::request::{self, RequestLimits, ID_BYTES};
use vmkit_virtio::devices::block::BlockQueueHandler;
use vmkit_virtio::{VirtioInterrupt, VirtioInterruptType};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const MEM_SIZE: u64 = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const IMAGE: u64 = 0x1000;
const DISK: usize = 64 * 1024;

#[derive(Arbitrary, Debug)]
struct Desc {
    /// Taken modulo the memory size unless `wild` is set.
    addr: u64,
    wild: bool,
    len: u16,
    flags: u8,
    next: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    descs: Vec<Desc>,
    avail: Vec<u8>,
    /// Copied to guest memory at 0x1000 (headers, discard ranges, indirect tables).
    image: Vec<u8>,
    read_only: bool,
    flush: bool,
    discard: bool,
    seg_max: u8,
    event_idx: bool,
}

struct NoIrq;

impl VirtioInterrupt for NoIrq {
    fn trigger(&self, _kind: VirtioInterruptType) -> Result<(), vmkit_device::InterruptError> {
        Ok(())
    }
    fn set_needs_reset(&self) {}
}

struct RamDisk(Mutex<Vec<u8>>);

impl BlockBackend for RamDisk {
    fn virtual_size(&self) -> u64 {
        DISK as u64
    }
    fn format(&self) -> &'static str {
        "ram"
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let d = self.0.lock().unwrap();
        vmkit_block::backend::check_range(
            offset,
            vmkit_block::backend::total_len(bufs),
            DISK as u64,
        )?;
        let mut pos = offset as usize;
        for b in bufs {
            b.copy_from(&d[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let mut d = self.0.lock().unwrap();
        vmkit_block::backend::check_range(
            offset,
            vmkit_block::backend::total_len(bufs),
            DISK as u64,
        )?;
        let mut pos = offset as usize;
        for b in bufs {
            b.copy_to(&mut d[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        vmkit_block::backend::check_range(offset, len, DISK as u64)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        vmkit_block::backend::check_range(offset, len, DISK as u64)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        Ok(BlockStatus {
            offset,
            len,
            allocated: true,
            zero: false,
        })
    }
    fn cache_mode(&self) -> CacheMode {
        CacheMode::Unsafe
    }
    fn set_cache_mode(&self, _mode: CacheMode) -> Result<(), BlockError> {
        Ok(())
    }
}

fn setup(mem: &Mem, input: &Input) -> Queue {
    for (i, d) in input.descs.iter().take(usize::from(QUEUE_SIZE)).enumerate() {
        let addr = if d.wild { d.addr } else { d.addr % MEM_SIZE };
        let raw = RawDescriptor::from(Descriptor::new(
            addr,
            u32::from(d.len),
            u16::from(d.flags & 0x7),
            u16::from(d.next),
        ));
        mem.write_obj(raw, GuestAddress(DESC + 16 * i as u64))
            .unwrap();
    }
    let n = input.avail.len().min(usize::from(QUEUE_SIZE));
    for (i, head) in input.avail.iter().take(n).enumerate() {
        mem.write_obj(u16::from(*head), GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(n as u16, GuestAddress(AVAIL + 2)).unwrap();
    let img = &input.image[..input.image.len().min(0x4_0000)];
    mem.write_slice(img, GuestAddress(IMAGE)).unwrap();
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_ready(true);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(input.event_idx);
    q
}

fuzz_target!(|input: Input| {
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let disk = Arc::new(RamDisk(Mutex::new(vec![0u8; DISK])));
    let limits = RequestLimits {
        capacity_sectors: (DISK / 512) as u64,
        seg_max: u32::from(input.seg_max).max(1),
        read_only: input.read_only,
        flush: input.flush,
        discard: input.discard,
        write_zeroes: input.discard,
        max_discard_sectors: 64,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 64,
        max_write_zeroes_seg: 4,
        serial: [b's'; ID_BYTES],
    };

    // Chain by chain: the status byte the device reports is a defined value.
    let mut queue = setup(&mem, &input);
    let mut completed = 0u16;
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let status_addr = request::parse(chain.clone(), &mem, &limits)
            .map(|r| Some(r.status_addr))
            .unwrap_or_else(|f| f.status_addr);
        let len = request::process_chain(chain, &mem, disk.as_ref(), &limits);
        if len > 0 {
            let addr = status_addr.expect("a used length means a status byte was written");
            let status: u8 = mem.read_obj(addr).expect("status byte in memory");
            assert!(status <= 2, "status {status}");
        }
        if queue.add_used(&mem, head, len).is_err() {
            break;
        }
        completed += 1;
        assert!(completed <= QUEUE_SIZE);
    }

    // The same through the queue handler the worker threads run.
    let mem2 = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let queue = setup(&mem2, &input);
    let mut handler = BlockQueueHandler::new(
        GuestMemoryAtomic::new(mem2),
        vec![(0, queue)],
        disk,
        Arc::new(NoIrq),
        limits,
    );
    assert!(handler.process_queue(0) <= usize::from(QUEUE_SIZE));
    assert_eq!(handler.process_queue(1), 0);
});
