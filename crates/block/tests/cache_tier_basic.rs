// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The caching tier: policies, LRU replacement, statistics, persistence across clean and
//! unclean shutdowns, damaged metadata, and a model-based property test.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use vmkit_block::cache_tier::{CacheTier, CacheTierOptions, WritePolicy};
use vmkit_block::raw::RawBackend;
use vmkit_block::{read_at, write_at, BlockBackend, BlockError, CacheMode};

const KIB: u64 = 1024;

struct Setup {
    _dir: tempfile::TempDir,
    origin: std::path::PathBuf,
    cache: std::path::PathBuf,
}

fn setup(origin_size: u64, cache_size: u64, block: u32) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("origin.img");
    let cache = dir.path().join("cache.img");
    RawBackend::create(&origin, origin_size).unwrap();
    RawBackend::create(&cache, cache_size).unwrap();
    let c = raw(&cache);
    CacheTier::format(&*c, origin_size, block).unwrap();
    Setup {
        _dir: dir,
        origin,
        cache,
    }
}

fn raw(p: &Path) -> Arc<RawBackend> {
    Arc::new(RawBackend::open(p, false, CacheMode::Writeback).unwrap())
}

fn opts(policy: WritePolicy) -> CacheTierOptions {
    CacheTierOptions {
        policy,
        writeback_interval: None,
        ..Default::default()
    }
}

fn open(s: &Setup, policy: WritePolicy) -> CacheTier {
    CacheTier::open(raw(&s.cache), raw(&s.origin), opts(policy)).unwrap()
}

fn origin_bytes(s: &Setup, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    read_at(&*raw(&s.origin), off, &mut v).unwrap();
    v
}

#[test]
fn writeback_hits_misses_and_writeback() {
    let s = setup(4 << 20, 1 << 20, 64 << 10);
    let t = open(&s, WritePolicy::Writeback);
    assert_eq!(t.format(), "cache-tier");
    assert_eq!(t.virtual_size(), 4 << 20);
    write_at(&t, 100, b"hello").unwrap(); // miss: block 0 promoted dirty
    write_at(&t, 200, b"world").unwrap(); // hit
    let mut b = [0u8; 5];
    read_at(&t, 200, &mut b).unwrap(); // hit
    assert_eq!(&b, b"world");
    read_at(&t, 3 << 20, &mut b).unwrap(); // miss: promoted clean
    let st = t.stats();
    assert_eq!(
        (st.write_misses, st.write_hits, st.read_hits, st.read_misses),
        (1, 1, 1, 1)
    );
    assert_eq!(
        (st.dirty_blocks, st.cached_blocks, st.promotions),
        (1, 2, 2)
    );
    assert_eq!(t.cached_blocks(), vec![(0, true), (48, false)]);
    // Not on the origin yet.
    assert_eq!(origin_bytes(&s, 100, 5), vec![0; 5]);
    t.flush().unwrap();
    assert_eq!(origin_bytes(&s, 100, 5), vec![0; 5]);
    assert_eq!(t.writeback_now().unwrap(), 1);
    assert_eq!(origin_bytes(&s, 100, 5), b"hello");
    assert_eq!(origin_bytes(&s, 200, 5), b"world");
    let st = t.stats();
    assert_eq!((st.dirty_blocks, st.writebacks), (0, 1));
    // A block crossing write.
    write_at(&t, (64 << 10) - 2, b"span").unwrap();
    read_at(&t, (64 << 10) - 2, &mut b[..4]).unwrap();
    assert_eq!(&b[..4], b"span");
    assert_eq!(t.stats().dirty_blocks, 2);
}

