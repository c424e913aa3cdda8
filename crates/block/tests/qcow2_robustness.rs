// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Corrupted, truncated and hostile qcow2 images: clear errors naming the file and the
//! problem, no panics, nothing written to an image that did not open cleanly.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::{Path, PathBuf};

use vmkit_block::qcow2::{self, CreateOptions, Qcow2Backend};
use vmkit_block::{open_image, read_at, write_at, BlockError, OpenOptions};

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn patch(p: &Path, off: usize, bytes: &[u8]) {
    let mut d = std::fs::read(p).unwrap();
    if d.len() < off + bytes.len() {
        d.resize(off + bytes.len(), 0);
    }
    d[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(p, d).unwrap();
}

/// A 4 MiB v3 image with 64 KiB clusters and the first 1 MiB written.
fn sample(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qcow2::create(&p, &CreateOptions::new(4 << 20)).unwrap();
    let b = open_image(&p, OpenOptions::new()).unwrap();
    write_at(&*b, 0, &vec![0x5a; 1 << 20]).unwrap();
    b.flush().unwrap();
    p
}

/// Opening must fail with a message containing all of `needles`, and the file must be
/// left byte for byte as it was.
fn expect_open_error(p: &Path, needles: &[&str]) -> BlockError {
    let before = std::fs::read(p).unwrap();
    let err = match open_image(p, OpenOptions::new()) {
        Ok(_) => panic!("{} opened despite the damage", p.display()),
        Err(e) => e,
    };
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
    assert_eq!(before, std::fs::read(p).unwrap(), "image was modified");
    err
}

#[test]
fn unknown_incompatible_bit_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "a.qcow2");
    patch(&p, 72, &(1u64 << 7).to_be_bytes());
    let e = expect_open_error(&p, &["a.qcow2", "incompatible feature bit 7"]);
    assert!(matches!(e, BlockError::Unsupported { .. }));
}

#[test]
fn absurd_l1_size_and_tables_past_eof() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "l1.qcow2");
    patch(&p, 36, &0x7fff_ffffu32.to_be_bytes());
    expect_open_error(&p, &["l1.qcow2", "L1 table"]);

    let p = sample(dir.path(), "l1eof.qcow2");
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    expect_open_error(&p, &["L1 table", "past the end of the file"]);

    let p = sample(dir.path(), "rt.qcow2");
    patch(&p, 48, &(1u64 << 40).to_be_bytes());
    expect_open_error(&p, &["refcount table"]);
}

#[test]
fn tables_pointing_into_the_header_or_overlapping() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "hdr.qcow2");
    patch(&p, 40, &0u64.to_be_bytes());
    expect_open_error(&p, &["L1 table", "header"]);

    let p = sample(dir.path(), "ovl.qcow2");
    let d = std::fs::read(&p).unwrap();
    let rt = be64(&d, 48);
    patch(&p, 40, &rt.to_be_bytes());
    expect_open_error(&p, &["overlaps"]);

    let p = sample(dir.path(), "cs.qcow2");
    patch(&p, 20, &30u32.to_be_bytes());
    expect_open_error(&p, &["cluster_bits 30"]);

    let p = sample(dir.path(), "ver.qcow2");
    patch(&p, 4, &7u32.to_be_bytes());
    expect_open_error(&p, &["version 7"]);

    let p = sample(dir.path(), "rco.qcow2");
    patch(&p, 96, &9u32.to_be_bytes());
    expect_open_error(&p, &["refcount_order 9"]);

    let p = sample(dir.path(), "crypt.qcow2");
    patch(&p, 32, &1u32.to_be_bytes());
    expect_open_error(&p, &["encrypt"]);
}

