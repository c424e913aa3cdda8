// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio-blk (virtio 1.2, section 5.2) over any [`vmkit_block::BlockBackend`].
//!
//! Requests are served by worker threads, one per queue group; each request moves data
//! straight between the image and guest memory (the backend takes `VolatileSlice`s of guest
//! memory). Features: `SEG_MAX`, `SIZE_MAX`, `BLK_SIZE`, `TOPOLOGY`, `FLUSH`, `CONFIG_WCE`,
//! `RO`, `DISCARD`, `WRITE_ZEROES`, `MQ`, and the ring features `EVENT_IDX` and
//! `INDIRECT_DESC`.
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::Arc;
//! use vmkit_block::{raw::RawBackend, CacheMode};
//! use vmkit_virtio::devices::block::{Block, BlockConfig};
//!
//! let disk = Path::new("disk.img");
//! let backend = RawBackend::open(disk, false, CacheMode::Writeback).expect("open");
//! let config = BlockConfig {
//!     num_queues: 4,
//!     serial: "vmkit-disk0".into(),
//!     path: Some(disk.to_path_buf()),
//!     ..BlockConfig::default()
//! };
//! let block = Block::new(Arc::new(backend), config).expect("valid disk");
//! // Hand `block` to a virtio-pci or virtio-mmio transport.
//! # let _ = block;
//! ```

pub mod request;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::GuestAddressSpace;
use vmkit_block::{BlockBackend, CacheMode};
use vmkit_migration::{decode_section, encode_section, Section, VersionedState};

use self::request::{RequestLimits, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE};
use super::worker::{EventControl, EventHandler, Parked, WorkerSet};
use super::{drain_queue_batched, GuestMem};
use crate::{
    device_type, features, ActivateContext, VirtioDevice, VirtioError, VirtioInterrupt,
    VirtioMemory,
};

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub mod feature {
    /// `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command.
    pub const FLUSH: u64 = 1 << 9;
    /// Topology fields are valid.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// `writeback` can be toggled.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// Multiqueue; `num_queues` is valid.
    pub const MQ: u64 = 1 << 12;
    /// Discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Write-zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Size of the configuration space we expose (`virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding).
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Offset of `writeback` in the configuration space.
pub const CONFIG_WRITEBACK_OFFSET: u64 = 32;

/// Block topology reported with `VIRTIO_BLK_F_TOPOLOGY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockTopology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    pub opt_io_size: u32,
}

impl Default for BlockTopology {
    fn default() -> Self {
        BlockTopology {
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 0,
        }
    }
}

/// How a block device is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Number of request queues (more than one offers `VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// Maximum size of each queue (power of two, 2..=32768).
    pub queue_size: u16,
    /// Worker threads; queue `i` is served by worker `i % workers` (clamped to
    /// 1..=`num_queues`).
    pub workers: usize,
    /// Serial returned by `GET_ID` (at most 20 bytes; padded with NULs).
    pub serial: String,
    /// Present the disk read-only (`VIRTIO_BLK_F_RO`). A read-only backend requires it.
    pub read_only: bool,
    /// Logical block size reported in `blk_size` (a power of two, at least 512).
    pub logical_block_size: u32,
    /// Topology.
    pub topology: BlockTopology,
    /// Largest single data segment the driver should use (`size_max`).
    pub size_max: u32,
    /// Offer `VIRTIO_BLK_F_DISCARD`.
    pub discard: bool,
    /// Offer `VIRTIO_BLK_F_WRITE_ZEROES`.
    pub write_zeroes: bool,
    /// `max_discard_sectors` and `max_write_zeroes_sectors`.
    pub max_discard_sectors: u32,
    /// `max_discard_seg` and `max_write_zeroes_seg`.
    pub max_discard_seg: u32,
    /// The image's file name, used in error messages.
    pub path: Option<PathBuf>,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            num_queues: 1,
            queue_size: 256,
            workers: 1,
            serial: String::new(),
            read_only: false,
            logical_block_size: 512,
            topology: BlockTopology::default(),
            size_max: 1 << 20,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            path: None,
        }
    }
}

