// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Hostile and damaged VHDX images: clear errors naming the problem, no panic, nothing
//! written to an image that failed to open; header maintenance on writes.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::{Path, PathBuf};

use vmkit_block::vhdx::crc32c::crc32c_with_zero_field;
use vmkit_block::vhdx::guid::Guid;
use vmkit_block::vhdx::header::{region_table_bytes, Header, RegionEntry, MIB};
use vmkit_block::vhdx::log::{LogEntryBuilder, LogWrite};
use vmkit_block::vhdx::{VhdxBackend, VhdxCreateOptions, VhdxSubformat};
use vmkit_block::{read_at, write_at, BlockBackend, BlockError, CacheMode};

const H1: usize = 64 << 10;
const H2: usize = 128 << 10;
const RT1: usize = 192 << 10;
const RT2: usize = 256 << 10;
// Layout of images made by VhdxBackend::create with a 1 MiB log and a small disk.
const LOG: usize = 1 << 20;
const BAT: usize = 2 << 20;
const META: usize = 3 << 20;

fn open(p: &Path, ro: bool) -> Result<VhdxBackend, BlockError> {
    VhdxBackend::open(p, ro, CacheMode::Writeback)
}

/// An 8 MiB dynamic image with 1 MiB blocks; blocks 0 and 3 written.
fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("d.vhdx");
    let opts = VhdxCreateOptions {
        block_size: 1 << 20,
        ..Default::default()
    };
    VhdxBackend::create(&p, 8 << 20, &opts).unwrap();
    let d = open(&p, false).unwrap();
    write_at(&d, 100, &[0xab; 1000]).unwrap();
    write_at(&d, (3 << 20) + 7, &[0xcd; 5000]).unwrap();
    d.flush().unwrap();
    drop(d);
    let f = std::fs::read(&p).unwrap();
    (p, f)
}

fn fix_crc(f: &mut [u8], at: usize, len: usize) {
    let c = crc32c_with_zero_field(&f[at..at + len], 4);
    f[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
}

fn current_header(f: &[u8]) -> (usize, Header) {
    let a = Header::parse(&f[H1..H1 + 4096]);
    let b = Header::parse(&f[H2..H2 + 4096]);
    match (a, b) {
        (Ok(a), Ok(b)) if b.sequence_number > a.sequence_number => (H2, b),
        (Ok(a), _) => (H1, a),
        (_, Ok(b)) => (H2, b),
        _ => panic!("no valid header"),
    }
}

fn set_bat(f: &mut [u8], idx: usize, v: u64) {
    f[BAT + 8 * idx..BAT + 8 * idx + 8].copy_from_slice(&v.to_le_bytes());
}

fn bat(f: &[u8], idx: usize) -> u64 {
    u64::from_le_bytes(f[BAT + 8 * idx..BAT + 8 * idx + 8].try_into().unwrap())
}

fn expect_error(p: &Path, f: &[u8], needle: &str, unsupported: bool) {
    std::fs::write(p, f).unwrap();
    for ro in [false, true] {
        let err = open(p, ro).expect_err("open should fail");
        let msg = err.to_string();
        assert!(
            msg.contains(needle),
            "error {msg:?} should mention {needle:?}"
        );
        assert!(
            msg.contains(p.to_str().unwrap()),
            "{msg:?} should name the file"
        );
        match (&err, unsupported) {
            (BlockError::Unsupported { .. }, true) | (BlockError::Corrupt { .. }, false) => {}
            _ => panic!("unexpected error kind: {err:?}"),
        }
        assert!(
            std::fs::read(p).unwrap() == f,
            "failed open modified the file"
        );
    }
}

#[test]
fn layout_assumptions_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (_, f) = image(dir.path());
    let (_, h) = current_header(&f);
    assert_eq!(h.log_offset as usize, LOG);
    assert_eq!(&f[META..META + 8], b"metadata");
    assert_eq!(bat(&f, 0) & 7, 6);
    assert_eq!(bat(&f, 1) & 7, 0);
}