#[test]
fn l2_and_data_offsets_are_validated_on_use() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "l2.qcow2");
    let d = std::fs::read(&p).unwrap();
    let l1 = be64(&d, 40) as usize;
    // L1 entry 0 -> L2 table inside the L1 table itself.
    patch(&p, l1, &((l1 as u64) | (1 << 63)).to_be_bytes());
    let b = open_image(&p, OpenOptions::read_only()).unwrap();
    let mut buf = [0u8; 512];
    let e = read_at(&*b, 0, &mut buf).unwrap_err().to_string();
    assert!(e.contains("l2.qcow2") && e.contains("L2 table"), "{e}");

    // L2 entry 0 -> data cluster far past EOF.
    let p = sample(dir.path(), "data.qcow2");
    let d = std::fs::read(&p).unwrap();
    let l1 = be64(&d, 40) as usize;
    let l2 = (be64(&d, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    patch(&p, l2, &((1u64 << 45) | (1 << 63)).to_be_bytes());
    let before = std::fs::read(&p).unwrap();
    let b = open_image(&p, OpenOptions::new()).unwrap();
    let e = read_at(&*b, 0, &mut buf).unwrap_err().to_string();
    assert!(e.contains("past the end of the file"), "{e}");
    // A write to that cluster is refused too, and nothing lands far away.
    assert!(write_at(&*b, 0, &[1u8; 512]).is_err());
    drop(b);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), before.len() as u64);

    // Unaligned data cluster offset.
    let p = sample(dir.path(), "unal.qcow2");
    let d = std::fs::read(&p).unwrap();
    let l1 = be64(&d, 40) as usize;
    let l2 = (be64(&d, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e0 = be64(&d, l2);
    patch(&p, l2, &(e0 + 0x200).to_be_bytes());
    let b = open_image(&p, OpenOptions::read_only()).unwrap();
    let e = read_at(&*b, 0, &mut buf).unwrap_err().to_string();
    assert!(e.contains("not cluster aligned"), "{e}");
}

#[test]
fn data_cluster_aliasing_metadata_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "alias.qcow2");
    let d = std::fs::read(&p).unwrap();
    let l1 = be64(&d, 40) as usize;
    let rt = be64(&d, 48);
    let l2 = (be64(&d, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    // Guest cluster 0 -> the refcount table.
    patch(&p, l2, &(rt | (1 << 63)).to_be_bytes());
    let before = std::fs::read(&p).unwrap();
    let b = open_image(&p, OpenOptions::new()).unwrap();
    let e = write_at(&*b, 0, &[0xffu8; 4096]).unwrap_err().to_string();
    assert!(e.contains("overlaps image metadata"), "{e}");
    drop(b);
    assert_eq!(before, std::fs::read(&p).unwrap());
}

#[test]
fn truncated_and_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "t.qcow2");
    let d = std::fs::read(&p).unwrap();
    for len in [3usize, 50, 100, 200, 70_000] {
        let q = dir.path().join(format!("t{len}.qcow2"));
        std::fs::write(&q, &d[..len]).unwrap();
        let r = open_image(&q, OpenOptions::new());
        if len < 4 {
            // Not even the magic: this is a raw image.
            assert_eq!(r.unwrap().format(), "raw");
        } else {
            let e = r.err().expect("truncated image opened").to_string();
            assert!(e.contains(&format!("t{len}.qcow2")), "{e}");
        }
    }
    // A raw file claimed to be qcow2.
    let raw = dir.path().join("disk.qcow2");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let opts = OpenOptions {
        format: Some("qcow2"),
        ..OpenOptions::default()
    };
    let e = open_image(&raw, opts).err().unwrap().to_string();
    assert!(e.contains("disk.qcow2") && e.contains("not qcow2"), "{e}");
    // The name does not matter: probed as raw.
    assert_eq!(
        open_image(&raw, OpenOptions::new()).unwrap().format(),
        "raw"
    );
}

