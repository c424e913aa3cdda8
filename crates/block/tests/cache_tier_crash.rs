// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Crash consistency of the caching tier under SIGKILL.
//!
//! The test re-executes its own binary as a child (selected by an environment variable)
//! that writes to a writeback cache tier in rounds, with background writeback running and
//! a cache much smaller than the working set (so blocks are evicted, written back and
//! slots reused all the time), flushing after each round and reporting the round on
//! stdout. The parent kills it with SIGKILL after a few rounds, reopens the tier and checks
//! every 512-byte sector: it must hold the last value written to it up to the last
//! reported flush, or a value written after that flush — never anything older, never
//! garbage. Writing everything back must then leave the origin with the same content.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use vmkit_block::cache_tier::{CacheTier, CacheTierOptions, WritePolicy};
use vmkit_block::raw::RawBackend;
use vmkit_block::{read_at, write_at, BlockBackend, CacheMode};

const CHILD_ENV: &str = "VMKIT_CACHE_TIER_CRASH_CHILD_DIR";
const ORIGIN_SIZE: u64 = 4 << 20;
const CACHE_SIZE: u64 = 1 << 20;
const BLOCK: u32 = 16 << 10;
const SECTOR: u64 = 512;
const WRITES_PER_ROUND: u32 = 40;
/// Rounds the parent waits for before killing the child.
const KILL_AFTER: u32 = 6;

/// The deterministic writes of round `r`: `(first sector, sector count)`.
fn round_writes(r: u32) -> Vec<(u64, u64)> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(r).wrapping_mul(0x1234_5678_9abc_def1);
    let sectors = ORIGIN_SIZE / SECTOR;
    (0..WRITES_PER_ROUND)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let first = x % sectors;
            let count = (x >> 32) % 80 + 1;
            (first, count.min(sectors - first))
        })
        .collect()
}

/// Content of `sector` as written by write `w` of round `r`.
fn sector_data(r: u32, w: u32, sector: u64) -> [u8; SECTOR as usize] {
    let mut b = [0u8; SECTOR as usize];
    b[..4].copy_from_slice(&r.to_le_bytes());
    b[4..8].copy_from_slice(&w.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    for (i, x) in b[16..].iter_mut().enumerate() {
        *x = (r as u8) ^ (w as u8).wrapping_mul(3) ^ (sector as u8).wrapping_add(i as u8) | 1;
    }
    b
}

fn raw(p: &Path) -> Arc<RawBackend> {
    Arc::new(RawBackend::open(p, false, CacheMode::Writeback).unwrap())
}

fn tier(dir: &Path, interval: Option<Duration>) -> CacheTier {
    let o = CacheTierOptions {
        policy: WritePolicy::Writeback,
        writeback_interval: interval,
        writeback_batch: 8,
        label: dir.join("cache.img"),
        ..Default::default()
    };
    CacheTier::open(raw(&dir.join("cache.img")), raw(&dir.join("origin.img")), o).unwrap()
}

/// The child: write rounds forever, flushing and reporting after each.
fn child(dir: &Path) -> ! {
    let t = tier(dir, Some(Duration::from_millis(1)));
    for r in 1u32.. {
        for (w, (first, count)) in round_writes(r).into_iter().enumerate() {
            let mut buf = Vec::with_capacity((count * SECTOR) as usize);
            for s in first..first + count {
                buf.extend_from_slice(&sector_data(r, w as u32, s));
            }
            write_at(&t, first * SECTOR, &buf).unwrap();
            println!("WROTE {r} {w}");
        }
        t.flush().unwrap();
        println!("FLUSHED {r}");
    }
    unreachable!("rounds never end");
}

#[test]
fn cache_tier_survives_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
    }
    // Kill right after a flush, a little into the next round, and deep into it.
    for writes_into_next_round in [0, 7, 33] {
        crash_once(writes_into_next_round);
    }
}

fn crash_once(writes_into_next_round: u32) {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("origin.img");
    let cache = dir.path().join("cache.img");
    RawBackend::create(&origin, ORIGIN_SIZE).unwrap();
    RawBackend::create(&cache, CACHE_SIZE).unwrap();
    let slots = CacheTier::format(&*raw(&cache), ORIGIN_SIZE, BLOCK).unwrap();
    assert!(
        slots * u64::from(BLOCK) < ORIGIN_SIZE / 3,
        "the cache must be small"
    );

    let mut kid = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cache_tier_survives_sigkill",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut flushed = 0u32;
    // Keep the pipe open until the child is dead: a closed stdout would make its next
    // println! panic, and unwinding would close the tier cleanly instead of crashing.
    let mut out = BufReader::new(kid.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        let l = line.trim();
        if let Some(n) = l.strip_prefix("FLUSHED ") {
            flushed = n.parse().unwrap();
        }
        if flushed >= KILL_AFTER {
            let wrote = l
                .strip_prefix("WROTE ")
                .and_then(|rw| rw.split(' ').nth(1))
                .map(|w| w.parse::<u32>().unwrap() + 1)
                .unwrap_or(0);
            if wrote >= writes_into_next_round {
                break;
            }
        }
        line.clear();
    }
    // Kill it in the middle of the next round (or later): SIGKILL, no clean shutdown.
    kid.kill().unwrap();
    let status = kid.wait().unwrap();
    drop(out);
    assert!(
        flushed >= KILL_AFTER,
        "child ended early ({status:?}) after round {flushed}: {}",
        std::io::read_to_string(kid.stderr.take().unwrap()).unwrap_or_default()
    );

    // Expected per sector: the last write up to round `flushed`, plus any later write.
    let sectors = (ORIGIN_SIZE / SECTOR) as usize;
    let mut at_flush: Vec<Option<(u32, u32)>> = vec![None; sectors];
    let mut later: Vec<Vec<(u32, u32)>> = vec![Vec::new(); sectors];
    // The child may have completed more flushes than we saw; 200 rounds is far more than
    // it can reach between our last read and the kill.
    for r in 1..=flushed + 200 {
        for (w, (first, count)) in round_writes(r).into_iter().enumerate() {
            for s in first..first + count {
                if r <= flushed {
                    at_flush[s as usize] = Some((r, w as u32));
                } else {
                    later[s as usize].push((r, w as u32));
                }
            }
        }
    }

    let t = tier(dir.path(), None);
    let mut all = vec![0u8; ORIGIN_SIZE as usize];
    read_at(&t, 0, &mut all).unwrap();
    let mut newer = 0;
    for s in 0..sectors {
        let got = &all[s * SECTOR as usize..(s + 1) * SECTOR as usize];
        let ok_flushed = match at_flush[s] {
            None => got.iter().all(|&b| b == 0),
            Some((r, w)) => got == sector_data(r, w, s as u64),
        };
        if ok_flushed {
            continue;
        }
        let ok_later = later[s]
            .iter()
            .any(|&(r, w)| got == sector_data(r, w, s as u64));
        assert!(
            ok_later,
            "sector {s}: neither its content as of flush {flushed} ({:?}) nor a later write (header {:?})",
            at_flush[s],
            &got[..16]
        );
        newer += 1;
    }
    eprintln!(
        "killed {writes_into_next_round} writes after flush {flushed}: {sectors} sectors verified, {newer} hold post-flush writes; stats {:?}",
        t.stats()
    );
    // Everything written back: the origin alone has the same content.
    t.writeback_now().unwrap();
    drop(t);
    let mut o = vec![0u8; ORIGIN_SIZE as usize];
    read_at(&*raw(&origin), 0, &mut o).unwrap();
    assert!(
        o == all,
        "origin after writeback differs from what the tier showed"
    );
}
