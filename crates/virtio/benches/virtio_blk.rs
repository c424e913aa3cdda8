// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio-blk request handling: parsing a chain into a request, and a whole request
//! (pop, parse, execute against an in-memory backend, status, `add_used`) for 4 KiB reads
//! and writes, direct and indirect.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::sync::Mutex;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, VolatileSlice};
use vmkit_block::{BlockBackend, BlockError, BlockStatus, CacheMode};
use vmkit_virtio::devices::block::request::{
    self, req_type, RequestHeader, RequestLimits, ID_BYTES,
};

mod common;
use common::{memory, Rings};

/// A RAM disk, so the bench measures the device path rather than the host's file I/O.
struct RamDisk(Mutex<Vec<u8>>);

impl BlockBackend for RamDisk {
    fn virtual_size(&self) -> u64 {
        self.0.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn format(&self) -> &'static str {
        "ram"
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let d = self.0.lock().expect("ram disk");
        let mut pos = offset as usize;
        for b in bufs {
            b.copy_from(&d[pos..pos + b.len()]);
            pos += b.len();
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let mut d = self.0.lock().expect("ram disk");
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
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        Ok(())
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

fn limits() -> RequestLimits {
    RequestLimits {
        capacity_sectors: 2048,
        seg_max: 254,
        read_only: false,
        flush: true,
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 1 << 22,
        max_discard_seg: 32,
        max_write_zeroes_sectors: 1 << 22,
        max_write_zeroes_seg: 32,
        serial: [0; ID_BYTES],
    }
}

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x1f_0000;

fn bench(c: &mut Criterion) {
    let mem = memory();
    let rings = Rings::new(256);
    let disk = RamDisk(Mutex::new(vec![0u8; 1 << 20]));
    let limits = limits();
    let mut group = c.benchmark_group("virtio_blk");
    group.throughput(Throughput::Elements(1));
    for (name, type_, writable, indirect) in [
        ("read_4k", req_type::IN, true, false),
        ("write_4k", req_type::OUT, false, false),
        ("read_4k_indirect", req_type::IN, true, true),
    ] {
        let h = RequestHeader {
            type_: type_.to_le(),
            reserved: 0,
            sector: 8u64.to_le(),
        };
        mem.write_obj(h, GuestAddress(HDR)).expect("header");
        let descs = [(HDR, 16, false), (DATA, 4096, writable), (STATUS, 1, true)];
        rings.post(&mem, &descs, indirect);
        let mut queue = rings.queue();
        group.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| {
                queue.set_next_avail(0);
                let chain = queue.pop_descriptor_chain(&mem).expect("chain");
                let req = request::parse(chain, &mem, &limits).expect("valid request");
                std::hint::black_box(req)
            })
        });
        group.bench_function(format!("complete/{name}"), |b| {
            b.iter(|| {
                queue.set_next_avail(0);
                queue.set_next_used(0);
                let chain = queue.pop_descriptor_chain(&mem).expect("chain");
                let head = chain.head_index();
                let len = request::process_chain(chain, &mem, &disk, &limits);
                queue.add_used(&mem, head, len).expect("used ring");
                std::hint::black_box(queue.needs_notification(&mem).expect("used_event"))
            })
        });
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"), 0);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