#[test]
fn missing_backing_file_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    qcow2::create(
        &top,
        &CreateOptions {
            backing_file: Some("base.raw".into()),
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::remove_file(&base).unwrap();
    let e = expect_open_error(&top, &["top.qcow2", "base.raw"]);
    assert!(matches!(e, BlockError::Backing { .. }));
}

#[test]
fn backing_loops_and_deep_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // a -> b -> a
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qcow2::create(&b, &CreateOptions::new(1 << 20)).unwrap();
    let backed = |name: &str| CreateOptions {
        backing_file: Some(name.into()),
        backing_format: Some("qcow2".into()),
        ..Default::default()
    };
    qcow2::create(&a, &backed("b.qcow2")).unwrap();
    qcow2::create(&b, &backed("a.qcow2")).unwrap();
    expect_open_error(&a, &["loops"]);
    expect_open_error(&b, &["loops"]);
    // A self loop.
    let s = dir.path().join("self.qcow2");
    qcow2::create(&s, &CreateOptions::new(1 << 20)).unwrap();
    qcow2::create(&s, &backed("self.qcow2")).unwrap();
    expect_open_error(&s, &["loops"]);
    // Forcing "raw" as the backing format is not a loop: the file is read as raw bytes.
    let r = dir.path().join("r.qcow2");
    qcow2::create(&r, &CreateOptions::new(1 << 20)).unwrap();
    qcow2::create(
        &r,
        &CreateOptions {
            backing_file: Some("a.qcow2".into()),
            backing_format: Some("raw".into()),
            size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        open_image(&r, OpenOptions::read_only())
            .unwrap()
            .backing_chain()[0]
            .1,
        "raw"
    );

    // 0 <- 1 <- ... <- 17: too deep.
    let base = dir.path().join("c0.raw");
    std::fs::write(&base, vec![7u8; 1 << 16]).unwrap();
    let mut prev = "c0.raw".to_string();
    for i in 1..=17 {
        let name = format!("c{i}.qcow2");
        qcow2::create(
            &dir.path().join(&name),
            &CreateOptions {
                backing_file: Some(prev.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        prev = name;
        let r = open_image(dir.path().join(&prev), OpenOptions::read_only());
        if i <= 16 {
            let b = r.unwrap();
            assert_eq!(b.backing_chain().len(), i);
            let mut x = [0u8; 4];
            read_at(&*b, 100, &mut x).unwrap();
            assert_eq!(x, [7; 4]);
        } else {
            let e = r.err().unwrap().to_string();
            assert!(e.contains("deeper than 16"), "{e}");
        }
    }
}

#[test]
fn corrupt_bit_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "c.qcow2");
    patch(&p, 72, &2u64.to_be_bytes());
    expect_open_error(&p, &["c.qcow2", "marked corrupt"]);
    let b = open_image(&p, OpenOptions::read_only()).unwrap();
    let mut buf = [0u8; 8];
    read_at(&*b, 0, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 8]);
    assert!(matches!(write_at(&*b, 0, &buf), Err(BlockError::ReadOnly)));
}

/// Finds the 16-bit refcount entry of cluster `c` in the first refcount block.
fn refcount_entry_offset(d: &[u8], c: u64) -> usize {
    let rt = be64(d, 48) as usize;
    let rb = be64(d, rt) as usize;
    rb + 2 * c as usize
}

#[test]
fn check_finds_and_repair_fixes_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "leak.qcow2");
    let d = std::fs::read(&p).unwrap();
    let clusters = (d.len() as u64).div_ceil(65536);
    // Leak two clusters: one inside the file that nothing references...
    let spare = clusters + 1;
    patch(&p, refcount_entry_offset(&d, spare), &1u16.to_be_bytes());
    // ...and raise the refcount of the header cluster (refcount too high = leak).
    patch(&p, refcount_entry_offset(&d, 0), &2u16.to_be_bytes());
    let q = Qcow2Backend::open(&p, &OpenOptions::read_only()).unwrap();
    let rep = q.check().unwrap();
    assert_eq!(rep.leaks.len(), 2, "{rep:?}");
    assert!(rep.corruptions.is_empty(), "{rep:?}");
    assert!(matches!(q.repair(), Err(BlockError::ReadOnly)));
    drop(q);
    let q = Qcow2Backend::open(&p, &OpenOptions::new()).unwrap();
    let after = q.repair().unwrap();
    assert!(after.is_clean(), "{after:?}");
    assert!(q.check().unwrap().is_clean());
}