#[test]
fn signature_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = image(dir.path());
    let mut g = f.clone();
    g[0] = b'X';
    expect_error(&p, &g, "vhdxfile", false);
    // One damaged header: the other one is used.
    let (cur, _) = current_header(&f);
    let mut g = f.clone();
    g[cur + 20] ^= 1;
    std::fs::write(&p, &g).unwrap();
    let d = open(&p, true).unwrap();
    let mut b = [0u8; 2];
    read_at(&d, 100, &mut b).unwrap();
    assert_eq!(b, [0xab; 2]);
    drop(d);
    // Both damaged.
    let mut g = f.clone();
    g[H1 + 20] ^= 1;
    g[H2 + 20] ^= 1;
    expect_error(&p, &g, "both VHDX headers", false);
    // Unknown versions.
    let mut g = f.clone();
    for h in [H1, H2] {
        g[h + 66] = 2;
        fix_crc(&mut g, h, 4096);
    }
    expect_error(&p, &g, "version 2", true);
    let mut g = f.clone();
    for h in [H1, H2] {
        g[h + 64] = 1;
        fix_crc(&mut g, h, 4096);
    }
    expect_error(&p, &g, "log version", true);
    // Log outside the file.
    let mut g = f.clone();
    for h in [H1, H2] {
        g[h + 72..h + 80].copy_from_slice(&(1u64 << 40).to_le_bytes());
        fix_crc(&mut g, h, 4096);
    }
    expect_error(&p, &g, "log", false);
    std::fs::write(&p, &f).unwrap();
}

fn regions(f: &[u8]) -> Vec<RegionEntry> {
    vmkit_block::vhdx::header::parse_region_table(&f[RT1..RT1 + (64 << 10)]).unwrap()
}

fn set_regions(f: &mut [u8], r: &[RegionEntry]) {
    let b = region_table_bytes(r);
    f[RT1..RT1 + b.len()].copy_from_slice(&b);
    f[RT2..RT2 + b.len()].copy_from_slice(&b);
}

#[test]
fn region_tables() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = image(dir.path());
    let mut g = f.clone();
    g[RT1 + 40] ^= 1;
    std::fs::write(&p, &g).unwrap();
    assert!(open(&p, true).is_ok(), "second region table used");
    g[RT2 + 40] ^= 1;
    expect_error(&p, &g, "region tables", false);
    let r = regions(&f);
    let mut extra = r.clone();
    extra.push(RegionEntry {
        guid: Guid::random(),
        file_offset: 4 * MIB,
        length: MIB as u32,
        required: true,
    });
    let mut g = f.clone();
    set_regions(&mut g, &extra);
    expect_error(&p, &g, "required region", true);
    // Optional unknown regions are ignored.
    extra.last_mut().unwrap().required = false;
    let mut g = f.clone();
    set_regions(&mut g, &extra);
    std::fs::write(&p, &g).unwrap();
    // (it overlaps block 0's payload: BAT entries must not point into regions)
    let e = open(&p, true).expect_err("payload overlapping a region");
    assert!(e.to_string().contains("overlapping region"), "{e}");
    let mut over = r.clone();
    over[1].file_offset = over[0].file_offset;
    let mut g = f.clone();
    set_regions(&mut g, &over);
    expect_error(&p, &g, "overlaps", false);
    let mut g = f.clone();
    set_regions(&mut g, &r[1..]);
    expect_error(&p, &g, "no BAT", false);
    let mut past = r.clone();
    past[0].file_offset = 1 << 40;
    let mut g = f.clone();
    set_regions(&mut g, &past);
    expect_error(&p, &g, "past the end", false);
    let mut log = r.clone();
    log[0].file_offset = LOG as u64;
    let mut g = f.clone();
    set_regions(&mut g, &log);
    expect_error(&p, &g, "overlaps the log", false);
}

