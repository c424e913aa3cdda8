// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The POST code port (0x80): a timestamped log of the progress codes the guest writes.
//!
//! Each byte written is recorded with its time since a start [`Instant`] given at
//! construction (the VMM passes its process start, so the log is a boot timeline). The log is
//! a ring of the most recent records (bounded, [`DEFAULT_CAPACITY`] by default) plus, for
//! each of the 256 codes, the time it was *first* written, which survives the ring wrapping.
//! With [`PostPort::print_to_stderr`] each write is also printed as `[  12.345 ms] POST 0x20`.
//! Reads return the last value written.
//!
//! Note that Linux uses port 0x80 as an I/O delay (`outb %al, $0x80`), so a Linux guest
//! writes it often; the ring keeps the newest records and `first_time_of` keeps the first.
//!
//! ```
//! use std::time::Instant;
//! use vmkit_device::BusDevice;
//! use vmkit_devices::post_port::PostPort;
//!
//! let post = PostPort::new(Instant::now());
//! post.write(0x80, 0, &[0x20]);
//! post.write(0x80, 0, &[0x21]);
//! let codes: Vec<u8> = post.records().iter().map(|r| r.0).collect();
//! assert_eq!(codes, [0x20, 0x21]);
//! assert!(post.first_time_of(0x21) >= post.first_time_of(0x20));
//! ```

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmkit_device::{BusDevice, BusRange};

use crate::{lock, pio_range};

/// The POST port.
pub const POST_PORT: u16 = 0x80;
/// Default number of records kept.
pub const DEFAULT_CAPACITY: usize = 4096;

struct LogInner {
    records: VecDeque<(u8, Duration)>,
    capacity: usize,
    first: [Option<Duration>; 256],
    dropped: u64,
    last: u8,
}

/// A handle to the POST log, shareable with the VMM (cloning shares the same log).
#[derive(Clone)]
pub struct PostLog(Arc<Mutex<LogInner>>);

impl std::fmt::Debug for PostLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = lock(&self.0);
        f.debug_struct("PostLog")
            .field("records", &inner.records.len())
            .field("dropped", &inner.dropped)
            .finish()
    }
}

impl PostLog {
    fn new(capacity: usize) -> Self {
        Self(Arc::new(Mutex::new(LogInner {
            records: VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY)),
            capacity,
            first: [None; 256],
            dropped: 0,
            last: 0,
        })))
    }

    fn record(&self, code: u8, at: Duration) {
        let mut inner = lock(&self.0);
        if inner.capacity == 0 {
            inner.dropped = inner.dropped.saturating_add(1);
        } else {
            if inner.records.len() >= inner.capacity {
                inner.records.pop_front();
                inner.dropped = inner.dropped.saturating_add(1);
            }
            inner.records.push_back((code, at));
        }
        let first = &mut inner.first[usize::from(code)];
        if first.is_none() {
            *first = Some(at);
        }
        inner.last = code;
    }

    /// The kept records `(code, time since start)`, oldest first.
    pub fn records(&self) -> Vec<(u8, Duration)> {
        lock(&self.0).records.iter().copied().collect()
    }

    /// When `code` was first written, if ever (also after its record left the ring).
    pub fn first_time_of(&self, code: u8) -> Option<Duration> {
        lock(&self.0).first[usize::from(code)]
    }

    /// Records pushed out of the ring (or not kept, with capacity 0).
    pub fn dropped(&self) -> u64 {
        lock(&self.0).dropped
    }

    /// The last value written (0 before any write).
    pub fn last(&self) -> u8 {
        lock(&self.0).last
    }
}

/// The POST port device.
#[derive(Debug)]
pub struct PostPort {
    port: u16,
    start: Instant,
    log: PostLog,
    print: bool,
}

impl PostPort {
    /// A POST port at [`POST_PORT`] timing records from `start`, keeping
    /// [`DEFAULT_CAPACITY`] records, not printing.
    pub fn new(start: Instant) -> Self {
        Self {
            port: POST_PORT,
            start,
            log: PostLog::new(DEFAULT_CAPACITY),
            print: false,
        }
    }

