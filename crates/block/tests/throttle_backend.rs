// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ThrottledBackend over real images, timed by a fake clock: requests are delayed by the
//! computed amounts (per disk and across a group shared by two disks) and all succeed.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::sync::Arc;
use std::time::Duration;

use vmkit_block::raw::RawBackend;
use vmkit_block::throttle::{FakeClock, Limit, ThrottleConfig, ThrottleGroup, ThrottledBackend};
use vmkit_block::{read_at, write_at, BlockBackend, CacheMode};

fn raw(dir: &std::path::Path, name: &str) -> Arc<dyn BlockBackend> {
    let p = dir.join(name);
    RawBackend::create(&p, 1 << 20).unwrap();
    Arc::new(RawBackend::open(&p, false, CacheMode::Writeback).unwrap())
}

#[test]
fn per_disk_bytes_limit_delays_but_completes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let g = ThrottleGroup::new(
        "disk0",
        ThrottleConfig {
            bytes_write: Some(Limit::with_burst(64 * 1024, 64 * 1024)),
            ..Default::default()
        },
        clock.clone(),
    )
    .unwrap();
    let d = ThrottledBackend::new(raw(dir.path(), "a.raw"), vec![g.clone()]);
    // 8 writes of 32 KiB: the first two fit the burst, each later one waits 0.5 s more.
    for i in 0..8u64 {
        write_at(&d, i * 32 * 1024, &[i as u8 + 1; 32 * 1024]).unwrap();
    }
    assert_eq!(clock.sleeps().len(), 6);
    assert!(clock
        .sleeps()
        .iter()
        .all(|s| *s == Duration::from_millis(500)));
    assert_eq!(clock.total_slept(), Duration::from_secs(3));
    // Reads are not limited by a write limit.
    let mut buf = vec![0u8; 256 * 1024];
    read_at(&d, 0, &mut buf).unwrap();
    assert_eq!(clock.sleeps().len(), 6);
    assert!(buf[..32 * 1024].iter().all(|&b| b == 1));
    assert_eq!(g.stats().delayed, 6);
}

#[test]
fn shared_group_limits_two_disks_together() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let shared = ThrottleGroup::new(
        "shared",
        ThrottleConfig {
            ops_total: Some(Limit::with_burst(100, 10)),
            ..Default::default()
        },
        clock.clone(),
    )
    .unwrap();
    let a = ThrottledBackend::new(raw(dir.path(), "a.raw"), vec![shared.clone()]);
    let b = ThrottledBackend::new(raw(dir.path(), "b.raw"), vec![shared.clone()]);
    // 10 ops of burst shared by both disks, then 10 ms per op.
    for i in 0..10u64 {
        let d = if i % 2 == 0 { &a } else { &b };
        write_at(d, i * 512, &[1; 512]).unwrap();
    }
    assert!(clock.sleeps().is_empty());
    let mut x = [0u8; 512];
    read_at(&a, 0, &mut x).unwrap();
    read_at(&b, 512, &mut x).unwrap();
    a.discard(0, 512).unwrap();
    assert_eq!(
        clock.sleeps(),
        vec![Duration::from_millis(10); 3],
        "each op beyond the burst waits 10 ms at 100 ops/s"
    );
    assert_eq!(shared.stats().requests, 13);
}

#[test]
fn longest_group_delay_wins() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let per_disk = ThrottleGroup::new(
        "disk",
        ThrottleConfig {
            bytes_read: Some(Limit::with_burst(1000, 1000)),
            ..Default::default()
        },
        clock.clone(),
    )
    .unwrap();
    let group = ThrottleGroup::new(
        "group",
        ThrottleConfig {
            bytes_total: Some(Limit::with_burst(500, 1000)),
            ..Default::default()
        },
        clock.clone(),
    )
    .unwrap();
    let d = ThrottledBackend::new(raw(dir.path(), "a.raw"), vec![per_disk, group]);
    let mut buf = vec![0u8; 1500];
    read_at(&d, 0, &mut buf).unwrap();
    // Disk: owes 500 B at 1000 B/s = 0.5 s; group: owes 500 B at 500 B/s = 1 s.
    assert_eq!(clock.sleeps(), vec![Duration::from_secs(1)]);
}
