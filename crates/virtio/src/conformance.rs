// SPDX-License-Identifier: Apache-2.0 OR MIT
//! A conformance suite any [`VirtioDevice`] implementation can run.
//!
//! The checks drive the device the way a guest driver does: through the real virtio-mmio
//! transport ([`VirtioMmio`]), with guest memory from vm-memory, rings written into that
//! memory and notifications through the queue eventfds. They cover:
//!
//! - [`check_feature_negotiation`]: `FEATURES_OK` is accepted for the offered features and
//!   for `VIRTIO_F_VERSION_1` alone, refused for unoffered bits and without `VERSION_1`;
//! - [`check_reset`]: reset before and after activation returns promptly, clears the
//!   status, and the device can be negotiated and activated again (and completes requests);
//! - [`check_malformed_chains`]: descriptor loops, addresses outside guest memory, zero
//!   lengths, over-long chains, bad indirect tables, write-before-read order, random bytes in
//!   the rings — no thread may panic (a process-wide panic hook counts panics in every
//!   thread), and after each recoverable malformation the device completes a good request
//!   on the same queue (or has set `DEVICE_NEEDS_RESET`, which the spec allows);
//! - [`check_state_round_trip`]: `save_state` → fresh device → `restore_state` →
//!   `save_state` gives the same section, and a whole transport saved while active and
//!   restored around a fresh device carries on completing requests.
//!
//! Requests the device must complete are described by [`Probe`]s (a queue and the buffers
//! of one good request), since only the device author knows what a good request is.
//! [`virtio_conformance_tests!`](crate::virtio_conformance_tests) turns the suite into
//! `#[test]` functions:
//!
//! ```
//! use vmkit_virtio::conformance::Probe;
//! use vmkit_virtio::devices::rng::Rng;
//!
//! // In a test file: four #[test]s checking the entropy device.
//! vmkit_virtio::virtio_conformance_tests!(
//!     rng_conformance,
//!     Box::new(Rng::new(256).expect("queue size")),
//!     vec![Probe::writable(0, &[64])]
//! );
//! ```
//!
//! or, without the macro:
//!
//! ```no_run
//! use vmkit_virtio::conformance::{run_all, Probe};
//! use vmkit_virtio::devices::rng::Rng;
//!
//! run_all(
//!     || Box::new(Rng::new(256).expect("queue size")),
//!     &[Probe::writable(0, &[64])],
//! )
//! .map_err(|failures| format!("{failures:?}"))?;
//! # Ok::<(), String>(())
//! ```
//!
//! The panic count is process-wide: conformance checks serialise among themselves, but a
//! test elsewhere in the same binary that panics on purpose while a check runs is counted
//! against the check.
//!
//! [`Driver`] is the small guest driver the checks use; device tests can use it directly.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmkit_device::testing::CountingLine;
use vmkit_device::{BusDevice, TriggerMode};

use crate::device::{features, status, VirtioDevice, VirtioMemory};
use crate::transport::{mmio_regs as r, VirtioMmio};

/// Size of the guest memory the checks use.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where the harness places the MMIO window (the bus base the transport sees).
pub const MMIO_BASE: u64 = 0xd000_0000;
const RING_BASE: u64 = 0x10_0000;
const RING_STRIDE: u64 = 0x4000;
const DATA_BASE: u64 = 0x40_0000;
const MAX_HARNESS_QUEUES: usize = 64;
const MAX_HARNESS_QUEUE_SIZE: u16 = 256;

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// A check that failed.
#[derive(Debug, thiserror::Error)]
#[error("conformance check {check} failed: {reason}")]
pub struct ConformanceFailure {
    /// Which check.
    pub check: &'static str,
    /// What went wrong.
    pub reason: String,
}

fn fail(check: &'static str, reason: impl std::fmt::Display) -> ConformanceFailure {
    ConformanceFailure {
        check,
        reason: reason.to_string(),
    }
}

/// What went wrong while [`Driver`] drove the device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The device did not do what a conforming device does.
    #[error("{0}")]
    Device(String),
    /// Writing 0 to the status register did not return.
    #[error("reset did not return within {0:?}")]
    ResetTimeout(Duration),
    /// A request was not completed in time.
    #[error("probe on queue {queue} not completed within {timeout:?}")]
    ProbeTimeout {
        /// The queue.
        queue: u16,
        /// How long the driver waited.
        timeout: Duration,
    },
    /// Guest memory could not be written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The helper thread for a reset could not be started.
    #[error("cannot spawn the reset thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// One good request for the device under test: device-readable buffers followed by
/// device-writable buffers of the given sizes, on `queue`. The device must put it in the
/// used ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Queue index.
    pub queue: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Vec<u8>>,
    /// Sizes of the device-writable buffers that follow.
    pub writable: Vec<u32>,
}

impl Probe {
    /// A request of device-writable buffers only (e.g. an entropy request).
    pub fn writable(queue: u16, sizes: &[u32]) -> Self {
        Self {
            queue,
            readable: Vec::new(),
            writable: sizes.to_vec(),
        }
    }

    /// A request of device-readable buffers only (e.g. console output).
    pub fn readable(queue: u16, buffers: &[&[u8]]) -> Self {
        Self {
            queue,
            readable: buffers.iter().map(|b| b.to_vec()).collect(),
            writable: Vec::new(),
        }
    }
}

// ---- panic counting ------------------------------------------------------------------

static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();
static SERIAL: Mutex<()> = Mutex::new(());

/// Installs (once) a panic hook that counts panics in every thread of the process, then
/// calls the hook that was installed before.
pub fn install_panic_counter() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !REPORTING.with(std::cell::Cell::get) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

