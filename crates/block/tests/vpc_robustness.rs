// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Hostile and damaged VHD images: clear errors naming the problem, no panic, and nothing
//! written to an image that failed to open. Also sector bitmaps with clear bits, as other
//! tools write them.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::Path;

use vmkit_block::vpc::dynamic::DynHeader;
use vmkit_block::vpc::footer::{Footer, FOOTER_SIZE};
use vmkit_block::vpc::{VpcBackend, VpcCreateOptions, VpcSubformat};
use vmkit_block::{read_at, write_at, BlockBackend, BlockError, CacheMode};

fn open(p: &Path, ro: bool) -> Result<VpcBackend, BlockError> {
    VpcBackend::open(p, ro, CacheMode::Writeback)
}

/// A dynamic 4 MiB image (64 KiB blocks) with blocks 0 and 3 written.
fn dynamic_image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let p = dir.join("d.vhd");
    let opts = VpcCreateOptions {
        block_size: 64 << 10,
        force_size: true,
        ..Default::default()
    };
    VpcBackend::create(&p, 4 << 20, &opts).unwrap();
    let d = open(&p, false).unwrap();
    write_at(&d, 100, &[0xab; 1000]).unwrap();
    write_at(&d, 3 * (64 << 10) + 7, &[0xcd; 5000]).unwrap();
    d.flush().unwrap();
    drop(d);
    let bytes = std::fs::read(&p).unwrap();
    (p, bytes)
}

fn dyn_header(f: &[u8]) -> DynHeader {
    DynHeader::parse(&f[512..1536]).unwrap()
}

fn set_dyn_header(f: &mut [u8], h: &DynHeader) {
    f[512..1536].copy_from_slice(&h.to_bytes());
}

fn set_bat(f: &mut [u8], idx: usize, v: u32) {
    let t = dyn_header(f).table_offset as usize;
    f[t + 4 * idx..t + 4 * idx + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes `f` to `p`, expects open to fail with an error whose message contains `needle`,
/// and checks the file is unchanged.
fn expect_error(p: &Path, f: &[u8], needle: &str, unsupported: bool) {
    std::fs::write(p, f).unwrap();
    let err = open(p, false).expect_err("open should fail");
    let msg = err.to_string();
    assert!(
        msg.contains(needle),
        "error {msg:?} should mention {needle:?}"
    );
    assert!(
        msg.contains(p.to_str().unwrap()),
        "error {msg:?} should name the file"
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

#[test]
fn bad_footer_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut f) = dynamic_image(dir.path());
    let n = f.len();
    f[n - 512 + 40] ^= 1; // original size, inside the checksum
    f[40] ^= 1; // and the copy at offset 0
    expect_error(&p, &f, "checksum", false);
}

#[test]
fn head_copy_is_used_when_the_trailing_footer_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut f) = dynamic_image(dir.path());
    let n = f.len();
    f.truncate(n - 512);
    std::fs::write(&p, &f).unwrap();
    let d = open(&p, false).unwrap();
    let mut b = [0u8; 4];
    read_at(&d, 100, &mut b).unwrap();
    assert_eq!(b, [0xab; 4]);
    // A write that allocates puts a footer back at the end.
    write_at(&d, 2 << 20, b"x").unwrap();
    drop(d);
    let f = std::fs::read(&p).unwrap();
    let tail = Footer::parse(&f[f.len() - FOOTER_SIZE..]).unwrap();
    assert_eq!(tail.virtual_size(), 4 << 20);
}

#[test]
fn bat_entry_pointing_at_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut f) = dynamic_image(dir.path());
    set_bat(&mut f, 1, 1); // sector 1 = the dynamic header
    expect_error(&p, &f, "overlaps image metadata", false);
}

#[test]
fn bat_entry_past_eof() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut f) = dynamic_image(dir.path());
    set_bat(&mut f, 2, 0x00ff_ffff);
    expect_error(&p, &f, "BAT entry 2", false);
}

#[test]
fn overlapping_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut f) = dynamic_image(dir.path());
    let t = dyn_header(&f).table_offset as usize;
    let b0 = u32::from_be_bytes(f[t..t + 4].try_into().unwrap());
    set_bat(&mut f, 5, b0 + 8);
    expect_error(&p, &f, "overlapping", false);
}

#[test]
fn absurd_table_size() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut f) = dynamic_image(dir.path());
    let mut h = dyn_header(&f);
    h.max_table_entries = u32::MAX;
    set_dyn_header(&mut f, &h);
    expect_error(&p, &f, "BAT", false);
    let mut h = dyn_header(&f);
    h.max_table_entries = 2; // 128 KiB of blocks for a 4 MiB disk
    set_dyn_header(&mut f, &h);
    expect_error(&p, &f, "too small", false);
    let mut h = dyn_header(&f);
    h.max_table_entries = 64;
    h.table_offset = u64::MAX - 10;
    set_dyn_header(&mut f, &h);
    expect_error(&p, &f, "BAT", false);
}