#[test]
fn metadata_problems() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = image(dir.path());
    // File parameters item: first entry of our table, at 64 KiB into the region.
    let fp = META + (64 << 10);
    let mut g = f.clone();
    g[fp + 4] |= 2; // has parent
    expect_error(&p, &g, "differencing", true);
    let mut g = f.clone();
    g[fp..fp + 4].copy_from_slice(&(3u32 << 20).to_le_bytes());
    expect_error(&p, &g, "block size", false);
    let mut g = f.clone();
    g[META] = b'M';
    expect_error(&p, &g, "metadata", false);
    // Virtual size of 1 TiB: the BAT region (1 MiB) is too small for it.
    let size_item = fp + 8;
    let mut g = f.clone();
    g[size_item..size_item + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_error(&p, &g, "BAT region", false);
    let mut g = f.clone();
    g[size_item..size_item + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    expect_error(&p, &g, "64 TiB", false);
}

#[test]
fn bat_problems() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = image(dir.path());
    let mut g = f.clone();
    set_bat(&mut g, 1, (META as u64) | 6);
    expect_error(&p, &g, "metadata region", false);
    let mut g = f.clone();
    set_bat(&mut g, 1, 6); // offset 0
    expect_error(&p, &g, "header section", false);
    let mut g = f.clone();
    set_bat(&mut g, 1, (LOG as u64) | 6);
    expect_error(&p, &g, "the log", false);
    let mut g = f.clone();
    set_bat(&mut g, 1, (1u64 << 40) | 6);
    expect_error(&p, &g, "past the end", false);
    let mut g = f.clone();
    set_bat(&mut g, 1, bat(&f, 0));
    expect_error(&p, &g, "overlapping blocks", false);
    let mut g = f.clone();
    set_bat(&mut g, 1, 7);
    expect_error(&p, &g, "PARTIALLY_PRESENT", false);
    let mut g = f.clone();
    set_bat(&mut g, 1, 4);
    expect_error(&p, &g, "invalid payload state", false);
    // ZERO, UNMAPPED and UNDEFINED blocks read as zeroes; a write allocates.
    let mut g = f.clone();
    set_bat(&mut g, 0, 2);
    set_bat(&mut g, 3, 3);
    set_bat(&mut g, 4, 1);
    std::fs::write(&p, &g).unwrap();
    let d = open(&p, false).unwrap();
    let mut all = vec![0u8; 8 << 20];
    read_at(&d, 0, &mut all).unwrap();
    assert!(all.iter().all(|&b| b == 0));
    let st = d.block_status(0, 8 << 20).unwrap();
    assert!(!st.allocated && st.zero && st.len == 8 << 20);
    write_at(&d, (3 << 20) + 5, b"again").unwrap();
    read_at(&d, 3 << 20, &mut all[..10]).unwrap();
    assert_eq!(&all[..10], b"\0\0\0\0\0again");
}

fn with_log(f: &[u8], writes: Vec<LogWrite>, flushed: u64) -> Vec<u8> {
    let mut g = f.to_vec();
    let guid = Guid::random();
    let e = LogEntryBuilder {
        sequence_number: 5,
        tail: 0,
        log_guid: guid,
        flushed_file_offset: flushed,
        last_file_offset: g.len() as u64,
        writes,
    }
    .to_bytes();
    g[LOG..LOG + e.len()].copy_from_slice(&e);
    let (cur, mut h) = current_header(&g);
    let other = if cur == H1 { H2 } else { H1 };
    h.sequence_number += 1;
    h.log_guid = guid;
    g[other..other + 4096].copy_from_slice(&h.to_bytes());
    g
}