thread_local! {
    static REPORTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Fails the calling test with `failure`: panics with its message, without the panic being
/// counted against conformance checks running concurrently on other threads (the generated
/// tests use this).
pub fn report(failure: ConformanceFailure) -> ! {
    REPORTING.with(|r| r.set(true));
    panic!("{failure}");
}

/// Panics counted so far by [`install_panic_counter`]'s hook.
pub fn panic_count() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// Runs `body` with the panic counter installed and conformance checks serialised; a
/// panic in any thread during `body` (or `body` unwinding) fails the check.
fn guarded(
    check: &'static str,
    body: impl FnOnce() -> Result<(), ConformanceFailure>,
) -> Result<(), ConformanceFailure> {
    install_panic_counter();
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let before = panic_count();
    let result = panic::catch_unwind(AssertUnwindSafe(body));
    // Give worker threads that panicked a moment to reach the hook.
    std::thread::sleep(Duration::from_millis(20));
    let panics = panic_count() - before;
    let outcome = match result {
        Err(_) => Err("the check's own thread panicked (device code on the vCPU path)".to_string()),
        Ok(Err(e)) => Err(e.reason),
        Ok(Ok(())) => Ok(()),
    };
    match (panics, outcome) {
        (0, Ok(())) => Ok(()),
        (0, Err(reason)) => Err(fail(check, reason)),
        (n, Ok(())) => Err(fail(check, format!("{n} thread(s) panicked"))),
        (n, Err(reason)) => Err(fail(
            check,
            format!("{n} thread(s) panicked; then: {reason}"),
        )),
    }
}

// ---- the driver harness --------------------------------------------------------------

/// Builds the guest memory the harness uses ([`MEM_SIZE`] bytes at address 0).
pub fn guest_memory() -> Result<VirtioMemory, ConformanceFailure> {
    let m = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .map_err(|e| fail("setup", format!("guest memory: {e}")))?;
    Ok(GuestMemoryAtomic::new(m))
}

#[derive(Clone, Debug)]
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    next_desc: u16,
    used_seen: u16,
}

/// A minimal guest driver for a [`VirtioMmio`] transport: negotiates, sets up split
/// virtqueues in guest memory, posts descriptor chains (well-formed or not) and watches
/// the used rings.
pub struct Driver {
    /// The transport under test.
    pub transport: Arc<VirtioMmio>,
    /// Guest memory.
    pub mem: VirtioMemory,
    /// The transport's interrupt line.
    pub line: Arc<CountingLine>,
    queues: Vec<DriverQueue>,
    data_next: u64,
}

impl Driver {
    /// Wraps `device` in a virtio-mmio transport over fresh guest memory.
    pub fn new(device: Box<dyn VirtioDevice>) -> Result<Self, ConformanceFailure> {
        let mem = guest_memory()?;
        let line = Arc::new(CountingLine::new(TriggerMode::Edge));
        let transport = VirtioMmio::new(device, mem.clone(), line.clone(), MMIO_BASE, None)
            .map_err(|e| fail("setup", format!("transport: {e}")))?;
        Ok(Self::with_transport(Arc::new(transport), mem, line))
    }

    /// Drives an existing transport (e.g. one restored from a snapshot).
    pub fn with_transport(
        transport: Arc<VirtioMmio>,
        mem: VirtioMemory,
        line: Arc<CountingLine>,
    ) -> Self {
        Self {
            transport,
            mem,
            line,
            queues: Vec::new(),
            data_next: DATA_BASE,
        }
    }

