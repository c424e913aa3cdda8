// SPDX-License-Identifier: Apache-2.0 OR MIT
//! I/O throttling: token buckets on bytes per second and operations per second.
//!
//! A [`ThrottleGroup`] holds up to six buckets (bytes and operations, each for reads,
//! writes and their total). A [`ThrottledBackend`] wraps any [`BlockBackend`] and charges
//! every request to one or more groups: a per-disk group, and groups shared through an
//! `Arc` by several disks. A request that finds a bucket empty is *delayed* (the calling
//! thread sleeps until the bucket has refilled enough) and then carried out; throttling
//! never fails a request.
//!
//! Each bucket refills at `rate` units per second up to `burst` units, so after a quiet
//! period a disk may run at full speed until `burst` is used up. A request larger than
//! the bucket is admitted once the bucket has paid it off (the level goes negative and
//! later requests wait for the debt), so big requests never starve.
//!
//! Time comes from a [`Clock`], so tests drive the throttle with [`FakeClock`] and assert
//! on computed delays instead of wall-clock time.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;

use crate::backend::total_len;
use crate::{BlockBackend, BlockError, BlockStatus, CacheMode};

/// A source of monotonic time that can also wait.
pub trait Clock: Send + Sync {
    /// Time since an arbitrary fixed origin.
    fn now(&self) -> Duration;
    /// Blocks the calling thread for `d`.
    fn sleep(&self, d: Duration);
}

/// The real clock: [`Instant`] and [`std::thread::sleep`].
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A deterministic clock for tests: `sleep` advances the time at once and is recorded.
#[derive(Debug, Default)]
pub struct FakeClock {
    state: Mutex<(Duration, Vec<Duration>)>,
}

impl FakeClock {
    /// A fake clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward (as if the guest were idle).
    pub fn advance(&self, d: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += d;
    }

    /// Every sleep so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Sum of all sleeps.
    pub fn total_slept(&self) -> Duration {
        self.sleeps().iter().sum()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    fn sleep(&self, d: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += d;
        s.1.push(d);
    }
}

/// One limit: a sustained rate and a burst allowance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Units (bytes or operations) per second; must be > 0.
    pub rate: u64,
    /// Bucket size: how many units may be used at once after an idle period. 0 means
    /// one tenth of a second's worth (at least 1).
    pub burst: u64,
}

impl Limit {
    /// `rate` per second with the default burst.
    pub fn per_second(rate: u64) -> Self {
        Limit { rate, burst: 0 }
    }

    /// `rate` per second, with `burst` units available at once.
    pub fn with_burst(rate: u64, burst: u64) -> Self {
        Limit { rate, burst }
    }
}

/// Limits of a [`ThrottleGroup`]; `None` = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Bytes per second read.
    pub bytes_read: Option<Limit>,
    /// Bytes per second written.
    pub bytes_write: Option<Limit>,
    /// Bytes per second, reads and writes together.
    pub bytes_total: Option<Limit>,
    /// Read operations per second.
    pub ops_read: Option<Limit>,
    /// Write operations per second (discard and write-zeroes count as writes of 0 bytes).
    pub ops_write: Option<Limit>,
    /// Operations per second, reads and writes together.
    pub ops_total: Option<Limit>,
    /// If non-zero, a request counts as `ceil(bytes / op_size)` operations (at least 1),
    /// like QEMU's `iops-size`.
    pub op_size: u64,
}

const NANOS: i128 = 1_000_000_000;

/// A token bucket, in nano-units for exact integer arithmetic.
#[derive(Debug)]
struct Bucket {
    rate: i128,
    capacity: i128,
    level: i128,
    last: Duration,
}

impl Bucket {
    fn new(limit: Limit, now: Duration) -> Result<Self, BlockError> {
        if limit.rate == 0 {
            return Err(BlockError::InvalidArgument(
                "throttle rate must be greater than 0 (use None for unlimited)".into(),
            ));
        }
        let burst = if limit.burst == 0 {
            (limit.rate / 10).max(1)
        } else {
            limit.burst
        };
        let capacity = i128::from(burst) * NANOS;
        Ok(Bucket {
            rate: i128::from(limit.rate),
            capacity,
            level: capacity,
            last: now,
        })
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.last).as_nanos() as i128;
        self.last = now.max(self.last);
        self.level = (self.level + elapsed * self.rate).min(self.capacity);
    }

    /// Charges `units` and returns how long the request must wait.
    fn charge(&mut self, units: u64, now: Duration) -> Duration {
        self.refill(now);
        self.level -= i128::from(units) * NANOS;
        if self.level >= 0 {
            Duration::ZERO
        } else {
            let ns = (-self.level + self.rate - 1) / self.rate;
            Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
        }
    }
}