#[test]
fn bad_block_size_and_header_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = dynamic_image(dir.path());
    let mut g = f.clone();
    g[512 + 32..512 + 36].copy_from_slice(&3000u32.to_be_bytes());
    expect_error(&p, &g, "checksum", false);
    let mut h = dyn_header(&f);
    h.block_size = 3000;
    let mut g = f.clone();
    set_dyn_header(&mut g, &h);
    expect_error(&p, &g, "block size", false);
    let mut g = f.clone();
    g[512..520].copy_from_slice(b"notsparse"[..8].try_into().unwrap());
    expect_error(&p, &g, "cxsparse", false);
}

fn rewrite_footers(f: &mut [u8], edit: impl Fn(&mut Footer)) {
    let n = f.len();
    let mut ft = Footer::parse(&f[n - 512..]).unwrap();
    edit(&mut ft);
    let b = ft.to_bytes();
    f[n - 512..].copy_from_slice(&b);
    if Footer::parse(&f[..512]).is_ok() {
        f[..512].copy_from_slice(&b);
    }
}

#[test]
fn differencing_is_unsupported_and_size_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = dynamic_image(dir.path());
    let mut g = f.clone();
    rewrite_footers(&mut g, |ft| {
        ft.disk_type = vmkit_block::vpc::footer::DiskType::Differencing
    });
    expect_error(&p, &g, "differencing", true);
    let mut g = f.clone();
    rewrite_footers(&mut g, |ft| ft.current_size = 3 << 40);
    expect_error(&p, &g, "2040 GiB", true);
    let mut g = f.clone();
    rewrite_footers(&mut g, |ft| ft.data_offset = 1 << 40);
    expect_error(&p, &g, "dynamic header", false);
}

#[test]
fn truncated_and_tiny_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.vhd");
    VpcBackend::create(
        &p,
        1 << 20,
        &VpcCreateOptions {
            subformat: VpcSubformat::Fixed,
            ..Default::default()
        },
    )
    .unwrap();
    let f = std::fs::read(&p).unwrap();
    // Drop 64 KiB of data but keep the footer.
    let mut g = f[..f.len() - 512 - 65536].to_vec();
    g.extend_from_slice(&f[f.len() - 512..]);
    expect_error(&p, &g, "truncated", false);
    expect_error(&p, &[0u8; 100], "too short", false);
    expect_error(&p, &[0u8; 4096], "conectix", false);
}

#[test]
fn partial_sector_bitmaps_read_as_zeroes_and_are_completed_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut f) = dynamic_image(dir.path());
    let t = dyn_header(&f).table_offset as usize;
    let b0 = u32::from_be_bytes(f[t..t + 4].try_into().unwrap()) as usize * 512;
    // Clear the bits of sectors 0 and 2..=9 of block 0 and put garbage in sectors 2..10.
    f[b0] = 0b0100_0000;
    f[b0 + 1] = 0b0011_1111;
    let data0 = b0 + 512; // bitmap of a 64 KiB block is 512 bytes
    f[data0 + 2 * 512..data0 + 10 * 512].fill(0x99);
    std::fs::write(&p, &f).unwrap();
    let d = open(&p, false).unwrap();
    let mut all = vec![0u8; 64 << 10];
    read_at(&d, 0, &mut all).unwrap();
    assert!(all[..512].iter().all(|&b| b == 0), "sector 0 bit clear");
    assert!(
        all[512..1024].iter().all(|&b| b == 0xab),
        "sector 1 bit set"
    );
    assert!(
        all[1024..10 * 512].iter().all(|&b| b == 0),
        "sectors 2..10 clear"
    );
    let st = d.block_status(0, 64 << 10).unwrap();
    assert!(!st.allocated && st.zero && st.len == 512);
    let st = d.block_status(512, 64 << 10).unwrap();
    assert!(st.allocated && st.len == 512);
    // A 10-byte write into sector 3: the rest of sector 3 must read as zeroes.
    write_at(&d, 3 * 512 + 100, &[0x42; 10]).unwrap();
    read_at(&d, 0, &mut all).unwrap();
    assert!(all[3 * 512..3 * 512 + 100].iter().all(|&b| b == 0));
    assert!(all[3 * 512 + 100..3 * 512 + 110].iter().all(|&b| b == 0x42));
    assert!(all[3 * 512 + 110..4 * 512].iter().all(|&b| b == 0));
    assert!(all[4 * 512..10 * 512].iter().all(|&b| b == 0));
    drop(d);
    let g = std::fs::read(&p).unwrap();
    assert_eq!(g[b0 + 1], 0b0011_1111 | 0b0001_0000, "bit of sector 3 set");
    // Reopen: still the same content.
    let d = open(&p, true).unwrap();
    let mut again = vec![0u8; 64 << 10];
    read_at(&d, 0, &mut again).unwrap();
    assert!(again == all);
}