    /// Reads a 32-bit register.
    pub fn read(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(MMIO_BASE, offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write(&self, offset: u64, v: u32) {
        self.transport.write(MMIO_BASE, offset, &v.to_le_bytes());
    }

    /// The device status.
    pub fn status(&self) -> u8 {
        self.read(r::STATUS) as u8
    }

    /// The features the device offers.
    pub fn device_features(&self) -> u64 {
        self.write(r::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read(r::DEVICE_FEATURES));
        self.write(r::DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(self.read(r::DEVICE_FEATURES));
        lo | (hi << 32)
    }

    /// Number of queues (the first `QueueNumMax` of zero ends the list).
    pub fn num_queues(&self) -> u16 {
        let mut n = 0u16;
        while usize::from(n) < MAX_HARNESS_QUEUES {
            self.write(r::QUEUE_SEL, u32::from(n));
            if self.read(r::QUEUE_NUM_MAX) == 0 {
                break;
            }
            n += 1;
        }
        n
    }

    /// Writes 0 to the status register on another thread and waits up to `timeout` for
    /// the write (the device's `reset`) to return.
    pub fn reset(&mut self, timeout: Duration) -> Result<(), DriverError> {
        let t = Arc::clone(&self.transport);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("conformance-reset".into())
            .spawn(move || {
                t.write(MMIO_BASE, r::STATUS, &0u32.to_le_bytes());
                // Release the transport before reporting, so that dropping the driver
                // right after a reset drops the transport too.
                drop(t);
                let _ = tx.send(());
            })
            .map_err(DriverError::Spawn)?;
        rx.recv_timeout(timeout)
            .map_err(|_| DriverError::ResetTimeout(timeout))?;
        self.queues.clear();
        self.data_next = DATA_BASE;
        if self.status() != 0 {
            return Err(DriverError::Device(format!(
                "status reads {:#x} after reset",
                self.status()
            )));
        }
        Ok(())
    }

    /// ACKNOWLEDGE, DRIVER, writes `features`, sets FEATURES_OK; returns whether the device
    /// kept FEATURES_OK set.
    pub fn negotiate(&self, features: u64) -> bool {
        self.write(r::STATUS, u32::from(status::ACKNOWLEDGE));
        self.write(r::STATUS, u32::from(status::ACKNOWLEDGE | status::DRIVER));
        self.write(r::DRIVER_FEATURES_SEL, 0);
        self.write(r::DRIVER_FEATURES, features as u32);
        self.write(r::DRIVER_FEATURES_SEL, 1);
        self.write(r::DRIVER_FEATURES, (features >> 32) as u32);
        self.write(
            r::STATUS,
            u32::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        );
        self.status() & status::FEATURES_OK != 0
    }

    /// Sets up every queue (size `min(max, 256)`, rings in the harness's ring area) and
    /// enables it.
    pub fn setup_queues(&mut self) -> Result<(), DriverError> {
        self.queues.clear();
        let n = self.num_queues();
        for q in 0..n {
            self.write(r::QUEUE_SEL, u32::from(q));
            let max = self.read(r::QUEUE_NUM_MAX) as u16;
            let size = max.min(MAX_HARNESS_QUEUE_SIZE);
            let base = RING_BASE + u64::from(q) * RING_STRIDE;
            let dq = DriverQueue {
                size,
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                avail_idx: 0,
                next_desc: 0,
                used_seen: 0,
            };
            let zero = vec![0u8; RING_STRIDE as usize];
            self.mem
                .memory()
                .write_slice(&zero, GuestAddress(base))
                .map_err(|e| DriverError::Memory(e.to_string()))?;
            self.write(r::QUEUE_NUM, u32::from(size));
            for (lo, addr) in [
                (r::QUEUE_DESC_LOW, dq.desc),
                (r::QUEUE_DRIVER_LOW, dq.avail),
                (r::QUEUE_DEVICE_LOW, dq.used),
            ] {
                self.write(lo, addr as u32);
                self.write(lo + 4, (addr >> 32) as u32);
            }
            self.write(r::QUEUE_READY, 1);
            if self.read(r::QUEUE_READY) != 1 {
                return Err(DriverError::Device(format!(
                    "queue {q} did not become ready"
                )));
            }
            self.queues.push(dq);
        }
        Ok(())
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self) {
        self.write(
            r::STATUS,
            u32::from(
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
            ),
        );
    }

    /// Negotiates the device's features (all offered ones), sets up the queues and sets
    /// DRIVER_OK.
    pub fn bring_up(&mut self) -> Result<(), DriverError> {
        let f = self.device_features();
        if !self.negotiate(f) {
            return Err(DriverError::Device(format!(
                "FEATURES_OK refused for the offered features {f:#x}"
            )));
        }
        self.setup_queues()?;
        self.driver_ok();
        if self.status() & status::DRIVER_OK == 0 {
            return Err(DriverError::Device("DRIVER_OK did not stick".into()));
        }
        if self.status() & status::DEVICE_NEEDS_RESET != 0 {
            return Err(DriverError::Device(
                "the device set DEVICE_NEEDS_RESET at activation".into(),
            ));
        }
        Ok(())
    }

    /// Size of queue `q` as set up.
    pub fn queue_size(&self, q: u16) -> u16 {
        self.queues.get(usize::from(q)).map_or(0, |dq| dq.size)
    }

    /// Allocates `len` bytes of guest memory in the data area (16-byte aligned; the area
    /// wraps around when exhausted).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = (len.max(1) + 15) & !15;
        if self.data_next + len > MEM_SIZE {
            self.data_next = DATA_BASE;
        }
        let a = self.data_next;
        self.data_next += len;
        a
    }

    /// Writes bytes to guest memory.
    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        let _ = self.mem.memory().write_slice(data, GuestAddress(addr));
    }

    /// Writes descriptor `index` of queue `q`'s table (or of an indirect table at `table`).
    pub fn write_desc(&self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.write_mem(table + 16 * u64::from(index), &raw);
    }

    /// The descriptor table address of queue `q`.
    pub fn desc_table(&self, q: u16) -> u64 {
        self.queues.get(usize::from(q)).map_or(0, |dq| dq.desc)
    }

    /// Takes `n` consecutive descriptor indices of queue `q` (wrapping).
    pub fn take_descs(&mut self, q: u16, n: u16) -> Vec<u16> {
        let Some(dq) = self.queues.get_mut(usize::from(q)) else {
            return Vec::new();
        };
        (0..n)
            .map(|_| {
                let i = dq.next_desc;
                dq.next_desc = (dq.next_desc + 1) % dq.size.max(1);
                i
            })
            .collect()
    }

    /// Publishes `head` in queue `q`'s available ring.
    pub fn push_avail(&mut self, q: u16, head: u16) {
        let Some(dq) = self.queues.get_mut(usize::from(q)).cloned() else {
            return;
        };
        let slot = dq.avail + 4 + 2 * u64::from(dq.avail_idx % dq.size.max(1));
        self.write_mem(slot, &head.to_le_bytes());
        let idx = dq.avail_idx.wrapping_add(1);
        // used_event (EVENT_IDX): ask for an interrupt once this entry is used.
        let used_event = dq.avail + 4 + 2 * u64::from(dq.size);
        self.write_mem(used_event, &dq.avail_idx.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        self.write_mem(dq.avail + 2, &idx.to_le_bytes());
        if let Some(dq) = self.queues.get_mut(usize::from(q)) {
            dq.avail_idx = idx;
        }
    }

    /// Overwrites the available ring index of queue `q` (for malformed-ring checks).
    pub fn set_avail_idx(&mut self, q: u16, idx: u16) {
        if let Some(dq) = self.queues.get_mut(usize::from(q)) {
            dq.avail_idx = idx;
            let a = dq.avail + 2;
            self.write_mem(a, &idx.to_le_bytes());
        }
    }

    /// Notifies queue `q` through the `QueueNotify` register.
    pub fn notify(&self, q: u16) {
        self.write(r::QUEUE_NOTIFY, u32::from(q));
    }

    /// Posts a well-formed chain for `probe` and notifies; returns its head.
    pub fn post_probe(&mut self, probe: &Probe) -> Option<u16> {
        let n = probe.readable.len() + probe.writable.len();
        let n16 = u16::try_from(n).ok()?;
        if n == 0 || n16 > self.queue_size(probe.queue) {
            return None;
        }
        let ids = self.take_descs(probe.queue, n16);
        let table = self.desc_table(probe.queue);
        let mut bufs: Vec<(u64, u32, u16)> = Vec::with_capacity(n);
        for b in &probe.readable {
            let a = self.alloc(b.len() as u64);
            self.write_mem(a, b);
            bufs.push((a, b.len() as u32, 0));
        }
        for len in &probe.writable {
            let a = self.alloc(u64::from(*len));
            self.write_mem(a, &vec![0u8; *len as usize]);
            bufs.push((a, *len, VIRTQ_DESC_F_WRITE));
        }
        for (i, (addr, len, flags)) in bufs.iter().enumerate() {
            let next = ids.get(i + 1).copied();
            let flags = flags | if next.is_some() { VIRTQ_DESC_F_NEXT } else { 0 };
            self.write_desc(table, ids[i], *addr, *len, flags, next.unwrap_or(0));
        }
        self.push_avail(probe.queue, ids[0]);
        self.notify(probe.queue);
        Some(ids[0])
    }

    /// Waits up to `timeout` for `head` to appear in queue `q`'s used ring; returns the
    /// length the device wrote.
    pub fn wait_used(&mut self, q: u16, head: u16, timeout: Duration) -> Option<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            let dq = self.queues.get(usize::from(q))?.clone();
            let mem = self.mem.memory();
            let used_idx: u16 = mem.read_obj(GuestAddress(dq.used + 2)).ok()?;
            let mut seen = dq.used_seen;
            let mut found = None;
            while seen != used_idx {
                let e = dq.used + 4 + 8 * u64::from(seen % dq.size.max(1));
                let id: u32 = mem.read_obj(GuestAddress(e)).ok()?;
                let len: u32 = mem.read_obj(GuestAddress(e + 4)).ok()?;
                seen = seen.wrapping_add(1);
                if id == u32::from(head) {
                    found = Some(len);
                    break;
                }
            }
            drop(mem);
            if let Some(dqm) = self.queues.get_mut(usize::from(q)) {
                dqm.used_seen = seen;
            }
            if found.is_some() {
                return found;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Posts `probe` and waits for its completion.
    pub fn run_probe(&mut self, probe: &Probe, timeout: Duration) -> Result<u32, DriverError> {
        let head = self.post_probe(probe).ok_or_else(|| {
            DriverError::Device(format!("probe does not fit queue {}", probe.queue))
        })?;
        self.wait_used(probe.queue, head, timeout)
            .ok_or(DriverError::ProbeTimeout {
                queue: probe.queue,
                timeout,
            })
    }
}

// ---- checks --------------------------------------------------------------------------

/// How long a device gets to complete a request or return from reset.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Feature negotiation: the offered set and `VERSION_1` alone are accepted; unoffered bits,
/// a missing `VERSION_1` and bits beyond 64 are refused; feature writes after
/// `FEATURES_OK` do not change the negotiated set.
pub fn check_feature_negotiation(
    factory: impl Fn() -> Box<dyn VirtioDevice>,
) -> Result<(), ConformanceFailure> {
    const C: &str = "feature_negotiation";
    guarded(C, || {
        let mut d = Driver::new(factory())?;
        let offered = d.device_features();
        if offered & features::VERSION_1 == 0 {
            return Err(fail(
                C,
                format!("device does not offer VERSION_1 ({offered:#x})"),
            ));
        }
        if !d.negotiate(offered) {
            return Err(fail(C, format!("offered features {offered:#x} refused")));
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))?;
        if !d.negotiate(features::VERSION_1) {
            return Err(fail(C, "VERSION_1 alone refused"));
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))?;
        if d.negotiate(offered & !features::VERSION_1) {
            return Err(fail(C, "FEATURES_OK accepted without VERSION_1"));
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))?;
        if let Some(bit) = (0..64).find(|b| offered & (1u64 << b) == 0) {
            if d.negotiate(offered | (1u64 << bit)) {
                return Err(fail(
                    C,
                    format!("FEATURES_OK accepted with unoffered bit {bit}"),
                ));
            }
            d.reset(TIMEOUT).map_err(|e| fail(C, e))?;
        }
        // A feature window beyond bit 63.
        d.write(r::STATUS, u32::from(status::ACKNOWLEDGE | status::DRIVER));
        d.write(r::DRIVER_FEATURES_SEL, 2);
        d.write(r::DRIVER_FEATURES, 1);
        if d.negotiate(offered) {
            return Err(fail(C, "FEATURES_OK accepted with a feature bit beyond 63"));
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))?;
        // Writes after FEATURES_OK do not change the agreement.
        if !d.negotiate(features::VERSION_1) {
            return Err(fail(C, "VERSION_1 alone refused after reset"));
        }
        d.write(r::DRIVER_FEATURES_SEL, 0);
        d.write(r::DRIVER_FEATURES, u32::MAX);
        d.write(r::DRIVER_FEATURES_SEL, 0);
        if d.read(r::DRIVER_FEATURES) != 0 {
            return Err(fail(C, "driver features changed after FEATURES_OK"));
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))
    })
}