#[test]
fn repair_fixes_missing_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "low.qcow2");
    let d = std::fs::read(&p).unwrap();
    let l1 = be64(&d, 40) as usize;
    let l2 = (be64(&d, l1) & 0x00ff_ffff_ffff_fe00) / 65536;
    // The L2 table's refcount dropped to 0: a corruption (and OFLAG_COPIED mismatch).
    patch(&p, refcount_entry_offset(&d, l2), &0u16.to_be_bytes());
    let q = Qcow2Backend::open(&p, &OpenOptions::new()).unwrap();
    let rep = q.check().unwrap();
    assert!(!rep.corruptions.is_empty());
    let after = q.repair().unwrap();
    assert!(after.is_clean(), "{after:?}");
    // Data survived.
    let mut buf = [0u8; 16];
    read_at(&q, 4096, &mut buf).unwrap();
    assert_eq!(buf, [0x5a; 16]);
}

#[test]
fn dirty_image_is_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "dirty.qcow2");
    let d = std::fs::read(&p).unwrap();
    let spare = (d.len() as u64).div_ceil(65536) + 3;
    patch(&p, refcount_entry_offset(&d, spare), &1u16.to_be_bytes());
    patch(&p, 72, &1u64.to_be_bytes());
    // Read-only: opens as is (reads are fine), nothing is written.
    let before = std::fs::read(&p).unwrap();
    {
        let b = open_image(&p, OpenOptions::read_only()).unwrap();
        let mut buf = [0u8; 4];
        read_at(&*b, 0, &mut buf).unwrap();
    }
    assert_eq!(before, std::fs::read(&p).unwrap());
    // Read-write: repaired, dirty bit cleared.
    {
        let _b = open_image(&p, OpenOptions::new()).unwrap();
    }
    let d = std::fs::read(&p).unwrap();
    assert_eq!(be64(&d, 72) & 1, 0);
    let q = Qcow2Backend::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(q.check().unwrap().is_clean());
}

#[test]
fn refcount_overflow_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rc1.qcow2");
    qcow2::create(
        &p,
        &CreateOptions {
            refcount_bits: 1,
            ..CreateOptions::new(1 << 20)
        },
    )
    .unwrap();
    {
        let b = open_image(&p, OpenOptions::new()).unwrap();
        write_at(&*b, 0, &[1u8; 4096]).unwrap();
        write_at(&*b, 65536, &[2u8; 4096]).unwrap();
    }
    // Point guest cluster 1 at guest cluster 0's data: needs refcount 2 in 1 bit.
    let d = std::fs::read(&p).unwrap();
    let l1 = be64(&d, 40) as usize;
    let l2 = (be64(&d, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e0 = be64(&d, l2);
    patch(&p, l2 + 8, &e0.to_be_bytes());
    let q = Qcow2Backend::open(&p, &OpenOptions::new()).unwrap();
    let rep = q.check().unwrap();
    assert!(!rep.corruptions.is_empty());
    let e = q.repair().unwrap_err().to_string();
    assert!(e.contains("overflow"), "{e}");
}

#[test]
fn out_of_range_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path(), "r.qcow2");
    let b = open_image(&p, OpenOptions::new()).unwrap();
    let mut buf = [0u8; 2];
    assert!(matches!(
        read_at(&*b, (4 << 20) - 1, &mut buf),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        b.write_zeroes(u64::MAX - 1, 4, true),
        Err(BlockError::OutOfRange { .. })
    ));
    let r = open_image(&p, OpenOptions::read_only()).unwrap();
    assert!(matches!(r.discard(0, 512), Err(BlockError::ReadOnly)));
}

#[test]
fn concurrent_writers_on_disjoint_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mt.qcow2");
    qcow2::create(
        &p,
        &CreateOptions {
            cluster_size: 4096,
            ..CreateOptions::new(8 << 20)
        },
    )
    .unwrap();
    let b = open_image(&p, OpenOptions::new()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let b = b.clone();
            s.spawn(move || {
                // Interleaved 3000-byte chunks: neighbours share clusters.
                for i in 0..200u64 {
                    let off = (i * 4 + u64::from(t)) * 3000;
                    write_at(&*b, off, &vec![t + 1; 3000]).unwrap();
                }
            });
        }
    });
    for i in 0..800u64 {
        let mut buf = vec![0u8; 3000];
        read_at(&*b, i * 3000, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == (i % 4) as u8 + 1), "chunk {i}");
    }
    drop(b);
    let q = Qcow2Backend::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(q.check().unwrap().is_clean());
}