#[test]
fn read_only_and_range_checks() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = dynamic_image(dir.path());
    let d = open(&p, true).unwrap();
    assert!(matches!(write_at(&d, 0, b"x"), Err(BlockError::ReadOnly)));
    assert!(matches!(d.discard(0, 512), Err(BlockError::ReadOnly)));
    let d = open(&p, false).unwrap();
    let size = d.virtual_size();
    let mut b = [0u8; 2];
    assert!(matches!(
        read_at(&d, size - 1, &mut b),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        write_at(&d, u64::MAX, &b),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(d.block_status(size, 1).is_err());
    assert_eq!(d.format(), "vpc");
    assert_eq!(d.subformat(), VpcSubformat::Dynamic);
}

/// Random damage to the metadata of a valid image never panics; when the image still
/// opens, reads and writes work or fail cleanly and writes stay inside the data area.
#[test]
fn random_metadata_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (p, f) = dynamic_image(dir.path());
    let n = f.len();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..400 {
        let mut g = f.clone();
        for _ in 0..(next() % 4 + 1) {
            let r = next();
            // Damage the footers, the dynamic header or the BAT.
            let at = match r % 3 {
                0 => (r >> 8) as usize % 512,
                1 => 512 + (r >> 8) as usize % 1536,
                _ => n - 512 + (r >> 8) as usize % 512,
            };
            g[at] = (r >> 32) as u8;
        }
        // Keep the checksums valid half of the time so that deeper code runs.
        if next() % 2 == 0 {
            let sum = vmkit_block::vpc::footer::vhd_checksum(&g[n - 512..], 64);
            g[n - 512 + 64..n - 512 + 68].copy_from_slice(&sum.to_be_bytes());
            let sum = vmkit_block::vpc::footer::vhd_checksum(&g[512..1536], 36);
            g[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
        }
        std::fs::write(&p, &g).unwrap();
        let Ok(d) = open(&p, false) else {
            assert!(std::fs::read(&p).unwrap() == g);
            continue;
        };
        let size = d.virtual_size().min(64 << 20);
        let mut buf = vec![0u8; 8192];
        for i in 0..8u64 {
            let off = (next() % size.max(1)).min(size.saturating_sub(8192));
            if size >= 8192 {
                let _ = read_at(&d, off, &mut buf);
                if i % 2 == 0 {
                    let _ = write_at(&d, off, &buf);
                }
                let _ = d.discard(off, 4096.min(size - off));
            }
        }
        let _ = d.flush();
    }
}

#[test]
fn tiny_and_odd_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("z.vhd");
    for sub in [VpcSubformat::Dynamic, VpcSubformat::Fixed] {
        for (size, force) in [(0u64, false), (1, true), (1000, true), (12345, false)] {
            let opts = VpcCreateOptions {
                subformat: sub,
                force_size: force,
                ..Default::default()
            };
            VpcBackend::create(&p, size, &opts).unwrap();
            let d = open(&p, false).unwrap();
            let vs = d.virtual_size();
            assert!(vs >= size && vs % 512 == 0, "{sub:?} {size} -> {vs}");
            if vs > 0 {
                write_at(&d, vs - 1, b"z").unwrap();
                let mut b = [0u8; 1];
                read_at(&d, vs - 1, &mut b).unwrap();
                assert_eq!(&b, b"z");
            }
            assert!(write_at(&d, vs, b"z").is_err());
        }
    }
    assert!(matches!(
        VpcBackend::create(&p, 3 << 40, &VpcCreateOptions::default()),
        Err(BlockError::InvalidArgument(_))
    ));
    let bad = VpcCreateOptions {
        block_size: 3000,
        ..Default::default()
    };
    assert!(matches!(
        VpcBackend::create(&p, 1 << 20, &bad),
        Err(BlockError::InvalidArgument(_))
    ));
}

#[test]
fn concurrent_writers_allocate_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhd");
    let opts = VpcCreateOptions {
        block_size: 64 << 10,
        force_size: true,
        ..Default::default()
    };
    VpcBackend::create(&p, 8 << 20, &opts).unwrap();
    let d = std::sync::Arc::new(open(&p, false).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                // Thread t owns every 4th 10000-byte stripe: stripes straddle blocks, so
                // threads race to allocate the same blocks.
                for i in (usize::from(t)..838).step_by(4) {
                    write_at(&*d, (i * 10_000) as u64, &[t + 1; 10_000]).unwrap();
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
    let mut all = vec![0u8; 8 << 20];
    read_at(&d, 0, &mut all).unwrap();
    for i in 0..838 {
        let want = (i % 4) as u8 + 1;
        assert!(
            all[i * 10_000..(i + 1) * 10_000].iter().all(|&b| b == want),
            "stripe {i}"
        );
    }
}