/// Reset before negotiation, after `FEATURES_OK`, after activation (also with requests
/// completed), twice in a row; the device comes back each time and completes `probes`.
pub fn check_reset(
    factory: impl Fn() -> Box<dyn VirtioDevice>,
    probes: &[Probe],
) -> Result<(), ConformanceFailure> {
    const C: &str = "reset";
    guarded(C, || {
        let mut d = Driver::new(factory())?;
        let offered = d.device_features();
        d.reset(TIMEOUT).map_err(|e| fail(C, e))?;
        d.write(r::STATUS, u32::from(status::ACKNOWLEDGE));
        d.reset(TIMEOUT).map_err(|e| fail(C, e))?;
        if !d.negotiate(offered) {
            return Err(fail(C, "FEATURES_OK refused"));
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))?;
        if d.device_features() != offered {
            return Err(fail(C, "offered features changed across reset"));
        }
        for round in 0..3 {
            d.bring_up()
                .map_err(|e| fail(C, format!("round {round}: {e}")))?;
            for p in probes {
                d.run_probe(p, TIMEOUT)
                    .map_err(|e| fail(C, format!("round {round}: {e}")))?;
            }
            d.reset(TIMEOUT)
                .map_err(|e| fail(C, format!("round {round}: {e}")))?;
            // Queues are back to their defaults.
            for q in 0..d.num_queues() {
                d.write(r::QUEUE_SEL, u32::from(q));
                if d.read(r::QUEUE_READY) != 0 {
                    return Err(fail(C, format!("queue {q} still ready after reset")));
                }
            }
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))
    })
}