#[test]
fn hostile_logs() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = image(dir.path());
    let sector = vec![0x55u8; 4096];
    // A log entry that writes into the header section.
    let g = with_log(
        &f,
        vec![LogWrite::Data {
            file_offset: 64 << 10,
            data: sector.clone(),
        }],
        0,
    );
    expect_error(&p, &g, "header section", false);
    // ... into the log itself.
    let g = with_log(
        &f,
        vec![LogWrite::Zero {
            file_offset: LOG as u64,
            length: 4096,
        }],
        0,
    );
    expect_error(&p, &g, "the log itself", false);
    // ... absurdly far.
    let g = with_log(
        &f,
        vec![LogWrite::Zero {
            file_offset: 1 << 50,
            length: 4096,
        }],
        0,
    );
    expect_error(&p, &g, "past", false);
    // A log that says the file was longer than it is.
    let g = with_log(
        &f,
        vec![LogWrite::Zero {
            file_offset: 5 << 20,
            length: 4096,
        }],
        1 << 30,
    );
    expect_error(&p, &g, "truncated", false);
    // A log that corrupts the BAT: validated before anything is written.
    let mut bad_bat = f[BAT..BAT + 4096].to_vec();
    bad_bat[8..16].copy_from_slice(&((META as u64) | 6).to_le_bytes());
    let g = with_log(
        &f,
        vec![LogWrite::Data {
            file_offset: BAT as u64,
            data: bad_bat,
        }],
        0,
    );
    expect_error(&p, &g, "metadata region", false);
    // A good log: a zeroed range inside block 0.
    let b0 = bat(&f, 0) >> 20 << 20;
    let g = with_log(
        &f,
        vec![LogWrite::Zero {
            file_offset: b0,
            length: 4096,
        }],
        f.len() as u64,
    );
    std::fs::write(&p, &g).unwrap();
    let d = open(&p, true).unwrap();
    assert!(d.info().log_replayed);
    let mut b = [1u8; 4];
    read_at(&d, 100, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
    drop(d);
    assert!(std::fs::read(&p).unwrap() == g);
    let d = open(&p, false).unwrap();
    read_at(&d, 100, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
    drop(d);
    let after = std::fs::read(&p).unwrap();
    let (_, h) = current_header(&after);
    assert!(h.log_guid.is_zero());
    assert!(Header::parse(&after[H1..H1 + 4096])
        .unwrap()
        .log_guid
        .is_zero());
    assert!(Header::parse(&after[H2..H2 + 4096])
        .unwrap()
        .log_guid
        .is_zero());
}

#[test]
fn headers_change_once_on_first_write_only() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = image(dir.path());
    // Open read-write without writing, and read: nothing changes.
    let d = open(&p, false).unwrap();
    let mut b = [0u8; 16];
    read_at(&d, 0, &mut b).unwrap();
    d.flush().unwrap();
    drop(d);
    assert!(std::fs::read(&p).unwrap() == f);
    let (_, before) = current_header(&f);
    let d = open(&p, false).unwrap();
    write_at(&d, 0, b"a").unwrap();
    write_at(&d, 1, b"b").unwrap();
    drop(d);
    let g = std::fs::read(&p).unwrap();
    let h1 = Header::parse(&g[H1..H1 + 4096]).unwrap();
    let h2 = Header::parse(&g[H2..H2 + 4096]).unwrap();
    let seqs = [h1.sequence_number, h2.sequence_number];
    assert!(seqs.contains(&(before.sequence_number + 1)));
    assert!(seqs.contains(&(before.sequence_number + 2)));
    let (_, after) = current_header(&g);
    assert_ne!(after.file_write_guid, before.file_write_guid);
    assert_ne!(after.data_write_guid, before.data_write_guid);
    assert_eq!(h1.file_write_guid, h2.file_write_guid);
}

#[test]
fn fixed_image_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.vhdx");
    let opts = VhdxCreateOptions {
        subformat: VhdxSubformat::Fixed,
        block_size: 1 << 20,
        ..Default::default()
    };
    VhdxBackend::create(&p, (3 << 20) + 512, &opts).unwrap();
    let len_before = std::fs::metadata(&p).unwrap().len();
    let d = open(&p, false).unwrap();
    assert_eq!(d.subformat(), VhdxSubformat::Fixed);
    assert_eq!(d.virtual_size(), (3 << 20) + 512);
    let st = d.block_status(0, d.virtual_size()).unwrap();
    assert!(st.allocated && st.len == d.virtual_size());
    write_at(&d, (3 << 20) + 100, b"tail").unwrap();
    drop(d);
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        len_before,
        "no allocation"
    );
    assert!(matches!(
        VhdxBackend::create(
            &p,
            1 << 20,
            &VhdxCreateOptions {
                block_size: 3 << 20,
                ..Default::default()
            }
        ),
        Err(BlockError::InvalidArgument(_))
    ));
    assert!(VhdxBackend::create(&p, 1 << 50, &VhdxCreateOptions::default()).is_err());
}