#[test]
fn writethrough_updates_origin_immediately() {
    let s = setup(2 << 20, 1 << 20, 64 << 10);
    let t = open(&s, WritePolicy::Writethrough);
    write_at(&t, 10, b"abc").unwrap(); // miss: origin only
    assert_eq!(origin_bytes(&s, 10, 3), b"abc");
    assert_eq!(t.stats().cached_blocks, 0);
    let mut b = [0u8; 3];
    read_at(&t, 10, &mut b).unwrap(); // promotes
    write_at(&t, 20, b"xyz").unwrap(); // hit: both
    assert_eq!(origin_bytes(&s, 20, 3), b"xyz");
    read_at(&t, 20, &mut b).unwrap();
    assert_eq!(&b, b"xyz");
    let st = t.stats();
    assert_eq!((st.dirty_blocks, st.write_hits, st.write_misses), (0, 1, 1));
    // Switching policy writes back first.
    t.set_policy(WritePolicy::Writeback).unwrap();
    write_at(&t, 30, b"wb!").unwrap();
    assert_eq!(t.stats().dirty_blocks, 1);
    t.set_policy(WritePolicy::Writethrough).unwrap();
    assert_eq!(t.stats().dirty_blocks, 0);
    assert_eq!(origin_bytes(&s, 30, 3), b"wb!");
    assert_eq!(t.policy(), WritePolicy::Writethrough);
}

#[test]
fn lru_replacement_writes_back_evicted_dirty_blocks() {
    // 4 KiB blocks, a cache of a handful of slots.
    let s = setup(1 << 20, 64 * KIB, 4096);
    let t = open(&s, WritePolicy::Writeback);
    let slots = t.stats().total_slots;
    assert!((8..16).contains(&slots), "{slots}");
    for i in 0..(slots * 3) {
        write_at(&t, i * 4096, &[i as u8 + 1; 4096]).unwrap();
        // Keep block 0 hot: it must survive the churn.
        let mut b = [0u8; 1];
        read_at(&t, 0, &mut b).unwrap();
        assert_eq!(b[0], 1);
    }
    let st = t.stats();
    assert!(st.evictions >= slots, "{st:?}");
    assert!(st.writebacks >= slots, "{st:?}");
    assert!(
        t.cached_blocks().iter().any(|&(b, _)| b == 0),
        "hot block evicted"
    );
    for i in 0..(slots * 3) {
        let mut b = [0u8; 4096];
        read_at(&t, i * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1), "block {i}");
    }
    t.writeback_now().unwrap();
    for i in 0..(slots * 3) {
        assert_eq!(origin_bytes(&s, i * 4096, 1)[0], i as u8 + 1);
    }
}

#[test]
fn clean_shutdown_keeps_cache_and_dirty_bits() {
    let s = setup(4 << 20, 1 << 20, 64 << 10);
    let t = open(&s, WritePolicy::Writeback);
    write_at(&t, 0, b"dirty").unwrap();
    let mut b = [0u8; 5];
    read_at(&t, 1 << 20, &mut b).unwrap();
    t.close().unwrap();
    assert!(read_at(&t, 0, &mut b).is_err(), "closed tier refuses I/O");
    drop(t);
    let t = open(&s, WritePolicy::Writeback);
    assert_eq!(t.cached_blocks(), vec![(0, true), (16, false)]);
    read_at(&t, 0, &mut b).unwrap();
    assert_eq!(&b, b"dirty");
    assert_eq!(t.stats().read_hits, 1);
    assert_eq!(origin_bytes(&s, 0, 5), vec![0; 5]);
}

#[test]
fn unclean_shutdown_treats_cached_blocks_as_dirty() {
    let s = setup(4 << 20, 1 << 20, 64 << 10);
    let t = open(&s, WritePolicy::Writethrough);
    let mut b = [0u8; 5];
    read_at(&t, 0, &mut b).unwrap(); // clean cached block
    write_at(&t, 0, b"first").unwrap();
    t.flush().unwrap();
    write_at(&t, 0, b"later").unwrap();
    // Simulate a crash: no clean shutdown.
    std::mem::forget(t);
    // Make the origin stale, as if its copy of the last write had been lost.
    write_at(&*raw(&s.origin), 0, b"first").unwrap();
    let t = open(&s, WritePolicy::Writeback);
    assert_eq!(t.cached_blocks(), vec![(0, true)]);
    read_at(&t, 0, &mut b).unwrap();
    assert_eq!(&b, b"later");
    t.writeback_now().unwrap();
    assert_eq!(origin_bytes(&s, 0, 5), b"later");
}