/// The malformations [`check_malformed_chains`] posts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformation {
    /// Zero-length readable and writable descriptors.
    ZeroLength,
    /// A buffer outside guest memory.
    OutsideMemory,
    /// A buffer whose end wraps the address space.
    WrappingAddress,
    /// A buffer of `u32::MAX` bytes.
    HugeLength,
    /// Two descriptors that point at each other.
    Loop,
    /// `next` beyond the queue size.
    NextOutOfRange,
    /// A chain through every descriptor of the table.
    LongChain,
    /// A writable descriptor followed by a readable one.
    WriteBeforeRead,
    /// An indirect table whose length is not a multiple of 16.
    IndirectBadLength,
    /// An indirect table outside guest memory.
    IndirectOutsideMemory,
    /// An indirect table holding an indirect descriptor.
    IndirectNested,
    /// An indirect table whose descriptors loop.
    IndirectLoop,
    /// An indirect table with more entries than the queue size.
    IndirectTooLong,
    /// A zero-length indirect table.
    IndirectEmpty,
    /// An available index far ahead of the ring (unrecoverable without reset).
    AvailIndexJump,
    /// Random bytes over the descriptor table and available ring (unrecoverable).
    RandomRings,
}

impl Malformation {
    /// Every malformation, in the order they are posted.
    pub const ALL: [Malformation; 16] = [
        Self::ZeroLength,
        Self::OutsideMemory,
        Self::WrappingAddress,
        Self::HugeLength,
        Self::Loop,
        Self::NextOutOfRange,
        Self::LongChain,
        Self::WriteBeforeRead,
        Self::IndirectBadLength,
        Self::IndirectOutsideMemory,
        Self::IndirectNested,
        Self::IndirectLoop,
        Self::IndirectTooLong,
        Self::IndirectEmpty,
        Self::AvailIndexJump,
        Self::RandomRings,
    ];