/// Counters of a [`ThrottleGroup`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleStats {
    /// Requests charged.
    pub requests: u64,
    /// Requests that had to wait.
    pub delayed: u64,
    /// Total delay imposed.
    pub total_delay: Duration,
}

#[derive(Debug)]
struct GroupState {
    buckets: [Option<Bucket>; 6],
    op_size: u64,
    stats: ThrottleStats,
}

/// A set of token buckets shared by every disk that holds it (via `Arc`).
pub struct ThrottleGroup {
    name: String,
    clock: Arc<dyn Clock>,
    state: Mutex<GroupState>,
}

impl std::fmt::Debug for ThrottleGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleGroup")
            .field("name", &self.name)
            .finish()
    }
}

/// Direction of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A read.
    Read,
    /// A write, discard or write-zeroes.
    Write,
}

const B_READ: usize = 0;
const B_WRITE: usize = 1;
const B_TOTAL: usize = 2;
const O_READ: usize = 3;
const O_WRITE: usize = 4;
const O_TOTAL: usize = 5;

impl ThrottleGroup {
    /// A group with the given limits, timed by `clock`.
    pub fn new(
        name: impl Into<String>,
        config: ThrottleConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, BlockError> {
        let now = clock.now();
        let mk = |l: Option<Limit>| l.map(|l| Bucket::new(l, now)).transpose();
        let state = GroupState {
            buckets: [
                mk(config.bytes_read)?,
                mk(config.bytes_write)?,
                mk(config.bytes_total)?,
                mk(config.ops_read)?,
                mk(config.ops_write)?,
                mk(config.ops_total)?,
            ],
            op_size: config.op_size,
            stats: ThrottleStats::default(),
        };
        Ok(Arc::new(ThrottleGroup {
            name: name.into(),
            clock,
            state: Mutex::new(state),
        }))
    }

    /// A group on the real clock.
    pub fn with_system_clock(
        name: impl Into<String>,
        config: ThrottleConfig,
    ) -> Result<Arc<Self>, BlockError> {
        Self::new(name, config, Arc::new(SystemClock::new()))
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counters so far.
    pub fn stats(&self) -> ThrottleStats {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).stats
    }

    /// Charges a request of `bytes` and returns the delay it must observe (without
    /// sleeping).
    pub fn charge(&self, dir: Direction, bytes: u64) -> Duration {
        let now = self.clock.now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ops = if s.op_size > 0 {
            bytes.div_ceil(s.op_size).max(1)
        } else {
            1
        };
        let (b, o) = match dir {
            Direction::Read => (B_READ, O_READ),
            Direction::Write => (B_WRITE, O_WRITE),
        };
        let mut wait = Duration::ZERO;
        for (idx, units) in [(b, bytes), (B_TOTAL, bytes), (o, ops), (O_TOTAL, ops)] {
            if let Some(bucket) = s.buckets[idx].as_mut() {
                wait = wait.max(bucket.charge(units, now));
            }
        }
        s.stats.requests += 1;
        if !wait.is_zero() {
            s.stats.delayed += 1;
            s.stats.total_delay += wait;
        }
        wait
    }

    /// Charges a request and sleeps for the delay it gets.
    pub fn throttle(&self, dir: Direction, bytes: u64) {
        let wait = self.charge(dir, bytes);
        if !wait.is_zero() {
            self.clock.sleep(wait);
        }
    }
}

/// A backend whose requests are charged to one or more [`ThrottleGroup`]s.
///
/// With several groups (for example a per-disk group and a group shared with other
/// disks) a request waits for the longest delay any group imposes.
pub struct ThrottledBackend {
    inner: Arc<dyn BlockBackend>,
    groups: Vec<Arc<ThrottleGroup>>,
}

impl ThrottledBackend {
    /// Wraps `inner`, charging every request to each of `groups`.
    pub fn new(inner: Arc<dyn BlockBackend>, groups: Vec<Arc<ThrottleGroup>>) -> Self {
        ThrottledBackend { inner, groups }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<dyn BlockBackend> {
        &self.inner
    }

    /// The groups this disk is charged to.
    pub fn groups(&self) -> &[Arc<ThrottleGroup>] {
        &self.groups
    }

    fn throttle(&self, dir: Direction, bytes: u64) {
        // Charge every group first, then sleep once for the longest delay, so a request
        // is not delayed by the sum of its groups' delays.
        let mut wait = Duration::ZERO;
        let mut clock: Option<&Arc<dyn Clock>> = None;
        for g in &self.groups {
            let w = g.charge(dir, bytes);
            if w > wait {
                wait = w;
                clock = Some(&g.clock);
            }
        }
        if let Some(c) = clock {
            c.sleep(wait);
        }
    }
}

impl BlockBackend for ThrottledBackend {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }

    fn format(&self) -> &'static str {
        self.inner.format()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        self.throttle(Direction::Read, total_len(bufs));
        self.inner.read_vectored(offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        self.throttle(Direction::Write, total_len(bufs));
        self.inner.write_vectored(offset, bufs)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.throttle(Direction::Write, 0);
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.throttle(Direction::Write, 0);
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

    fn backing_chain(&self) -> Vec<(PathBuf, &'static str)> {
        self.inner.backing_chain()
    }

    fn allocated_size(&self) -> Option<u64> {
        self.inner.allocated_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_rate() {
        let clock = Arc::new(FakeClock::new());
        let cfg = ThrottleConfig {
            bytes_total: Some(Limit::with_burst(1000, 2000)),
            ..Default::default()
        };
        let g = ThrottleGroup::new("g", cfg, clock.clone()).unwrap();
        // The burst goes through at once.
        assert_eq!(g.charge(Direction::Read, 1500), Duration::ZERO);
        assert_eq!(g.charge(Direction::Write, 500), Duration::ZERO);
        // Then 1000 B/s: 500 bytes owe half a second.
        assert_eq!(g.charge(Direction::Read, 500), ms(500));
        // A later request queues behind the debt.
        assert_eq!(g.charge(Direction::Read, 100), ms(600));
        // After an idle period the bucket refills, but only up to the burst.
        clock.advance(Duration::from_secs(100));
        assert_eq!(g.charge(Direction::Read, 2000), Duration::ZERO);
        assert_eq!(g.charge(Direction::Read, 1), ms(1));
    }

    #[test]
    fn ops_limits_and_op_size() {
        let clock = Arc::new(FakeClock::new());
        let cfg = ThrottleConfig {
            ops_write: Some(Limit::with_burst(10, 1)),
            op_size: 4096,
            ..Default::default()
        };
        let g = ThrottleGroup::new("g", cfg, clock.clone()).unwrap();
        assert_eq!(g.charge(Direction::Write, 0), Duration::ZERO);
        assert_eq!(g.charge(Direction::Write, 10), ms(100));
        // 3 x 4 KiB = 3 ops.
        assert_eq!(g.charge(Direction::Write, 12288), ms(400));
        // Reads are not limited.
        assert_eq!(g.charge(Direction::Read, 1 << 30), Duration::ZERO);
        let st = g.stats();
        assert_eq!((st.requests, st.delayed), (4, 2));
    }

    #[test]
    fn default_burst_and_bad_rate() {
        let clock: Arc<dyn Clock> = Arc::new(FakeClock::new());
        let g = ThrottleGroup::new(
            "g",
            ThrottleConfig {
                bytes_read: Some(Limit::per_second(10_000)),
                ..Default::default()
            },
            clock.clone(),
        )
        .unwrap();
        assert_eq!(g.charge(Direction::Read, 1000), Duration::ZERO);
        assert_eq!(g.charge(Direction::Read, 1000), ms(100));
        assert!(ThrottleGroup::new(
            "bad",
            ThrottleConfig {
                ops_total: Some(Limit::per_second(0)),
                ..Default::default()
            },
            clock
        )
        .is_err());
    }

    #[test]
    fn fake_clock_sleeps_advance_time() {
        let c = FakeClock::new();
        c.sleep(ms(5));
        c.advance(ms(10));
        c.sleep(ms(1));
        assert_eq!(c.now(), ms(16));
        assert_eq!(c.sleeps(), vec![ms(5), ms(1)]);
        assert_eq!(c.total_slept(), ms(6));
    }
}