/// Random damage never panics; failed opens never modify the file.
#[test]
fn random_metadata_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = image(dir.path());
    let mut x: u64 = 0x0bad_c0de_1234_5679;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..300 {
        let mut g = f.clone();
        for _ in 0..(next() % 4 + 1) {
            let r = next();
            let at = match r % 5 {
                0 => H1 + (r >> 8) as usize % 128,
                1 => H2 + (r >> 8) as usize % 128,
                2 => RT1 + (r >> 8) as usize % 128,
                3 => META + (r >> 8) as usize % 256 + if r & 0x100 != 0 { 64 << 10 } else { 0 },
                _ => BAT + (r >> 8) as usize % 64,
            };
            g[at] = (r >> 32) as u8;
        }
        if next() % 2 == 0 {
            fix_crc(&mut g, H1, 4096);
            fix_crc(&mut g, H2, 4096);
            fix_crc(&mut g, RT1, 64 << 10);
        }
        std::fs::write(&p, &g).unwrap();
        let Ok(d) = open(&p, false) else {
            assert!(std::fs::read(&p).unwrap() == g);
            continue;
        };
        let size = d.virtual_size().min(64 << 20);
        if size >= 8192 {
            let mut buf = vec![0u8; 8192];
            for i in 0..6u64 {
                let off = (next() % size).min(size - 8192);
                let _ = read_at(&d, off, &mut buf);
                if i % 2 == 0 {
                    let _ = write_at(&d, off, &buf);
                }
                let _ = d.write_zeroes(off, 4096, i % 3 == 0);
            }
        }
        let _ = d.flush();
    }
}

#[test]
fn tiny_sizes_and_4k_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("z.vhdx");
    for sub in [VhdxSubformat::Dynamic, VhdxSubformat::Fixed] {
        for (size, lss) in [(0u64, 512u32), (1, 512), (1000, 4096), (5 << 20, 4096)] {
            let opts = VhdxCreateOptions {
                subformat: sub,
                logical_sector_size: lss,
                block_size: 1 << 20,
                ..Default::default()
            };
            VhdxBackend::create(&p, size, &opts).unwrap();
            let d = open(&p, false).unwrap();
            let vs = d.virtual_size();
            assert_eq!(vs, size.next_multiple_of(u64::from(lss)));
            assert_eq!(d.info().params.logical_sector_size, lss);
            if vs > 0 {
                write_at(&d, vs - 1, b"z").unwrap();
                let mut b = [0u8; 1];
                read_at(&d, vs - 1, &mut b).unwrap();
                assert_eq!(&b, b"z");
            }
            assert!(write_at(&d, vs, b"z").is_err());
        }
    }
}

#[test]
fn concurrent_writers_allocate_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhdx");
    let opts = VhdxCreateOptions {
        block_size: 1 << 20,
        ..Default::default()
    };
    VhdxBackend::create(&p, 16 << 20, &opts).unwrap();
    let d = std::sync::Arc::new(open(&p, false).unwrap());
    let stripe = 300_000usize;
    let n = (16 << 20) / stripe;
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in (usize::from(t)..n).step_by(4) {
                    write_at(&*d, (i * stripe) as u64, &vec![t + 1; stripe]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    d.flush().unwrap();
    drop(d);
    let d = open(&p, true).unwrap();
    let mut all = vec![0u8; 16 << 20];
    read_at(&d, 0, &mut all).unwrap();
    for i in 0..n {
        let want = (i % 4) as u8 + 1;
        assert!(
            all[i * stripe..(i + 1) * stripe].iter().all(|&b| b == want),
            "stripe {i}"
        );
    }
}