    /// Whether a device must still complete good requests on the queue afterwards.
    pub fn recoverable(self) -> bool {
        !matches!(self, Self::AvailIndexJump | Self::RandomRings)
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Posts one malformed chain of kind `m` on queue `q` and notifies.
pub fn post_malformed(d: &mut Driver, q: u16, m: Malformation, seed: u64) {
    let size = d.queue_size(q);
    if size == 0 {
        return;
    }
    let table = d.desc_table(q);
    let buf = d.alloc(4096);
    let w = VIRTQ_DESC_F_WRITE;
    let n = VIRTQ_DESC_F_NEXT;
    let ind = VIRTQ_DESC_F_INDIRECT;
    let head = match m {
        Malformation::ZeroLength => {
            let ids = d.take_descs(q, 2);
            d.write_desc(table, ids[0], buf, 0, n, ids[1]);
            d.write_desc(table, ids[1], buf, 0, w, 0);
            ids[0]
        }
        Malformation::OutsideMemory => {
            let ids = d.take_descs(q, 2);
            d.write_desc(table, ids[0], MEM_SIZE + 0x1000, 512, n, ids[1]);
            d.write_desc(table, ids[1], MEM_SIZE + 0x10_0000, 512, w, 0);
            ids[0]
        }
        Malformation::WrappingAddress => {
            let ids = d.take_descs(q, 2);
            d.write_desc(table, ids[0], u64::MAX - 16, 512, n, ids[1]);
            d.write_desc(table, ids[1], u64::MAX - 8, 512, w, 0);
            ids[0]
        }
        Malformation::HugeLength => {
            let ids = d.take_descs(q, 2);
            d.write_desc(table, ids[0], 0, u32::MAX, n, ids[1]);
            d.write_desc(table, ids[1], DATA_BASE, u32::MAX, w, 0);
            ids[0]
        }
        Malformation::Loop => {
            let ids = d.take_descs(q, 2);
            let second = ids.get(1).copied().unwrap_or(ids[0]);
            d.write_desc(table, ids[0], buf, 64, n, second);
            d.write_desc(table, second, buf + 64, 64, n | w, ids[0]);
            ids[0]
        }
        Malformation::NextOutOfRange => {
            let ids = d.take_descs(q, 1);
            d.write_desc(table, ids[0], buf, 64, n, size.wrapping_add(5));
            ids[0]
        }
        Malformation::LongChain => {
            let ids = d.take_descs(q, size);
            for (i, id) in ids.iter().enumerate() {
                let next = ids.get(i + 1).copied();
                let flags =
                    if i * 2 >= ids.len() { w } else { 0 } | if next.is_some() { n } else { 0 };
                d.write_desc(
                    table,
                    *id,
                    buf + (i as u64 % 4096),
                    1,
                    flags,
                    next.unwrap_or(0),
                );
            }
            ids[0]
        }
        Malformation::WriteBeforeRead => {
            let ids = d.take_descs(q, 2);
            d.write_desc(table, ids[0], buf, 64, n | w, ids[1]);
            d.write_desc(table, ids[1], buf + 64, 64, 0, 0);
            ids[0]
        }
        Malformation::IndirectBadLength => {
            let ids = d.take_descs(q, 1);
            let t = d.alloc(64);
            d.write_desc(t, 0, buf, 16, w, 0);
            d.write_desc(table, ids[0], t, 17, ind, 0);
            ids[0]
        }
        Malformation::IndirectOutsideMemory => {
            let ids = d.take_descs(q, 1);
            d.write_desc(table, ids[0], MEM_SIZE + 0x2000, 64, ind, 0);
            ids[0]
        }
        Malformation::IndirectNested => {
            let ids = d.take_descs(q, 1);
            let t = d.alloc(32);
            let t2 = d.alloc(32);
            d.write_desc(t2, 0, buf, 16, w, 0);
            d.write_desc(t, 0, t2, 16, ind, 0);
            d.write_desc(table, ids[0], t, 16, ind, 0);
            ids[0]
        }
        Malformation::IndirectLoop => {
            let ids = d.take_descs(q, 1);
            let t = d.alloc(32);
            d.write_desc(t, 0, buf, 16, n, 1);
            d.write_desc(t, 1, buf + 16, 16, n | w, 0);
            d.write_desc(table, ids[0], t, 32, ind, 0);
            ids[0]
        }
        Malformation::IndirectTooLong => {
            let ids = d.take_descs(q, 1);
            let entries = u32::from(size) + 1;
            let t = d.alloc(u64::from(entries) * 16);
            for i in 0..entries {
                let last = i + 1 == entries;
                d.write_desc(
                    t,
                    i as u16,
                    buf,
                    1,
                    w | if last { 0 } else { n },
                    (i + 1) as u16,
                );
            }
            d.write_desc(table, ids[0], t, entries * 16, ind, 0);
            ids[0]
        }
        Malformation::IndirectEmpty => {
            let ids = d.take_descs(q, 1);
            d.write_desc(table, ids[0], buf, 0, ind, 0);
            ids[0]
        }
        Malformation::AvailIndexJump => {
            let ids = d.take_descs(q, 1);
            d.write_desc(table, ids[0], buf, 64, w, 0);
            d.push_avail(q, ids[0]);
            let idx = d.queues.get(usize::from(q)).map_or(0, |dq| dq.avail_idx);
            d.set_avail_idx(q, idx.wrapping_add(size).wrapping_add(7));
            d.notify(q);
            return;
        }
        Malformation::RandomRings => {
            let mut rng = XorShift(seed | 1);
            let mut bytes = vec![0u8; 16 * usize::from(size) + 4 + 2 * usize::from(size)];
            for b in bytes.iter_mut() {
                *b = rng.next() as u8;
            }
            let (desc_bytes, avail_bytes) = bytes.split_at(16 * usize::from(size));
            d.write_mem(table, desc_bytes);
            if let Some(dq) = d.queues.get(usize::from(q)).cloned() {
                d.write_mem(dq.avail, avail_bytes);
                let idx = u16::from_le_bytes([avail_bytes[2], avail_bytes[3]]);
                if let Some(dqm) = d.queues.get_mut(usize::from(q)) {
                    dqm.avail_idx = idx;
                }
            }
            d.notify(q);
            return;
        }
    };
    d.push_avail(q, head);
    d.notify(q);
}

/// Posts every [`Malformation`] on every queue, each on a freshly reset and activated
/// device. No thread may panic; after a recoverable malformation the device must complete
/// each probe for that queue (unless it set `DEVICE_NEEDS_RESET`); at the end, after a
/// reset, every probe completes.
pub fn check_malformed_chains(
    factory: impl Fn() -> Box<dyn VirtioDevice>,
    probes: &[Probe],
) -> Result<(), ConformanceFailure> {
    const C: &str = "malformed_chains";
    guarded(C, || {
        let start = panic_count();
        let mut d = Driver::new(factory())?;
        let queues = d.num_queues();
        let settle = Duration::from_millis(20);
        for q in 0..queues {
            for (i, m) in Malformation::ALL.iter().enumerate() {
                d.reset(TIMEOUT)
                    .map_err(|e| fail(C, format!("queue {q}, before {m:?}: {e}")))?;
                d.bring_up()
                    .map_err(|e| fail(C, format!("queue {q}, before {m:?}: {e}")))?;
                post_malformed(
                    &mut d,
                    q,
                    *m,
                    0x9e37_79b9 ^ ((i as u64) << 8) ^ u64::from(q),
                );
                std::thread::sleep(settle);
                if panic_count() > start {
                    return Err(fail(
                        C,
                        format!("a thread panicked after {m:?} on queue {q}"),
                    ));
                }
                if !m.recoverable() || d.status() & status::DEVICE_NEEDS_RESET != 0 {
                    continue;
                }
                for p in probes.iter().filter(|p| p.queue == q) {
                    if d.status() & status::DEVICE_NEEDS_RESET != 0 {
                        break;
                    }
                    if let Err(e) = d.run_probe(p, TIMEOUT) {
                        if d.status() & status::DEVICE_NEEDS_RESET == 0 {
                            return Err(fail(C, format!("after {m:?} on queue {q}: {e}")));
                        }
                    }
                }
            }
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))?;
        d.bring_up().map_err(|e| fail(C, e))?;
        for p in probes {
            d.run_probe(p, TIMEOUT)
                .map_err(|e| fail(C, format!("after all malformations and a reset: {e}")))?;
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))
    })
}

