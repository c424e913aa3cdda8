// SPDX-License-Identifier: Apache-2.0 OR MIT
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, VolatileSlice};
use vmkit_block::raw::RawBackend;
use vmkit_block::{BlockBackend, BlockError, BlockStatus, CacheMode};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{self, req_type, status, RequestHeader};
use super::*;
use crate::devices::testutil::{atomic, memory, TestInterrupt, TestQueue, D};
use crate::{ActiveQueue, VirtioInterruptType};

const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x1f_0000;
const DATA: u64 = 0x20_0000;
const DISK_SIZE: u64 = 1 << 20;

fn temp_disk(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    RawBackend::create(&path, size).unwrap();
    path
}

fn raw(path: &Path, read_only: bool) -> Arc<dyn BlockBackend> {
    Arc::new(RawBackend::open(path, read_only, CacheMode::Writeback).unwrap())
}

/// A backend whose I/O fails on demand, over an in-memory disk.
struct FailingBackend {
    inner: Arc<dyn BlockBackend>,
    fail: AtomicBool,
}

impl BlockBackend for FailingBackend {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn format(&self) -> &'static str {
        "failing"
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(injected());
        }
        self.inner.read_vectored(offset, bufs)
    }
    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(injected());
        }
        self.inner.write_vectored(offset, bufs)
    }
    fn flush(&self) -> Result<(), BlockError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(injected());
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        self.inner.block_status(offset, len)
    }
    fn cache_mode(&self) -> CacheMode {
        self.inner.cache_mode()
    }
    fn set_cache_mode(&self, mode: CacheMode) -> Result<(), BlockError> {
        self.inner.set_cache_mode(mode)
    }
}

fn injected() -> BlockError {
    BlockError::Io {
        path: None,
        op: "test",
        source: std::io::Error::other("injected"),
    }
}

