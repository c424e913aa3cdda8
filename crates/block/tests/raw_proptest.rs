// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Random write / read / discard / write-zeroes / flush sequences on raw images against
//! an in-memory model, in every cache mode this file system allows.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use proptest::prelude::*;
use vmkit_block::raw::RawBackend;
use vmkit_block::{read_at, write_at, BlockBackend, CacheMode};

const SIZE: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, val: u8 },
    Read { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Flush,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE, 1u64..100_000).prop_map(|(off, len)| (off, len.min(SIZE - off)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((off, len), val)| Op::Write { off, len, val }),
        3 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => Just(Op::Flush),
    ]
}

fn run(mode: CacheMode, ops: &[Op]) -> Result<(), TestCaseError> {
    // Not /tmp: it may be tmpfs, which has no O_DIRECT.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = dir.path().join("disk.raw");
    RawBackend::create(&p, SIZE).unwrap();
    let disk = match RawBackend::open(&p, false, mode) {
        Ok(d) => d,
        Err(e) if mode == CacheMode::None => {
            eprintln!("O_DIRECT unavailable here ({e}); skipping cache=none");
            return Ok(());
        }
        Err(e) => panic!("{e}"),
    };
    let mut model = vec![0u8; SIZE as usize];
    for op in ops {
        match *op {
            Op::Write { off, len, val } => {
                let data: Vec<u8> = (0..len).map(|k| val ^ (k % 251) as u8).collect();
                write_at(&disk, off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                read_at(&disk, off, &mut buf).unwrap();
                prop_assert!(buf == model[off as usize..(off + len) as usize], "{:?}", op);
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
        }
    }
    prop_assert_eq!(disk.virtual_size(), SIZE);
    drop(disk);
    prop_assert!(std::fs::read(&p).unwrap() == model);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn raw_matches_model(mode in 0usize..4, ops in prop::collection::vec(op(), 1..40)) {
        let m = [CacheMode::Writeback, CacheMode::Writethrough, CacheMode::None, CacheMode::Unsafe][mode];
        run(m, &ops)?;
    }
}