/// State round trip: `save_state` of a fresh device restores into another fresh device and
/// saves identically; then an active transport (probes completed) is paused, saved,
/// dropped, restored around a fresh device, saves the same state, and completes `probes`
/// again.
pub fn check_state_round_trip(
    factory: impl Fn() -> Box<dyn VirtioDevice>,
    probes: &[Probe],
) -> Result<(), ConformanceFailure> {
    const C: &str = "state_round_trip";
    guarded(C, || {
        let a = factory();
        let s1 = a
            .save_state()
            .map_err(|e| fail(C, format!("save_state: {e}")))?;
        let mut b = factory();
        b.restore_state(&s1)
            .map_err(|e| fail(C, format!("restore_state: {e}")))?;
        let s2 = b
            .save_state()
            .map_err(|e| fail(C, format!("save_state after restore: {e}")))?;
        if s1 != s2 {
            return Err(fail(
                C,
                format!("device state differs after a round trip: {s1:?} vs {s2:?}"),
            ));
        }
        drop((a, b));

        use vmkit_migration::Pausable;
        let mut d = Driver::new(factory())?;
        d.bring_up().map_err(|e| fail(C, e))?;
        for p in probes {
            d.run_probe(p, TIMEOUT).map_err(|e| fail(C, e))?;
        }
        d.transport
            .pause()
            .map_err(|e| fail(C, format!("pause: {e}")))?;
        let saved = d
            .transport
            .save_state()
            .map_err(|e| fail(C, format!("transport save: {e}")))?;
        let bytes = vmkit_migration::encode(&saved).map_err(|e| fail(C, e.to_string()))?;
        let decoded: crate::transport::VirtioMmioState =
            vmkit_migration::decode(&bytes).map_err(|e| fail(C, e.to_string()))?;
        let mem = d.mem.clone();
        let queues = d.queues.clone();
        let Driver { transport, .. } = d;
        drop(transport);
        let line = Arc::new(CountingLine::new(TriggerMode::Edge));
        let restored = VirtioMmio::restore(factory(), mem.clone(), line.clone(), None, &decoded)
            .map_err(|e| fail(C, format!("transport restore: {e}")))?;
        let mut d = Driver::with_transport(Arc::new(restored), mem, line);
        d.queues = queues;
        d.transport
            .pause()
            .map_err(|e| fail(C, format!("pause: {e}")))?;
        let again = d
            .transport
            .save_state()
            .map_err(|e| fail(C, format!("save after restore: {e}")))?;
        d.transport
            .resume()
            .map_err(|e| fail(C, format!("resume: {e}")))?;
        if again != saved {
            return Err(fail(
                C,
                format!("transport state differs after restore: {saved:?} vs {again:?}"),
            ));
        }
        if !d.transport.is_active() {
            return Err(fail(C, "restored transport is not active"));
        }
        for p in probes {
            d.run_probe(p, TIMEOUT)
                .map_err(|e| fail(C, format!("after restore: {e}")))?;
        }
        d.reset(TIMEOUT).map_err(|e| fail(C, e))
    })
}

/// Runs every check; returns every failure.
pub fn run_all(
    factory: impl Fn() -> Box<dyn VirtioDevice>,
    probes: &[Probe],
) -> Result<(), Vec<ConformanceFailure>> {
    let failures: Vec<_> = [
        check_feature_negotiation(&factory),
        check_reset(&factory, probes),
        check_malformed_chains(&factory, probes),
        check_state_round_trip(&factory, probes),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures)
    }
}

/// Generates a test module `$name` with one `#[test]` per conformance check for the device
/// built by `$factory` (an expression of type `Box<dyn VirtioDevice>`, evaluated once per
/// device the checks need) and the [`Probe`]s `$probes` (an expression of type
/// `Vec<Probe>`).
#[macro_export]
macro_rules! virtio_conformance_tests {
    ($name:ident, $factory:expr, $probes:expr) => {
        #[cfg(test)]
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn factory() -> ::std::boxed::Box<dyn $crate::VirtioDevice> {
                $factory
            }

            fn probes() -> ::std::vec::Vec<$crate::conformance::Probe> {
                $probes
            }

            #[test]
            fn feature_negotiation() {
                if let Err(e) = $crate::conformance::check_feature_negotiation(factory) {
                    $crate::conformance::report(e);
                }
            }

            #[test]
            fn reset() {
                if let Err(e) = $crate::conformance::check_reset(factory, &probes()) {
                    $crate::conformance::report(e);
                }
            }

            #[test]
            fn malformed_chains() {
                if let Err(e) = $crate::conformance::check_malformed_chains(factory, &probes()) {
                    $crate::conformance::report(e);
                }
            }

            #[test]
            fn state_round_trip() {
                if let Err(e) = $crate::conformance::check_state_round_trip(factory, &probes()) {
                    $crate::conformance::report(e);
                }
            }
        }
    };
}