#[test]
fn background_writeback_thread_cleans_blocks() {
    let s = setup(4 << 20, 1 << 20, 64 << 10);
    let o = CacheTierOptions {
        writeback_interval: Some(std::time::Duration::from_millis(1)),
        ..Default::default()
    };
    let t = CacheTier::open(raw(&s.cache), raw(&s.origin), o).unwrap();
    for i in 0..8u64 {
        write_at(&t, i * (64 << 10), &[7; 100]).unwrap();
    }
    // Wait (without a deadline) until the thread has written everything back.
    while t.stats().dirty_blocks > 0 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(t.stats().writebacks >= 8);
    assert_eq!(origin_bytes(&s, 7 * (64 << 10), 1), vec![7]);
    t.stop_writeback_thread();
    write_at(&t, 0, &[9; 10]).unwrap();
    assert_eq!(t.stats().dirty_blocks, 1);
}

#[test]
fn discard_and_write_zeroes() {
    let s = setup(1 << 20, 256 * KIB, 4096);
    let t = open(&s, WritePolicy::Writeback);
    write_at(&t, 0, &[5u8; 16384]).unwrap();
    t.writeback_now().unwrap();
    write_at(&t, 0, &[6u8; 16384]).unwrap();
    t.discard(4096, 4096).unwrap(); // whole cached block: unmapped
    t.write_zeroes(8192 + 100, 200, false).unwrap(); // partial: zeroed in the slot
    t.discard(512 << 10, 8192).unwrap(); // uncached: goes to the origin
    assert_eq!(t.cached_blocks(), vec![(0, true), (2, true), (3, true)]);
    let st = t.block_status(0, 1 << 20).unwrap();
    assert!(st.allocated && !st.zero && st.len == 4096, "{st:?}");
    let mut b = vec![0u8; 16384];
    read_at(&t, 0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 6));
    assert!(b[4096..8192].iter().all(|&x| x == 0));
    assert!(b[8192..8292].iter().all(|&x| x == 6));
    assert!(b[8292..8492].iter().all(|&x| x == 0));
    assert!(b[8492..].iter().all(|&x| x == 6));
    t.writeback_now().unwrap();
    assert_eq!(origin_bytes(&s, 4096, 4), vec![0; 4]);
    assert_eq!(origin_bytes(&s, 8192 + 150, 4), vec![0; 4]);
}

#[test]
fn damaged_or_foreign_metadata_is_refused() {
    let s = setup(4 << 20, 1 << 20, 64 << 10);
    {
        let t = open(&s, WritePolicy::Writeback);
        write_at(&t, 0, b"x").unwrap();
        t.flush().unwrap();
    }
    let good = std::fs::read(&s.cache).unwrap();
    let try_open = || CacheTier::open(raw(&s.cache), raw(&s.origin), opts(WritePolicy::Writeback));
    // Superblock damage.
    let mut f = good.clone();
    f[20] ^= 1;
    std::fs::write(&s.cache, &f).unwrap();
    let e = try_open().unwrap_err();
    assert!(
        matches!(e, BlockError::Corrupt { .. }) && e.to_string().contains("checksum"),
        "{e}"
    );
    // Not a cache at all.
    std::fs::write(&s.cache, vec![0u8; 1 << 20]).unwrap();
    assert!(try_open().unwrap_err().to_string().contains("VMKCTIER"));
    // Both commit records damaged.
    let mut f = good.clone();
    f[4096 + 9] ^= 1;
    f[8192 + 9] ^= 1;
    std::fs::write(&s.cache, &f).unwrap();
    assert!(try_open()
        .unwrap_err()
        .to_string()
        .contains("commit record"));
    // The newest table copy damaged: the previous commit is used.
    std::fs::write(&s.cache, &good).unwrap();
    let newest = {
        let r0 = vmkit_block::cache_tier::meta::CommitRecord::parse(&good[4096..]);
        let r1 = vmkit_block::cache_tier::meta::CommitRecord::parse(&good[8192..]);
        [r0, r1]
            .into_iter()
            .flatten()
            .max_by_key(|r| r.generation)
            .unwrap()
    };
    let sb = vmkit_block::cache_tier::meta::Superblock::parse(&good).unwrap();
    let mut f = good.clone();
    let at = sb.table_offset(newest.table_copy) as usize;
    f[at] ^= 0xff;
    std::fs::write(&s.cache, &f).unwrap();
    let t = try_open().unwrap();
    drop(t);
    // An origin of another size.
    std::fs::write(&s.cache, &good).unwrap();
    RawBackend::create(&s.origin, 8 << 20).unwrap();
    assert!(matches!(
        try_open().unwrap_err(),
        BlockError::InvalidArgument(_)
    ));
    // A read-only cache device.
    let ro = Arc::new(RawBackend::open(&s.cache, true, CacheMode::Writeback).unwrap());
    assert!(CacheTier::open(ro, raw(&s.origin), opts(WritePolicy::Writeback)).is_err());
    // Bad format arguments.
    assert!(CacheTier::format(&*raw(&s.cache), 1 << 20, 1000).is_err());
    let tiny = s.cache.with_file_name("tiny.img");
    RawBackend::create(&tiny, 8192).unwrap();
    assert!(CacheTier::format(&*raw(&tiny), 1 << 20, 4096).is_err());
}