/// Why a block device could not be built or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockDeviceError {
    /// The backend is read-only but the device was configured writable.
    #[error("virtio-blk: disk {disk} is read-only; configure the device read-only or open the image writable")]
    NotWritable {
        /// The image name.
        disk: String,
    },
    /// The image size is not a whole number of sectors.
    #[error("virtio-blk: disk {disk} has size {size}, not a multiple of 512 bytes")]
    UnalignedSize {
        /// The image name.
        disk: String,
        /// Its size.
        size: u64,
    },
    /// A configuration value is out of range.
    #[error("virtio-blk: disk {disk}: {reason}")]
    Config {
        /// The image name.
        disk: String,
        /// What is wrong.
        reason: String,
    },
}

/// Saved state of a block device (the transport saves the queues).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockState {
    /// Features offered.
    pub avail_features: u64,
    /// Features negotiated.
    pub acked_features: u64,
    /// Disk size in sectors.
    pub capacity_sectors: u64,
    /// Number of queues.
    pub num_queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Serial.
    pub serial: String,
    /// The `writeback` bit as the driver last set it (`None`: never written).
    pub writeback: Option<bool>,
}

impl VersionedState for BlockState {
    const NAME: &'static str = "vmkit-virtio/block";
    const VERSION: u16 = 1;
}

/// Requests of one queue that run at the same time by default (see
/// [`BlockQueueHandler::with_parallel_requests`]).
pub const DEFAULT_PARALLEL_REQUESTS: usize = 8;

/// Most chains taken from a queue in one batch.
const MAX_BATCH: usize = 64;

/// The queue handler of one queue group: serves its queues without threads of its own.
///
/// Every chain available on a queue is taken at once; consecutive reads and writes among
/// them run concurrently (the backends' I/O is synchronous, so this is what keeps several
/// requests in flight at the host), other requests run alone and in order. Completion order
/// is free for virtio-blk: a driver waits for the writes a flush must cover before it sends
/// the flush.
pub struct BlockQueueHandler {
    mem: VirtioMemory,
    queues: Vec<(u16, Queue)>,
    backend: Arc<dyn BlockBackend>,
    interrupt: Arc<dyn VirtioInterrupt>,
    limits: RequestLimits,
    parallel: usize,
    pool: Option<IoPool>,
}

impl BlockQueueHandler {
    /// A handler for `queues` (index, queue) with the given request limits.
    pub fn new(
        mem: VirtioMemory,
        queues: Vec<(u16, Queue)>,
        backend: Arc<dyn BlockBackend>,
        interrupt: Arc<dyn VirtioInterrupt>,
        limits: RequestLimits,
    ) -> Self {
        BlockQueueHandler {
            mem,
            queues,
            backend,
            interrupt,
            limits,
            parallel: DEFAULT_PARALLEL_REQUESTS,
            pool: None,
        }
    }

    /// Runs at most `n` requests of a queue at the same time (1: one after the other).
    pub fn with_parallel_requests(mut self, n: usize) -> Self {
        self.parallel = n.max(1);
        self
    }

    /// Serves every available request of the queue in `slot`; returns how many completed.
    pub fn process_queue(&mut self, slot: usize) -> usize {
        self.process_queue_until(slot, &|| false)
    }

    /// Like [`BlockQueueHandler::process_queue`], but returns between batches once `stop`
    /// says so (the rest stays in the ring).
    pub fn process_queue_until(&mut self, slot: usize, stop: &dyn Fn() -> bool) -> usize {
        let Some((index, queue)) = self.queues.get_mut(slot) else {
            return 0;
        };
        let guard = self.mem.memory();
        let mem: &GuestMem = &guard;
        let limits = &self.limits;
        let mut io = BatchIo {
            vmem: &self.mem,
            backend: &self.backend,
            parallel: &mut self.parallel,
            pool: &mut self.pool,
        };
        drain_queue_batched(
            queue,
            *index,
            mem,
            self.interrupt.as_ref(),
            MAX_BATCH,
            stop,
            |chains| io.execute_batch(chains, mem, limits),
        )
    }