fn header(mem: &GuestMem, type_: u32, sector: u64) {
    let h = RequestHeader {
        type_: type_.to_le(),
        reserved: 0,
        sector: sector.to_le(),
    };
    mem.write_obj(h, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn status_byte(mem: &GuestMem) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    backend: Arc<dyn BlockBackend>,
    block: Block,
}

fn fixture(config: BlockConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_disk(dir.path(), DISK_SIZE);
    let backend = raw(&path, config.read_only);
    let mut block = Block::new(backend.clone(), config).unwrap();
    block.negotiate_features(block.device_features()).unwrap();
    Fixture {
        _dir: dir,
        path,
        backend,
        block,
    }
}

fn handler(
    f: &Fixture,
    mem: &GuestMem,
    tq: &TestQueue<'_>,
) -> (BlockQueueHandler, Arc<TestInterrupt>) {
    let irq = Arc::new(TestInterrupt::default());
    let h = BlockQueueHandler::new(
        atomic(mem),
        vec![(0, tq.queue())],
        f.backend.clone(),
        irq.clone(),
        f.block.request_limits(),
    );
    (h, irq)
}

#[test]
fn write_then_read_direct_and_indirect() {
    let f = fixture(BlockConfig::default());
    let mem = memory();
    let mut tq = TestQueue::new(&mem, 0, 64);
    let (mut h, irq) = handler(&f, &mem, &tq);

    // Write 3 sectors at sector 5 from two segments.
    let pattern: Vec<u8> = (0..1536u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern[..512], GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&pattern[512..], GuestAddress(DATA + 0x1000))
        .unwrap();
    header(&mem, req_type::OUT, 5);
    tq.add(&[
        D(HDR, 16, false),
        D(DATA, 512, false),
        D(DATA + 0x1000, 1024, false),
        D(STATUS, 1, true),
    ]);
    assert_eq!(h.process_queue(0), 1);
    assert_eq!(status_byte(&mem), status::OK);
    assert_eq!(tq.used(0).1, 1);
    assert_eq!(irq.count(VirtioInterruptType::Queue(0)), 1);
    let file = std::fs::read(&f.path).unwrap();
    assert_eq!(&file[5 * 512..8 * 512], &pattern[..]);

    // Read it back through an indirect chain into a different buffer.
    header(&mem, req_type::IN, 5);
    tq.add_indirect(&[
        D(HDR, 16, false),
        D(DATA + 0x10000, 1024, true),
        D(DATA + 0x20000, 512, true),
        D(STATUS, 1, true),
    ]);
    assert_eq!(h.process_queue(0), 1);
    assert_eq!(status_byte(&mem), status::OK);
    assert_eq!(tq.used(1).1, 1536 + 1);
    let mut back = vec![0u8; 1536];
    mem.read_slice(&mut back[..1024], GuestAddress(DATA + 0x10000))
        .unwrap();
    mem.read_slice(&mut back[1024..], GuestAddress(DATA + 0x20000))
        .unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn framing_independent_header_data_and_status() {
    // Header and data in one readable descriptor; data and status in one writable one.
    let f = fixture(BlockConfig::default());
    let mem = memory();
    let mut tq = TestQueue::new(&mem, 0, 16);
    let (mut h, _irq) = handler(&f, &mem, &tq);
    header(&mem, req_type::OUT, 0);
    mem.write_slice(&[0xab; 512], GuestAddress(HDR + 16))
        .unwrap();
    tq.add(&[D(HDR, 16 + 512, false), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::OK);
    header(&mem, req_type::IN, 0);
    tq.add(&[D(HDR, 16, false), D(DATA, 513, true)]);
    h.process_queue(0);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(),
        status::OK
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(), 0xab);
    assert_eq!(tq.used(1).1, 513);
}

#[test]
fn flush_get_id_discard_write_zeroes_unsupported() {
    let f = fixture(BlockConfig {
        serial: "vmkit-serial-0123456".into(),
        ..BlockConfig::default()
    });
    let mem = memory();
    let mut tq = TestQueue::new(&mem, 0, 64);
    let (mut h, _irq) = handler(&f, &mem, &tq);

    header(&mem, req_type::FLUSH, 0);
    tq.add(&[D(HDR, 16, false), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::OK);

    header(&mem, req_type::GET_ID, 0);
    tq.add(&[D(HDR, 16, false), D(DATA, 20, true), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"vmkit-serial-0123456");
    assert_eq!(tq.used(1).1, 21);

    // Fill sectors 0..8 with data, then write zeroes over 2..4 and discard 6..8.
    std::fs::write(&f.path, vec![0x5a; DISK_SIZE as usize]).unwrap();
    let range = |sector: u64, n: u32, flags: u32| request::DiscardRange {
        sector: sector.to_le(),
        num_sectors: n.to_le(),
        flags: flags.to_le(),
    };
    header(&mem, req_type::WRITE_ZEROES, 0);
    mem.write_obj(range(2, 2, request::FLAG_UNMAP), GuestAddress(DATA))
        .unwrap();
    tq.add(&[D(HDR, 16, false), D(DATA, 16, false), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::OK);
    header(&mem, req_type::DISCARD, 0);
    mem.write_obj(range(6, 2, 0), GuestAddress(DATA)).unwrap();
    tq.add(&[D(HDR, 16, false), D(DATA, 16, false), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::OK);
    let file = std::fs::read(&f.path).unwrap();
    assert!(file[1024..2048].iter().all(|b| *b == 0));
    assert!(file[3072..4096].iter().all(|b| *b == 0));
    assert!(file[..1024].iter().all(|b| *b == 0x5a));
    assert!(file[2048..3072].iter().all(|b| *b == 0x5a));

    // Discard with UNMAP is UNSUPP (virtio 1.2, 5.2.6.2).
    header(&mem, req_type::DISCARD, 0);
    mem.write_obj(range(6, 2, request::FLAG_UNMAP), GuestAddress(DATA))
        .unwrap();
    tq.add(&[D(HDR, 16, false), D(DATA, 16, false), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::UNSUPP);
    // A range past the end is IOERR.
    header(&mem, req_type::WRITE_ZEROES, 0);
    mem.write_obj(range(DISK_SIZE / 512 - 1, 2, 0), GuestAddress(DATA))
        .unwrap();
    tq.add(&[D(HDR, 16, false), D(DATA, 16, false), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::IOERR);
    // Unknown request type.
    header(&mem, 0x77, 0);
    tq.add(&[D(HDR, 16, false), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::UNSUPP);
}

#[test]
fn malformed_chains_get_ioerr_and_device_keeps_serving() {
    let f = fixture(BlockConfig {
        queue_size: 8,
        ..BlockConfig::default()
    });
    assert_eq!(f.block.request_limits().seg_max, 6);
    let mem = memory();
    let mut tq = TestQueue::new(&mem, 0, 8);
    let (mut h, irq) = handler(&f, &mem, &tq);
    let expect =
        |tq: &mut TestQueue<'_>, h: &mut BlockQueueHandler, descs: &[D], st: u8, what: &str| {
            tq.add(descs);
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            assert_eq!(h.process_queue(0), 1, "{what}");
            assert_eq!(status_byte(&mem), st, "{what}");
        };
    // Wrong direction: IN with a readable data buffer.
    header(&mem, req_type::IN, 0);
    expect(
        &mut tq,
        &mut h,
        &[D(HDR, 16, false), D(DATA, 512, false), D(STATUS, 1, true)],
        status::IOERR,
        "in/readable",
    );
    // Wrong direction: OUT with a writable data buffer.
    header(&mem, req_type::OUT, 0);
    expect(
        &mut tq,
        &mut h,
        &[D(HDR, 16, false), D(DATA, 512, true), D(STATUS, 1, true)],
        status::IOERR,
        "out/writable",
    );
    // Header too short.
    header(&mem, req_type::IN, 0);
    expect(
        &mut tq,
        &mut h,
        &[D(HDR, 8, false), D(STATUS, 1, true)],
        status::IOERR,
        "short header",
    );
    // Header written by the device side (writable) and nothing readable.
    expect(
        &mut tq,
        &mut h,
        &[D(HDR, 16, true), D(STATUS, 1, true)],
        status::IOERR,
        "writable header",
    );
    // Past the end of the disk.
    header(&mem, req_type::IN, DISK_SIZE / 512);
    expect(
        &mut tq,
        &mut h,
        &[D(HDR, 16, false), D(DATA, 512, true), D(STATUS, 1, true)],
        status::IOERR,
        "past end",
    );
    header(&mem, req_type::OUT, u64::MAX);
    expect(
        &mut tq,
        &mut h,
        &[D(HDR, 16, false), D(DATA, 512, false), D(STATUS, 1, true)],
        status::IOERR,
        "sector overflow",
    );
    // Not a multiple of 512.
    header(&mem, req_type::IN, 0);
    expect(
        &mut tq,
        &mut h,
        &[D(HDR, 16, false), D(DATA, 100, true), D(STATUS, 1, true)],
        status::IOERR,
        "unaligned",
    );
    // Zero-length descriptor.
    expect(
        &mut tq,
        &mut h,
        &[D(HDR, 16, false), D(DATA, 0, true), D(STATUS, 1, true)],
        status::IOERR,
        "zero length",
    );
    // Data outside guest memory.
    expect(
        &mut tq,
        &mut h,
        &[
            D(HDR, 16, false),
            D(0xdead_0000_0000, 512, true),
            D(STATUS, 1, true),
        ],
        status::IOERR,
        "data outside memory",
    );
    // Header outside guest memory.
    expect(
        &mut tq,
        &mut h,
        &[D(0xdead_0000_0000, 16, false), D(STATUS, 1, true)],
        status::IOERR,
        "header outside memory",
    );
    // Readable after writable.
    expect(
        &mut tq,
        &mut h,
        &[
            D(HDR, 16, false),
            D(DATA, 512, true),
            D(DATA, 512, false),
            D(STATUS, 1, true),
        ],
        status::IOERR,
        "order",
    );

    // Too many segments: 7 > seg_max 6, through an indirect table longer than the queue.
    header(&mem, req_type::IN, 0);
    let mut descs = vec![D(HDR, 16, false)];
    descs.extend((0..7).map(|i| D(DATA + 0x1000 * i, 512, true)));
    descs.push(D(STATUS, 1, true));
    tq.add_indirect(&descs);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::IOERR);
    // Six are fine.
    descs.remove(7);
    tq.add_indirect(&descs);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::OK);

    // No status byte: the chain comes back with length 0.
    let before = tq.used_idx();
    let head = tq.add(&[D(HDR, 16, false), D(DATA, 512, false)]);
    h.process_queue(0);
    assert_eq!(tq.used(before), (u32::from(head), 0));
    // Status outside guest memory: length 0.
    tq.add(&[D(HDR, 16, false), D(0xdead_0000_0000, 1, true)]);
    h.process_queue(0);
    assert_eq!(tq.used(before + 1).1, 0);

    // And a good request still works.
    header(&mem, req_type::OUT, 1);
    expect(
        &mut tq,
        &mut h,
        &[D(HDR, 16, false), D(DATA, 512, false), D(STATUS, 1, true)],
        status::OK,
        "good",
    );
    assert!(!irq.needs_reset());
}

#[test]
fn backend_errors_are_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_disk(dir.path(), DISK_SIZE);
    let failing = Arc::new(FailingBackend {
        inner: raw(&path, false),
        fail: AtomicBool::new(true),
    });
    let mut block = Block::new(failing.clone(), BlockConfig::default()).unwrap();
    block.negotiate_features(block.device_features()).unwrap();
    let mem = memory();
    let mut tq = TestQueue::new(&mem, 0, 16);
    let mut h = BlockQueueHandler::new(
        atomic(&mem),
        vec![(0, tq.queue())],
        failing.clone(),
        Arc::new(TestInterrupt::default()),
        block.request_limits(),
    );
    for t in [req_type::IN, req_type::OUT, req_type::FLUSH] {
        header(&mem, t, 0);
        let dir_w = t == req_type::IN;
        if t == req_type::FLUSH {
            tq.add(&[D(HDR, 16, false), D(STATUS, 1, true)]);
        } else {
            tq.add(&[D(HDR, 16, false), D(DATA, 512, dir_w), D(STATUS, 1, true)]);
        }
        h.process_queue(0);
        assert_eq!(status_byte(&mem), status::IOERR, "type {t}");
    }
    failing.fail.store(false, Ordering::SeqCst);
    header(&mem, req_type::FLUSH, 0);
    tq.add(&[D(HDR, 16, false), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::OK);
}

#[test]
fn read_only_device() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_disk(dir.path(), DISK_SIZE);
    // A read-only image for a writable device is refused, naming the file.
    let err = Block::new(
        raw(&path, true),
        BlockConfig {
            path: Some(path.clone()),
            ..BlockConfig::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, BlockDeviceError::NotWritable { .. }));
    assert!(err.to_string().contains("disk.raw"), "{err}");

    let mut block = Block::new(
        raw(&path, true),
        BlockConfig {
            read_only: true,
            ..BlockConfig::default()
        },
    )
    .unwrap();
    let feats = block.device_features();
    assert_ne!(feats & feature::RO, 0);
    assert_eq!(feats & (feature::DISCARD | feature::WRITE_ZEROES), 0);
    block.negotiate_features(feats).unwrap();
    let mem = memory();
    let mut tq = TestQueue::new(&mem, 0, 16);
    let mut h = BlockQueueHandler::new(
        atomic(&mem),
        vec![(0, tq.queue())],
        block.backend().clone(),
        Arc::new(TestInterrupt::default()),
        block.request_limits(),
    );
    header(&mem, req_type::OUT, 0);
    tq.add(&[D(HDR, 16, false), D(DATA, 512, false), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::IOERR);
    header(&mem, req_type::IN, 0);
    tq.add(&[D(HDR, 16, false), D(DATA, 512, true), D(STATUS, 1, true)]);
    h.process_queue(0);
    assert_eq!(status_byte(&mem), status::OK);
}

#[test]
fn construction_errors_name_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.raw");
    std::fs::write(&path, vec![0u8; 1000]).unwrap();
    let err = Block::new(
        raw(&path, false),
        BlockConfig {
            path: Some(path.clone()),
            ..BlockConfig::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(
        err,
        BlockDeviceError::UnalignedSize { size: 1000, .. }
    ));
    assert!(err.to_string().contains("odd.raw"), "{err}");
    let path = temp_disk(dir.path(), DISK_SIZE);
    for bad in [
        BlockConfig {
            num_queues: 0,
            ..BlockConfig::default()
        },
        BlockConfig {
            queue_size: 100,
            ..BlockConfig::default()
        },
        BlockConfig {
            serial: "x".repeat(21),
            ..BlockConfig::default()
        },
        BlockConfig {
            logical_block_size: 1000,
            ..BlockConfig::default()
        },
    ] {
        assert!(Block::new(raw(&path, false), bad).is_err());
    }
}

#[test]
fn config_space_and_wce() {
    let mut f = fixture(BlockConfig {
        num_queues: 4,
        queue_size: 128,
        logical_block_size: 4096,
        topology: BlockTopology {
            physical_block_exp: 3,
            alignment_offset: 1,
            min_io_size: 2,
            opt_io_size: 64,
        },
        ..BlockConfig::default()
    });
    let b = &mut f.block;
    assert_ne!(b.device_features() & feature::MQ, 0);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
    let mut w = [0u8; 4];
    b.read_config(12, &mut w);
    assert_eq!(u32::from_le_bytes(w), 126);
    b.read_config(20, &mut w);
    assert_eq!(u32::from_le_bytes(w), 4096);
    b.read_config(24, &mut w);
    assert_eq!(w, [3, 1, 2, 0]);
    let mut q = [0u8; 2];
    b.read_config(34, &mut q);
    assert_eq!(u16::from_le_bytes(q), 4);
    // Reads past the end are zero; partial reads are clipped.
    let mut tail = [0xffu8; 8];
    b.read_config(56, &mut tail);
    assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0]);
    let mut far = [0xffu8; 4];
    b.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);

    // CONFIG_WCE: the guest toggles the backend's cache mode.
    let mut wb = [0u8; 1];
    b.read_config(CONFIG_WRITEBACK_OFFSET, &mut wb);
    assert_eq!(wb, [1]);
    b.write_config(CONFIG_WRITEBACK_OFFSET, &[0]);
    assert_eq!(f.backend.cache_mode(), CacheMode::Writethrough);
    b.read_config(CONFIG_WRITEBACK_OFFSET, &mut wb);
    assert_eq!(wb, [0]);
    b.write_config(CONFIG_WRITEBACK_OFFSET, &[1]);
    assert_eq!(f.backend.cache_mode(), CacheMode::Writeback);
    b.write_config(CONFIG_WRITEBACK_OFFSET, &[0]);
    // Reset restores the mode the device was built with.
    b.reset();
    assert_eq!(f.backend.cache_mode(), CacheMode::Writeback);
    // Without CONFIG_WCE negotiated the write is ignored.
    b.negotiate_features(features::VERSION_1 | feature::FLUSH)
        .unwrap();
    b.write_config(CONFIG_WRITEBACK_OFFSET, &[0]);
    assert_eq!(f.backend.cache_mode(), CacheMode::Writeback);
    // CONFIG_WCE without FLUSH: writeback starts at 0 (virtio 1.2, 5.2.6.2), and the
    // driver cannot turn it on, since it could never make writes durable.
    b.reset();
    b.negotiate_features(features::VERSION_1 | feature::CONFIG_WCE)
        .unwrap();
    assert_eq!(f.backend.cache_mode(), CacheMode::Writethrough);
    b.read_config(CONFIG_WRITEBACK_OFFSET, &mut wb);
    assert_eq!(wb, [0]);
    b.write_config(CONFIG_WRITEBACK_OFFSET, &[1]);
    assert_eq!(f.backend.cache_mode(), CacheMode::Writethrough);
    b.reset();
    assert_eq!(f.backend.cache_mode(), CacheMode::Writeback);
    // Other writes are ignored.
    b.write_config(0, &[1, 2, 3, 4]);
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
    // Features outside the offer are refused.
    assert!(b.negotiate_features(1 << 60).is_err());
}

fn activate(
    block: &mut Block,
    mem: &GuestMem,
    queues: Vec<(u16, &TestQueue<'_>)>,
) -> (Arc<TestInterrupt>, Vec<EventFd>) {
    let irq = Arc::new(TestInterrupt::default());
    let mut kicks = Vec::new();
    let active = queues
        .into_iter()
        .map(|(index, tq)| {
            let notify = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(notify.try_clone().unwrap());
            ActiveQueue {
                index,
                queue: tq.queue(),
                notify,
            }
        })
        .collect();
    block
        .activate(ActivateContext {
            mem: atomic(mem),
            queues: active,
            interrupt: irq.clone(),
            acked_features: block.acked_features(),
        })
        .unwrap();
    (irq, kicks)
}

#[test]
fn multiqueue_workers_reset_and_reactivate() {
    let mut f = fixture(BlockConfig {
        num_queues: 2,
        workers: 2,
        queue_size: 16,
        ..BlockConfig::default()
    });
    let mem = memory();
    for round in 0..2u64 {
        let mut q0 = TestQueue::new(&mem, 0, 16);
        let mut q1 = TestQueue::new(&mem, 0x4_0000, 16);
        let (irq, kicks) = activate(&mut f.block, &mem, vec![(0, &q0), (1, &q1)]);
        // Queue 0 writes sector 0, queue 1 writes sector 1; different headers.
        let h1 = HDR + 0x100;
        let s1 = STATUS + 0x100;
        header(&mem, req_type::OUT, 0);
        mem.write_obj(
            RequestHeader {
                type_: req_type::OUT.to_le(),
                reserved: 0,
                sector: 1u64.to_le(),
            },
            GuestAddress(h1),
        )
        .unwrap();
        mem.write_slice(&[round as u8 + 1; 512], GuestAddress(DATA))
            .unwrap();
        mem.write_slice(&[round as u8 + 10; 512], GuestAddress(DATA + 0x1000))
            .unwrap();
        q0.add(&[D(HDR, 16, false), D(DATA, 512, false), D(STATUS, 1, true)]);
        q1.add(&[
            D(h1, 16, false),
            D(DATA + 0x1000, 512, false),
            D(s1, 1, true),
        ]);
        kicks[0].write(1).unwrap();
        kicks[1].write(1).unwrap();
        assert!(irq.wait_for(VirtioInterruptType::Queue(0), 1));
        assert!(irq.wait_for(VirtioInterruptType::Queue(1), 1));
        f.block.reset();
        let file = std::fs::read(&f.path).unwrap();
        assert!(file[..512].iter().all(|b| *b == round as u8 + 1));
        assert!(file[512..1024].iter().all(|b| *b == round as u8 + 10));
        f.block
            .negotiate_features(f.block.device_features())
            .unwrap();
    }
}

#[test]
fn activate_without_queues_or_with_a_foreign_index_fails() {
    let mut f = fixture(BlockConfig::default());
    let mem = memory();
    let err = f.block.activate(ActivateContext {
        mem: atomic(&mem),
        queues: vec![],
        interrupt: Arc::new(TestInterrupt::default()),
        acked_features: 0,
    });
    assert!(err.is_err());
    let tq = TestQueue::new(&mem, 0, 16);
    let err = f.block.activate(ActivateContext {
        mem: atomic(&mem),
        queues: vec![ActiveQueue {
            index: 3,
            queue: tq.queue(),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        }],
        interrupt: Arc::new(TestInterrupt::default()),
        acked_features: 0,
    });
    assert!(err.is_err());
}

#[test]
fn no_flush_feature_means_writethrough() {
    let mut f = fixture(BlockConfig::default());
    f.block.negotiate_features(features::VERSION_1).unwrap();
    let mem = memory();
    let tq = TestQueue::new(&mem, 0, 16);
    let _ = activate(&mut f.block, &mem, vec![(0, &tq)]);
    assert_eq!(f.backend.cache_mode(), CacheMode::Writethrough);
    f.block.reset();
    assert_eq!(f.backend.cache_mode(), CacheMode::Writeback);
}

#[test]
fn save_restore_round_trip() {
    let mut f = fixture(BlockConfig {
        serial: "abc".into(),
        ..BlockConfig::default()
    });
    f.block.write_config(CONFIG_WRITEBACK_OFFSET, &[0]);
    let saved = f.block.save_state().unwrap();
    let mut other = Block::new(f.backend.clone(), BlockConfig::default()).unwrap();
    f.backend.set_cache_mode(CacheMode::Writeback).unwrap();
    other.restore_state(&saved).unwrap();
    assert_eq!(other.acked_features(), f.block.acked_features());
    assert_eq!(f.backend.cache_mode(), CacheMode::Writethrough);
    // A device over a different disk refuses the state.
    let dir = tempfile::tempdir().unwrap();
    let small = temp_disk(dir.path(), 4096);
    let mut wrong = Block::new(raw(&small, false), BlockConfig::default()).unwrap();
    assert!(wrong.restore_state(&saved).is_err());
    let mut wrong = Block::new(
        f.backend.clone(),
        BlockConfig {
            num_queues: 2,
            ..BlockConfig::default()
        },
    )
    .unwrap();
    assert!(wrong.restore_state(&saved).is_err());
}

/// A device over a fresh 1 MiB raw image (the file is unlinked once opened).
fn conformance_device() -> Box<dyn VirtioDevice> {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_disk(dir.path(), DISK_SIZE);
    Box::new(Block::new(raw(&path, false), BlockConfig::default()).unwrap())
}

fn conformance_probes() -> Vec<crate::conformance::Probe> {
    let read = RequestHeader {
        type_: req_type::IN.to_le(),
        reserved: 0,
        sector: 3u64.to_le(),
    };
    let write = RequestHeader {
        type_: req_type::OUT.to_le(),
        ..read
    };
    let mut out = vm_memory::ByteValued::as_slice(&write).to_vec();
    out.extend_from_slice(&[0x42; 512]);
    vec![
        crate::conformance::Probe {
            queue: 0,
            readable: vec![vm_memory::ByteValued::as_slice(&read).to_vec()],
            writable: vec![512, 1],
        },
        crate::conformance::Probe {
            queue: 0,
            readable: vec![out],
            writable: vec![1],
        },
    ]
}

crate::virtio_conformance_tests!(conformance, conformance_device(), conformance_probes());

/// Sixteen writes, a flush, then sixteen reads, all available at once: the data requests run
/// on several threads, the flush alone between them, and every chain completes with its own
/// status byte and length.
#[test]
fn a_batch_of_requests_runs_in_parallel_with_the_flush_in_order() {
    let f = fixture(BlockConfig::default());
    let mem = memory();
    let mut tq = TestQueue::new(&mem, 0, 128);
    let (h, irq) = handler(&f, &mem, &tq);
    let mut h = h.with_parallel_requests(4);
    // Per request k: header at HDR + 32k, status byte at STATUS + k, one 512-byte sector of
    // data at DATA + 0x1000k, written to / read from sector 10 + k.
    let hdr = |k: u64, type_: u32, sector: u64| {
        mem.write_obj(type_, GuestAddress(HDR + 32 * k)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 32 * k + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 32 * k + 8))
            .unwrap();
    };
    for k in 0..16u64 {
        hdr(k, req_type::OUT, 10 + k);
        mem.write_slice(&[k as u8 + 1; 512], GuestAddress(DATA + 0x1000 * k))
            .unwrap();
        tq.add(&[
            D(HDR + 32 * k, 16, false),
            D(DATA + 0x1000 * k, 512, false),
            D(STATUS + k, 1, true),
        ]);
    }
    hdr(16, req_type::FLUSH, 0);
    tq.add(&[D(HDR + 32 * 16, 16, false), D(STATUS + 16, 1, true)]);
    for k in 17..33u64 {
        hdr(k, req_type::IN, 10 + (k - 17));
        tq.add(&[
            D(HDR + 32 * k, 16, false),
            D(DATA + 0x1000 * k, 512, true),
            D(STATUS + k, 1, true),
        ]);
    }
    mem.write_slice(&[0xee; 33], GuestAddress(STATUS)).unwrap();
    assert_eq!(h.process_queue(0), 33);
    assert_eq!(
        irq.count(VirtioInterruptType::Queue(0)),
        1,
        "one interrupt per batch"
    );
    for k in 0..33u64 {
        let st: u8 = mem.read_obj(GuestAddress(STATUS + k)).unwrap();
        assert_eq!(st, status::OK, "request {k}");
    }
    for k in 17..33u64 {
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA + 0x1000 * k))
            .unwrap();
        assert_eq!(back, [(k - 17) as u8 + 1; 512], "read {k}");
    }
    let mut lens: Vec<u32> = (0..33).map(|i| tq.used(i).1).collect();
    lens.sort_unstable();
    assert_eq!(
        &lens[..17],
        &[1; 17],
        "writes and the flush return the status byte"
    );
    assert_eq!(&lens[17..], &[513; 16], "reads return data + status");
    let file = std::fs::read(&f.path).unwrap();
    for k in 0..16usize {
        assert_eq!(file[(10 + k) * 512], k as u8 + 1);
    }
}