/// A small entropy-like device for the transport and conformance tests, with switchable
/// flaws that the suite must catch.
#[cfg(test)]
pub(crate) mod testdev {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use serde::{Deserialize, Serialize};
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddressSpace};
    use vmkit_migration::{decode_section, encode_section, Section, VersionedState};

    use crate::device::{
        features, ActivateContext, VirtioDevice, VirtioError, VirtioInterruptType,
    };

    /// What is wrong with the device.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Flaw {
        None,
        /// Panics in its worker on a zero-length descriptor.
        PanicOnZeroLength,
        /// Saves an instance serial that restore ignores.
        BadRoundTrip,
        /// Refuses every feature set.
        RefusesFeatures,
        /// Fails activation.
        FailsActivate,
        /// Also offers packed rings, which no transport implements.
        OffersPacked,
    }

    static SERIAL: AtomicU32 = AtomicU32::new(0);

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        acked: u64,
        serial: u32,
        config: [u8; 8],
    }

    impl VersionedState for State {
        const NAME: &'static str = "vmkit-virtio/testdev";
        const VERSION: u16 = 1;
    }

    pub(crate) struct TestDev {
        flaw: Flaw,
        acked: u64,
        serial: u32,
        config: [u8; 8],
        stop: Arc<AtomicBool>,
        worker: Option<JoinHandle<()>>,
        pub(crate) activations: Arc<AtomicU32>,
    }

    impl TestDev {
        pub(crate) fn new(flaw: Flaw) -> Self {
            Self {
                flaw,
                acked: 0,
                serial: SERIAL.fetch_add(1, Ordering::SeqCst),
                config: *b"vmkitdev",
                stop: Arc::new(AtomicBool::new(false)),
                worker: None,
                activations: Arc::new(AtomicU32::new(0)),
            }
        }
    }

    impl VirtioDevice for TestDev {
        fn device_type(&self) -> u32 {
            crate::device::device_type::RNG
        }

        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![64]
        }

        fn device_features(&self) -> u64 {
            let packed = if self.flaw == Flaw::OffersPacked {
                1 << 34
            } else {
                0
            };
            features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC | packed
        }

        fn negotiate_features(&mut self, f: u64) -> Result<(), VirtioError> {
            if self.flaw == Flaw::RefusesFeatures {
                return Err(VirtioError::Features(f));
            }
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
            if self.flaw == Flaw::FailsActivate {
                return Err(VirtioError::Activate("flawed on purpose".into()));
            }
            self.activations.fetch_add(1, Ordering::SeqCst);
            let mut queues = ctx.queues;
            let Some(aq) = queues.pop() else {
                return Err(VirtioError::Queue {
                    index: 0,
                    reason: "not enabled".into(),
                });
            };
            self.stop.store(false, Ordering::SeqCst);
            let stop = Arc::clone(&self.stop);
            let flaw = self.flaw;
            let mem = ctx.mem;
            let irq = ctx.interrupt;
            let mut q = aq.queue;
            let notify = aq.notify;
            self.worker = Some(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if notify.read().is_err() {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    let m = mem.memory();
                    let mut broken = false;
                    loop {
                        if q.disable_notification(&*m).is_err() {
                            broken = true;
                            break;
                        }
                        let mut popped = false;
                        while let Some(chain) = q.pop_descriptor_chain(&*m) {
                            popped = true;
                            let head = chain.head_index();
                            let mut written = 0u32;
                            for d in chain {
                                if d.len() == 0 && flaw == Flaw::PanicOnZeroLength {
                                    panic!("zero-length descriptor");
                                }
                                if d.is_write_only() {
                                    let len = d.len().min(4096) as usize;
                                    if m.write_slice(&vec![0xa5; len], d.addr()).is_ok() {
                                        written = written.saturating_add(len as u32);
                                    }
                                }
                            }
                            if q.add_used(&*m, head, written).is_err() {
                                broken = true;
                                break;
                            }
                        }
                        match q.enable_notification(&*m) {
                            Ok(true) if popped && !broken => continue,
                            Ok(true) => {
                                // More available than we can pop: a broken ring.
                                broken = true;
                                break;
                            }
                            Ok(false) => break,
                            Err(_) => {
                                broken = true;
                                break;
                            }
                        }
                    }
                    if broken {
                        irq.set_needs_reset();
                        // Keep draining notifications until reset.
                        continue;
                    }
                    if q.needs_notification(&*m).unwrap_or(true) {
                        let _ = irq.trigger(VirtioInterruptType::Queue(0));
                    }
                }
            }));
            Ok(())
        }

        fn reset(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(w) = self.worker.take() {
                let _ = w.join();
            }
            self.acked = 0;
        }

        fn save_state(&self) -> Result<Section, VirtioError> {
            let serial = if self.flaw == Flaw::BadRoundTrip {
                self.serial
            } else {
                0
            };
            encode_section(&State {
                acked: self.acked,
                serial,
                config: self.config,
            })
            .map_err(|e| VirtioError::State(e.to_string()))
        }

        fn restore_state(&mut self, state: &Section) -> Result<(), VirtioError> {
            let s: State = decode_section(state).map_err(|e| VirtioError::State(e.to_string()))?;
            self.acked = s.acked;
            self.config = s.config;
            Ok(())
        }
    }

    impl Drop for TestDev {
        fn drop(&mut self) {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::testdev::{Flaw, TestDev};
    use super::*;

    fn probes() -> Vec<Probe> {
        vec![
            Probe::writable(0, &[64, 32]),
            Probe {
                queue: 0,
                readable: vec![vec![1, 2, 3]],
                writable: vec![16],
            },
        ]
    }

    fn factory(flaw: Flaw) -> impl Fn() -> Box<dyn VirtioDevice> {
        move || Box::new(TestDev::new(flaw))
    }

    #[test]
    fn a_good_device_passes_everything() {
        run_all(factory(Flaw::None), &probes()).unwrap();
    }

    #[test]
    fn a_device_panicking_on_zero_length_fails_the_malformed_chain_check() {
        let e = check_malformed_chains(factory(Flaw::PanicOnZeroLength), &probes()).unwrap_err();
        assert_eq!(e.check, "malformed_chains");
        assert!(e.reason.contains("panicked"), "{e}");
        // The other checks do not post zero-length chains and pass.
        check_reset(factory(Flaw::PanicOnZeroLength), &probes()).unwrap();
    }

    #[test]
    fn a_state_that_does_not_round_trip_fails() {
        let e = check_state_round_trip(factory(Flaw::BadRoundTrip), &probes()).unwrap_err();
        assert_eq!(e.check, "state_round_trip");
    }

    #[test]
    fn a_device_refusing_features_fails_negotiation() {
        let e = check_feature_negotiation(factory(Flaw::RefusesFeatures)).unwrap_err();
        assert_eq!(e.check, "feature_negotiation");
    }

    #[test]
    fn a_device_failing_activation_fails_reset() {
        let e = check_reset(factory(Flaw::FailsActivate), &probes()).unwrap_err();
        assert!(e.reason.contains("NEEDS_RESET"), "{e}");
    }

    #[test]
    fn a_probe_the_device_cannot_complete_fails() {
        // Queue 1 does not exist: the probe cannot even be posted.
        let e = check_reset(factory(Flaw::None), &[Probe::writable(1, &[8])]).unwrap_err();
        assert_eq!(e.check, "reset");
    }

    crate::virtio_conformance_tests!(
        macro_generated,
        Box::new(super::testdev::TestDev::new(super::testdev::Flaw::None)),
        vec![super::Probe::writable(0, &[8])]
    );
}
