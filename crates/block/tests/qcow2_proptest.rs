// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Random write / read / discard / write-zeroes / flush / reopen sequences on qcow2
//! images (several layouts, with and without a backing file) against an in-memory model.
//! After each sequence the image must also pass our own consistency check.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::Path;

use proptest::prelude::*;
use vmkit_block::qcow2::{self, CreateOptions, Qcow2Backend};
use vmkit_block::{open_image, read_at, write_at, BlockBackend, OpenOptions};

const SIZE: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, val: u8 },
    Read { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Flush,
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE, 1u64..200_000).prop_map(|(off, len)| (off, len.min(SIZE - off)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((off, len), val)| Op::Write { off, len, val }),
        3 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn apply(path: &Path, ops: &[Op], model: &mut [u8]) -> Result<(), TestCaseError> {
    let mut disk = open_image(path, OpenOptions::new()).unwrap();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { off, len, val } => {
                // Not a constant fill, so misplaced bytes show.
                let data: Vec<u8> = (0..len).map(|k| val ^ (k % 251) as u8).collect();
                write_at(&*disk, off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                read_at(&*disk, off, &mut buf).unwrap();
                prop_assert!(
                    buf == model[off as usize..(off + len) as usize],
                    "op {} ({:?}): read differs from the model",
                    i,
                    op
                );
            }
            Op::Discard { off, len } => {
                disk.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Zero { off, len, unmap } => {
                disk.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => disk.flush().unwrap(),
            Op::Reopen => {
                drop(disk);
                disk = open_image(path, OpenOptions::new()).unwrap();
            }
        }
    }
    let mut all = vec![0u8; SIZE as usize];
    read_at(&*disk, 0, &mut all).unwrap();
    prop_assert!(all == model, "final content differs from the model");
    drop(disk);
    let q = Qcow2Backend::open(path, &OpenOptions::read_only()).unwrap();
    let rep = q.check().unwrap();
    prop_assert!(rep.is_clean(), "check: {:?}", rep);
    Ok(())
}

fn layouts() -> Vec<CreateOptions> {
    vec![
        CreateOptions {
            cluster_size: 512,
            ..CreateOptions::new(SIZE)
        },
        CreateOptions {
            cluster_size: 4096,
            version: 2,
            ..CreateOptions::new(SIZE)
        },
        CreateOptions::new(SIZE),
        CreateOptions {
            cluster_size: 16384,
            extended_l2: true,
            ..CreateOptions::new(SIZE)
        },
        CreateOptions {
            cluster_size: 2048,
            refcount_bits: 2,
            ..CreateOptions::new(SIZE)
        },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn qcow2_matches_model(layout in 0usize..5, ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        qcow2::create(&p, &layouts()[layout]).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        apply(&p, &ops, &mut model)?;
    }

    #[test]
    fn qcow2_over_backing_matches_model(
        layout in 0usize..5,
        qcow2_base in any::<bool>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        // Base content: a pattern over the first 3/4 (the image is larger than the base
        // when the base is raw, to cover reads past the backing file's end).
        let base_len = if qcow2_base { SIZE } else { SIZE * 3 / 4 };
        let mut model: Vec<u8> = (0..SIZE).map(|i| if i < base_len { (i % 253) as u8 | 1 } else { 0 }).collect();
        let (base_name, base_fmt) = if qcow2_base {
            let b = dir.path().join("base.qcow2");
            qcow2::create(&b, &CreateOptions { cluster_size: 4096, ..CreateOptions::new(SIZE) }).unwrap();
            let d = open_image(&b, OpenOptions::new()).unwrap();
            write_at(&*d, 0, &model).unwrap();
            // Leave a hole in the base too.
            d.discard(SIZE / 2, 4096 * 3).unwrap();
            model[(SIZE / 2) as usize..(SIZE / 2 + 4096 * 3) as usize].fill(0);
            ("base.qcow2", "qcow2")
        } else {
            std::fs::write(dir.path().join("base.raw"), &model[..base_len as usize]).unwrap();
            ("base.raw", "raw")
        };
        let p = dir.path().join("top.qcow2");
        let opts = CreateOptions {
            backing_file: Some(base_name.into()),
            backing_format: Some(base_fmt.into()),
            size: Some(SIZE),
            ..layouts()[layout].clone()
        };
        qcow2::create(&p, &opts).unwrap();
        apply(&p, &ops, &mut model)?;
    }
}

#[test]
fn refcount_table_grows_with_small_clusters() {
    // 512-byte clusters and 16-bit refcounts: one refcount block covers 128 KiB and the
    // initial one-cluster table covers 8 MiB, so 12 MiB of data forces the table to move.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("grow.qcow2");
    let size = 12u64 << 20;
    qcow2::create(
        &p,
        &CreateOptions {
            cluster_size: 512,
            ..CreateOptions::new(size)
        },
    )
    .unwrap();
    let before = {
        let q = Qcow2Backend::open(&p, &OpenOptions::read_only()).unwrap();
        q.header().refcount_table_offset
    };
    {
        let d = open_image(&p, OpenOptions::new()).unwrap();
        let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 241) as u8).collect();
        for i in 0..12u64 {
            write_at(&*d, i << 20, &chunk).unwrap();
        }
        d.flush().unwrap();
    }
    let q = Qcow2Backend::open(&p, &OpenOptions::read_only()).unwrap();
    assert_ne!(
        q.header().refcount_table_offset,
        before,
        "refcount table did not move"
    );
    let rep = q.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    let mut buf = vec![0u8; 4096];
    read_at(&q as &dyn BlockBackend, (11 << 20) + 4096, &mut buf).unwrap();
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((4096 + i) % 241) as u8));
    // QEMU agrees, when it is installed (the interop tests require it).
    if let Ok(out) = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(&p)
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