#[test]
fn read_only_origin_makes_a_read_only_tier() {
    let s = setup(1 << 20, 256 * KIB, 4096);
    let origin = Arc::new(RawBackend::open(&s.origin, true, CacheMode::Writeback).unwrap());
    let t = CacheTier::open(raw(&s.cache), origin, opts(WritePolicy::Writeback)).unwrap();
    assert!(t.is_read_only());
    assert!(matches!(write_at(&t, 0, b"x"), Err(BlockError::ReadOnly)));
    let mut b = [1u8; 4];
    read_at(&t, 0, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
    assert_eq!(t.stats().promotions, 1);
}

// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Write(u64, usize, u8),
    Read(u64, usize),
    Zero(u64, u64, bool),
    Flush,
    WritebackNow,
    Policy(bool),
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let size = 256 * KIB;
    prop_oneof![
        6 => (0..size, 1usize..20_000, any::<u8>()).prop_map(|(o, l, v)| Op::Write(o, l, v)),
        4 => (0..size, 1usize..20_000).prop_map(|(o, l)| Op::Read(o, l)),
        1 => (0..size, 1u64..20_000, any::<bool>()).prop_map(|(o, l, u)| Op::Zero(o, l, u)),
        1 => Just(Op::Flush),
        1 => Just(Op::WritebackNow),
        1 => any::<bool>().prop_map(Op::Policy),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

fn clip(size: u64, o: u64, l: u64) -> (u64, u64) {
    (o, l.min(size - o))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn model(ops in proptest::collection::vec(op(), 1..60)) {
        let size = 256 * KIB;
        // 4 KiB blocks and room for about 12 of the 64 origin blocks: lots of eviction.
        let s = setup(size, 64 * KIB, 4096);
        let mut policy = WritePolicy::Writeback;
        let mut t = open(&s, policy);
        let mut model = vec![0u8; size as usize];
        // Per 4 KiB block: every version since the last flush (the first one is the
        // flushed version). After a crash a block must read as one of them.
        let mut versions: Vec<Vec<Vec<u8>>> = (0..size / 4096).map(|_| vec![vec![0u8; 4096]]).collect();
        let record = |model: &[u8], versions: &mut Vec<Vec<Vec<u8>>>, o: u64, l: u64| {
            for b in o / 4096..=(o + l - 1) / 4096 {
                let cur = model[(b * 4096) as usize..((b + 1) * 4096) as usize].to_vec();
                versions[b as usize].push(cur);
            }
        };
        let settle = |model: &[u8], versions: &mut Vec<Vec<Vec<u8>>>| {
            for (b, v) in versions.iter_mut().enumerate() {
                *v = vec![model[b * 4096..(b + 1) * 4096].to_vec()];
            }
        };
        for op in &ops {
            match *op {
                Op::Write(o, l, v) => {
                    let (o, l) = clip(size, o, l as u64);
                    let data: Vec<u8> = (0..l).map(|i| v.wrapping_add(i as u8) | 1).collect();
                    write_at(&t, o, &data).unwrap();
                    model[o as usize..(o + l) as usize].copy_from_slice(&data);
                    record(&model, &mut versions, o, l);
                }
                Op::Read(o, l) => {
                    let (o, l) = clip(size, o, l as u64);
                    let mut b = vec![0u8; l as usize];
                    read_at(&t, o, &mut b).unwrap();
                    prop_assert!(b == model[o as usize..(o + l) as usize], "read {}+{}", o, l);
                }
                Op::Zero(o, l, unmap) => {
                    let (o, l) = clip(size, o, l);
                    t.write_zeroes(o, l, unmap).unwrap();
                    model[o as usize..(o + l) as usize].fill(0);
                    record(&model, &mut versions, o, l);
                }
                Op::Flush => {
                    t.flush().unwrap();
                    settle(&model, &mut versions);
                }
                Op::WritebackNow => {
                    t.writeback_now().unwrap();
                    prop_assert_eq!(t.stats().dirty_blocks, 0);
                    settle(&model, &mut versions);
                }
                Op::Policy(wt) => {
                    policy = if wt { WritePolicy::Writethrough } else { WritePolicy::Writeback };
                    t.set_policy(policy).unwrap();
                }
                Op::Reopen => {
                    drop(t);
                    t = open(&s, policy);
                    settle(&model, &mut versions);
                }
                Op::Crash => {
                    // The process dies without a clean shutdown (as after SIGKILL: the
                    // files keep every completed write). Each block reads as its version
                    // at the last flush or a later one.
                    std::mem::forget(t);
                    t = open(&s, policy);
                    let mut all = vec![0u8; size as usize];
                    read_at(&t, 0, &mut all).unwrap();
                    for (b, v) in versions.iter().enumerate() {
                        let got = &all[b * 4096..(b + 1) * 4096];
                        prop_assert!(v.iter().any(|x| x == got), "block {} after crash", b);
                    }
                    model = all;
                    settle(&model, &mut versions);
                }
            }
        }
        let mut all = vec![0u8; size as usize];
        read_at(&t, 0, &mut all).unwrap();
        prop_assert!(all == model);
        let st = t.stats();
        prop_assert_eq!(st.dirty_blocks as usize, t.cached_blocks().iter().filter(|b| b.1).count());
        t.writeback_now().unwrap();
        drop(t);
        prop_assert!(origin_bytes(&s, 0, size as usize) == model, "origin after writeback");
    }
}

#[test]
fn concurrent_io_with_background_writeback() {
    let s = setup(2 << 20, 128 * KIB, 4096);
    let o = CacheTierOptions {
        writeback_interval: Some(std::time::Duration::from_millis(1)),
        writeback_batch: 4,
        ..Default::default()
    };
    let t = Arc::new(CacheTier::open(raw(&s.cache), raw(&s.origin), o).unwrap());
    let stripe = 10_000usize;
    let n = (2 << 20) / stripe;
    let threads: Vec<_> = (0..4u8)
        .map(|k| {
            let t = t.clone();
            std::thread::spawn(move || {
                for round in 0..3u8 {
                    for i in (usize::from(k)..n).step_by(4) {
                        let v = k * 10 + round + 1;
                        write_at(&*t, (i * stripe) as u64, &vec![v; stripe]).unwrap();
                        let mut b = vec![0u8; stripe];
                        read_at(&*t, (i * stripe) as u64, &mut b).unwrap();
                        assert!(b.iter().all(|&x| x == v));
                    }
                    t.flush().unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    t.writeback_now().unwrap();
    let expect = |i: usize| (i % 4) as u8 * 10 + 3;
    let mut all = vec![0u8; 2 << 20];
    read_at(&*t, 0, &mut all).unwrap();
    let origin = origin_bytes(&s, 0, 2 << 20);
    for i in 0..n {
        let r = i * stripe..(i + 1) * stripe;
        assert!(all[r.clone()].iter().all(|&x| x == expect(i)), "stripe {i}");
        assert!(
            origin[r].iter().all(|&x| x == expect(i)),
            "origin stripe {i}"
        );
    }
}