    /// The request limits in force.
    pub fn limits(&self) -> &RequestLimits {
        &self.limits
    }
}

type Parsed = Result<request::Request, request::ParseFailure>;
type Job = Box<dyn FnOnce() + Send>;

/// Persistent I/O threads of one queue handler: runs of reads and writes are handed to them
/// so that several requests reach the host at once (the backends' I/O is synchronous).
/// Created on first use; dropping it stops and joins the threads.
struct IoPool {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl IoPool {
    fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let mut pool = IoPool {
            jobs: Some(tx),
            threads: Vec::with_capacity(threads),
        };
        for n in 0..threads {
            let rx = rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("virtio-blk-io{n}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What executing a batch needs from its handler.
struct BatchIo<'a> {
    vmem: &'a VirtioMemory,
    backend: &'a Arc<dyn BlockBackend>,
    parallel: &'a mut usize,
    pool: &'a mut Option<IoPool>,
}

impl BatchIo<'_> {
    /// Parses `chains` and executes them: runs of reads and writes on the I/O threads,
    /// anything else alone, in order. Returns the used length of each chain, in order.
    fn execute_batch(
        &mut self,
        chains: Vec<virtio_queue::DescriptorChain<&GuestMem>>,
        mem: &GuestMem,
        limits: &RequestLimits,
    ) -> Vec<u32> {
        let parsed: Vec<Parsed> = chains
            .into_iter()
            .map(|chain| request::parse(chain, mem, limits))
            .collect();
        let mut lens = vec![0u32; parsed.len()];
        let mut run: Vec<(usize, Parsed)> = Vec::new();
        for (i, p) in parsed.into_iter().enumerate() {
            let data = matches!(
                &p,
                Ok(r) if matches!(r.kind, request::RequestKind::In | request::RequestKind::Out)
            );
            if data {
                run.push((i, p));
                continue;
            }
            self.execute_run(std::mem::take(&mut run), &mut lens, mem, limits);
            lens[i] = request::finish(p, mem, self.backend.as_ref(), limits);
        }
        self.execute_run(run, &mut lens, mem, limits);
        lens
    }

    /// Executes a run of reads and writes: inline when it is one request (or parallelism is
    /// off), else on the I/O threads, waiting for all of them.
    fn execute_run(
        &mut self,
        run: Vec<(usize, Parsed)>,
        lens: &mut [u32],
        mem: &GuestMem,
        limits: &RequestLimits,
    ) {
        if run.len() > 1 && *self.parallel > 1 && self.pool.is_none() {
            match IoPool::new(*self.parallel) {
                Ok(pool) => *self.pool = Some(pool),
                Err(e) => {
                    log::warn!("virtio-blk: no I/O threads ({e}); requests run one by one");
                    *self.parallel = 1;
                }
            }
        }
        let sender = match self.pool.as_ref().and_then(|p| p.jobs.clone()) {
            Some(tx) if run.len() > 1 => tx,
            _ => {
                for (i, p) in run {
                    lens[i] = request::finish(p, mem, self.backend.as_ref(), limits);
                }
                return;
            }
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel::<(usize, u32)>();
        let mut pending: Vec<(usize, Option<vm_memory::GuestAddress>)> = Vec::new();
        for (i, p) in run {
            let status_addr = p.as_ref().ok().map(|r| r.status_addr);
            let (vmem, backend, limits, done) = (
                self.vmem.clone(),
                self.backend.clone(),
                limits.clone(),
                done_tx.clone(),
            );
            let job: Job = Box::new(move || {
                let guard = vmem.memory();
                // A panicking request is reported by the waiting worker; the thread lives on.
                if let Ok(len) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    request::finish(p, &guard, backend.as_ref(), &limits)
                })) {
                    let _ = done.send((i, len));
                }
            });
            pending.push((i, status_addr));
            // A job that cannot be queued is dropped and reported below.
            let _ = sender.send(job);
        }
        drop(done_tx);
        let mut completed = vec![false; lens.len()];
        while let Ok((i, len)) = done_rx.recv() {
            lens[i] = len;
            completed[i] = true;
        }
        // A request that never completed (its job panicked, or could not be queued) must
        // not look successful: the driver does not preset the status byte, and a stale 0
        // reads as OK. It gets IOERR.
        for (i, status_addr) in pending {
            if !completed[i] {
                log::error!("virtio-blk: a request failed inside the I/O thread; IOERR");
                lens[i] = match status_addr {
                    Some(addr)
                        if vm_memory::Bytes::write_obj(mem, request::status::IOERR, addr)
                            .is_ok() =>
                    {
                        1
                    }
                    _ => 0,
                };
            }
        }
    }
}