    /// At another port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Keeps at most `capacity` records (a new, empty log).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.log = PostLog::new(capacity);
        self
    }

    /// Prints each write to stderr as `[  12.345 ms] POST 0x20`.
    pub fn print_to_stderr(mut self, enabled: bool) -> Self {
        self.print = enabled;
        self
    }

    /// The port to register (one byte).
    pub fn range(&self) -> BusRange {
        pio_range(self.port, 1)
    }

    /// A handle to the log that stays valid after the device is moved into the bus.
    pub fn log(&self) -> PostLog {
        self.log.clone()
    }

    /// See [`PostLog::records`].
    pub fn records(&self) -> Vec<(u8, Duration)> {
        self.log.records()
    }

    /// See [`PostLog::first_time_of`].
    pub fn first_time_of(&self, code: u8) -> Option<Duration> {
        self.log.first_time_of(code)
    }
}

/// Formats one record the way [`PostPort::print_to_stderr`] prints it.
pub fn format_record(code: u8, at: Duration) -> String {
    format!("[{:>8.3} ms] POST {code:#04x}", at.as_secs_f64() * 1000.0)
}

impl BusDevice for PostPort {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(self.log.last());
    }

    fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
        // A wider write (only possible when registered wider) records its first byte.
        let Some(&code) = data.first() else { return };
        let at = self.start.elapsed();
        self.log.record(code, at);
        if self.print {
            let _ = writeln!(std::io::stderr(), "{}", format_record(code, at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order_with_monotonic_times() {
        let post = PostPort::new(Instant::now());
        for code in [0x10, 0x20, 0x10, 0x30] {
            post.write(0x80, 0, &[code]);
        }
        let r = post.records();
        assert_eq!(
            r.iter().map(|x| x.0).collect::<Vec<_>>(),
            [0x10, 0x20, 0x10, 0x30]
        );
        assert!(r.windows(2).all(|w| w[0].1 <= w[1].1));
        assert_eq!(post.first_time_of(0x10), Some(r[0].1));
        assert_eq!(post.first_time_of(0x30), Some(r[3].1));
        assert_eq!(post.first_time_of(0x40), None);
        let mut v = [0u8; 1];
        post.read(0x80, 0, &mut v);
        assert_eq!(v, [0x30]);
    }

    #[test]
    fn log_is_bounded_and_keeps_first_times() {
        let post = PostPort::new(Instant::now()).capacity(4);
        let log = post.log();
        for i in 0..10u8 {
            post.write(0x80, 0, &[i]);
        }
        let r = log.records();
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [6, 7, 8, 9]);
        assert_eq!(log.dropped(), 6);
        assert!(
            log.first_time_of(0).is_some(),
            "first times survive the ring"
        );
        assert_eq!(log.last(), 9);

        let none = PostPort::new(Instant::now()).capacity(0);
        none.write(0x80, 0, &[1]);
        assert!(none.records().is_empty());
        assert_eq!(none.first_time_of(1).map(|_| ()), Some(()));
    }

    #[test]
    fn empty_writes_and_print_format() {
        let post = PostPort::new(Instant::now()).print_to_stderr(true);
        post.write(0x80, 0, &[]);
        assert!(post.records().is_empty());
        post.write(0x80, 0, &[0x20]);
        assert_eq!(post.records().len(), 1);
        assert_eq!(
            format_record(0x20, Duration::from_micros(12_345)),
            "[  12.345 ms] POST 0x20"
        );
    }

    #[test]
    fn times_are_relative_to_start() {
        // A start in the past: every record is at least that old.
        let start = Instant::now()
            .checked_sub(Duration::from_secs(5))
            .unwrap_or_else(Instant::now);
        let floor = start.elapsed();
        let post = PostPort::new(start);
        post.write(0x80, 0, &[1]);
        assert!(post.records()[0].1 >= floor);
    }
}