impl EventHandler for BlockQueueHandler {
    fn start(&mut self, ctl: &EventControl<'_>) {
        for slot in 0..self.queues.len() {
            self.process_queue_until(slot, &|| ctl.stop_requested());
        }
    }

    fn queue_notified(&mut self, slot: usize, ctl: &EventControl<'_>) {
        self.process_queue_until(slot, &|| ctl.stop_requested());
    }
}

/// The virtio-blk device.
pub struct Block {
    config: BlockConfig,
    disk: String,
    backend: Arc<dyn BlockBackend>,
    capacity_sectors: u64,
    avail_features: u64,
    acked_features: u64,
    initial_cache: CacheMode,
    writeback: Option<bool>,
    workers: WorkerSet<BlockQueueHandler>,
}

impl Block {
    /// A block device over `backend`. Fails with a message naming the disk
    /// ([`BlockConfig::path`]) if the backend is read-only for a writable device, its size
    /// is not a multiple of 512, or a configuration value is out of range.
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        config: BlockConfig,
    ) -> Result<Self, BlockDeviceError> {
        let disk = config
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("({} image)", backend.format()));
        let cfg_err = |reason: String| BlockDeviceError::Config {
            disk: disk.clone(),
            reason,
        };
        if backend.is_read_only() && !config.read_only {
            return Err(BlockDeviceError::NotWritable { disk });
        }
        let size = backend.virtual_size();
        if size % SECTOR_SIZE != 0 {
            return Err(BlockDeviceError::UnalignedSize { disk, size });
        }
        if config.num_queues == 0 {
            return Err(cfg_err("num_queues must be at least 1".into()));
        }
        if config.queue_size < 2
            || !config.queue_size.is_power_of_two()
            || config.queue_size > 32768
        {
            return Err(cfg_err(format!(
                "queue size {} is not a power of two in 2..=32768",
                config.queue_size
            )));
        }
        if config.serial.len() > ID_BYTES {
            return Err(cfg_err(format!(
                "serial {:?} is longer than {ID_BYTES} bytes",
                config.serial
            )));
        }
        if config.logical_block_size < 512 || !config.logical_block_size.is_power_of_two() {
            return Err(cfg_err(format!(
                "logical block size {} is not a power of two >= 512",
                config.logical_block_size
            )));
        }
        if config.size_max < 512 {
            return Err(cfg_err(format!(
                "size_max {} is below 512",
                config.size_max
            )));
        }
        let mut avail = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::SEG_MAX
            | feature::SIZE_MAX
            | feature::BLK_SIZE
            | feature::TOPOLOGY
            | feature::FLUSH
            | feature::CONFIG_WCE;
        if config.read_only {
            avail |= feature::RO;
        } else {
            if config.discard {
                avail |= feature::DISCARD;
            }
            if config.write_zeroes {
                avail |= feature::WRITE_ZEROES;
            }
        }
        if config.num_queues > 1 {
            avail |= feature::MQ;
        }
        let initial_cache = backend.cache_mode();
        Ok(Block {
            disk,
            capacity_sectors: size >> SECTOR_SHIFT,
            avail_features: avail,
            acked_features: 0,
            initial_cache,
            writeback: None,
            workers: WorkerSet::new("virtio-blk"),
            backend,
            config,
        })
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Disk size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    fn seg_max(&self) -> u32 {
        // Two descriptors of a chain carry the header and the status.
        u32::from(self.config.queue_size).saturating_sub(2).max(1)
    }

    fn writeback_bit(&self) -> u8 {
        match self.backend.cache_mode() {
            CacheMode::Writethrough => 0,
            _ => 1,
        }
    }

    /// The request limits under the negotiated features.
    pub fn request_limits(&self) -> RequestLimits {
        let mut serial = [0u8; ID_BYTES];
        let s = self.config.serial.as_bytes();
        let n = s.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&s[..n]);
        let acked = self.acked_features;
        RequestLimits {
            capacity_sectors: self.capacity_sectors,
            seg_max: self.seg_max(),
            read_only: self.config.read_only,
            flush: acked & feature::FLUSH != 0,
            discard: acked & feature::DISCARD != 0,
            write_zeroes: acked & feature::WRITE_ZEROES != 0,
            max_discard_sectors: self.config.max_discard_sectors,
            max_discard_seg: self.config.max_discard_seg,
            max_write_zeroes_sectors: self.config.max_discard_sectors,
            max_write_zeroes_seg: self.config.max_discard_seg,
            serial,
        }
    }

    /// The configuration space (`virtio_blk_config`, little endian).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let c = &self.config;
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &c.size_max.to_le_bytes());
        put(12, &self.seg_max().to_le_bytes());
        // 16..20: geometry, not offered.
        put(20, &c.logical_block_size.to_le_bytes());
        put(
            24,
            &[c.topology.physical_block_exp, c.topology.alignment_offset],
        );
        put(26, &c.topology.min_io_size.to_le_bytes());
        put(28, &c.topology.opt_io_size.to_le_bytes());
        put(32, &[self.writeback_bit()]);
        put(34, &c.num_queues.to_le_bytes());
        let lba_sectors = (c.logical_block_size / 512).max(1);
        put(36, &c.max_discard_sectors.to_le_bytes());
        put(40, &c.max_discard_seg.to_le_bytes());
        put(44, &lba_sectors.to_le_bytes());
        put(48, &c.max_discard_sectors.to_le_bytes());
        put(52, &c.max_discard_seg.to_le_bytes());
        put(56, &[1]);
        b
    }

    fn set_writeback(&mut self, on: bool) {
        let mode = if on {
            CacheMode::Writeback
        } else {
            CacheMode::Writethrough
        };
        if self.backend.cache_mode() == mode {
            self.writeback = Some(on);
            return;
        }
        match self.backend.set_cache_mode(mode) {
            Ok(()) => self.writeback = Some(on),
            Err(e) => log::warn!(
                "virtio-blk {}: cannot switch cache mode to {}: {e}",
                self.disk,
                mode.as_str()
            ),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size; usize::from(self.config.num_queues)]
    }

    fn device_features(&self) -> u64 {
        self.avail_features
    }

    fn negotiate_features(&mut self, features: u64) -> Result<(), VirtioError> {
        if features & !self.avail_features != 0 {
            return Err(VirtioError::Features(features));
        }
        self.acked_features = features;
        // A driver that cannot flush gets a write-through disk, before it can read
        // `writeback` (virtio 1.2, 5.2.6.2: with CONFIG_WCE but not FLUSH, writeback MUST
        // start at 0; with neither, nothing could ever make writes durable).
        if features & feature::FLUSH == 0 && self.backend.cache_mode() == CacheMode::Writeback {
            self.set_writeback(false);
        }
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.config_space();
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= space.len() {
            return;
        }
        let n = data.len().min(space.len() - start);
        data[..n].copy_from_slice(&space[start..start + n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == CONFIG_WRITEBACK_OFFSET
            && data.len() == 1
            && self.acked_features & feature::CONFIG_WCE != 0
        {
            // Writeback without a way to flush would lose completed writes on a crash.
            if data[0] != 0 && self.acked_features & feature::FLUSH == 0 {
                log::debug!(
                    "virtio-blk {}: writeback refused, FLUSH was not negotiated",
                    self.disk
                );
                return;
            }
            self.set_writeback(data[0] != 0);
        } else {
            log::debug!(
                "virtio-blk {}: ignored config write of {} bytes at {offset:#x}",
                self.disk,
                data.len()
            );
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        self.workers.clear();
        if ctx.queues.is_empty() {
            return Err(VirtioError::Queue {
                index: 0,
                reason: "no request queue enabled".into(),
            });
        }
        let workers = self.config.workers.clamp(1, ctx.queues.len().max(1));
        let mut groups: Vec<(Vec<(u16, Queue)>, Vec<_>)> =
            (0..workers).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, q) in ctx.queues.into_iter().enumerate() {
            if q.index >= self.config.num_queues {
                return Err(VirtioError::Queue {
                    index: q.index,
                    reason: format!("device has {} queues", self.config.num_queues),
                });
            }
            let g = &mut groups[i % workers];
            g.0.push((q.index, q.queue));
            g.1.push(q.notify);
        }
        let limits = self.request_limits();
        let parked = groups
            .into_iter()
            .map(|(queues, notifiers)| Parked {
                handler: BlockQueueHandler::new(
                    ctx.mem.clone(),
                    queues,
                    self.backend.clone(),
                    ctx.interrupt.clone(),
                    limits.clone(),
                ),
                notifiers,
            })
            .collect();
        self.workers
            .start(parked)
            .map_err(|e| VirtioError::Activate(format!("virtio-blk workers: {e}")))
    }

    fn reset(&mut self) {
        // Joining the workers waits for the requests they are executing.
        self.workers.clear();
        self.acked_features = 0;
        if self.writeback.take().is_some() && self.backend.cache_mode() != self.initial_cache {
            if let Err(e) = self.backend.set_cache_mode(self.initial_cache) {
                log::warn!("virtio-blk {}: restoring cache mode: {e}", self.disk);
            }
        }
    }

    fn save_state(&self) -> Result<Section, VirtioError> {
        encode_section(&BlockState {
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            capacity_sectors: self.capacity_sectors,
            num_queues: self.config.num_queues,
            queue_size: self.config.queue_size,
            serial: self.config.serial.clone(),
            writeback: self.writeback,
        })
        .map_err(|e| VirtioError::State(e.to_string()))
    }

    fn restore_state(&mut self, state: &Section) -> Result<(), VirtioError> {
        let s: BlockState = decode_section(state).map_err(|e| VirtioError::State(e.to_string()))?;
        let mismatch = |what: &str, saved: String, here: String| {
            VirtioError::State(format!(
                "virtio-blk {}: saved {what} {saved} differs from this device's {here}",
                self.disk
            ))
        };
        if s.capacity_sectors != self.capacity_sectors {
            return Err(mismatch(
                "capacity (sectors)",
                s.capacity_sectors.to_string(),
                self.capacity_sectors.to_string(),
            ));
        }
        if s.num_queues != self.config.num_queues || s.queue_size != self.config.queue_size {
            return Err(mismatch(
                "queues",
                format!("{}x{}", s.num_queues, s.queue_size),
                format!("{}x{}", self.config.num_queues, self.config.queue_size),
            ));
        }
        if s.acked_features & !self.avail_features != 0 {
            return Err(mismatch(
                "features",
                format!("{:#x}", s.acked_features),
                format!("{:#x}", self.avail_features),
            ));
        }
        self.acked_features = s.acked_features;
        if let Some(wb) = s.writeback {
            self.set_writeback(wb);
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VirtioError> {
        self.workers.pause();
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        self.workers
            .resume()
            .map_err(|e| VirtioError::Activate(format!("virtio-blk workers: {e}")))
    }
}

#[cfg(test)]
mod tests;
