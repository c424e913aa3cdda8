// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Model-based property test of the VHDX backend: random sequences of writes, reads,
//! discards, write-zeroes, flushes and reopens against an in-memory disk, for fixed and
//! dynamic images with 512-byte and 4 KiB logical sectors and several block sizes.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use proptest::prelude::*;

use vmkit_block::vhdx::{VhdxBackend, VhdxCreateOptions, VhdxSubformat};
use vmkit_block::{read_at, write_at, BlockBackend, CacheMode};

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    Read { off: u64, len: usize },
    Discard { off: u64, len: u64 },
    WriteZeroes { off: u64, len: u64, unmap: bool },
    Flush,
    Reopen,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    // Offsets and lengths are fractions of the disk, scaled at run time.
    prop_oneof![
        4 => (0u64..1_000_000, 1usize..70_000, any::<u8>())
            .prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        2 => (0u64..1_000_000, 1usize..70_000).prop_map(|(off, len)| Op::Read { off, len }),
        1 => (0u64..1_000_000, 1u64..200_000).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (0u64..1_000_000, 1u64..200_000, any::<bool>())
            .prop_map(|(off, len, unmap)| Op::WriteZeroes { off, len, unmap }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// Scales a request to the disk: offset in parts per million of the size, clipped length.
fn place(size: u64, off: u64, len: u64) -> (u64, u64) {
    let o = size * off / 1_000_000;
    (o, len.min(size - o).max(1).min(size - o))
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn run(sub: VhdxSubformat, block_size: u32, lss: u32, size: u64, ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.vhdx");
    let opts = VhdxCreateOptions {
        subformat: sub,
        block_size,
        logical_sector_size: lss,
        ..Default::default()
    };
    VhdxBackend::create(&path, size, &opts).unwrap();
    let mut d = VhdxBackend::open(&path, false, CacheMode::Writeback).unwrap();
    let size = d.virtual_size();
    let mut model = vec![0u8; size as usize];
    for op in ops {
        match *op {
            Op::Write { off, len, seed } => {
                let (o, l) = place(size, off, len as u64);
                if l == 0 {
                    continue;
                }
                let buf = data(l as usize, seed);
                write_at(&d, o, &buf).unwrap();
                model[o as usize..(o + l) as usize].copy_from_slice(&buf);
            }
            Op::Read { off, len } => {
                let (o, l) = place(size, off, len as u64);
                if l == 0 {
                    continue;
                }
                let mut buf = vec![0xeeu8; l as usize];
                read_at(&d, o, &mut buf).unwrap();
                assert!(
                    buf == model[o as usize..(o + l) as usize],
                    "read at {o}+{l}"
                );
            }
            Op::Discard { off, len } => {
                let (o, l) = place(size, off, len);
                if l == 0 {
                    continue;
                }
                d.discard(o, l).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
            }
            Op::WriteZeroes { off, len, unmap } => {
                let (o, l) = place(size, off, len);
                if l == 0 {
                    continue;
                }
                d.write_zeroes(o, l, unmap).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
            }
            Op::Flush => d.flush().unwrap(),
            Op::Reopen => {
                drop(d);
                d = VhdxBackend::open(&path, false, CacheMode::Writeback).unwrap();
                assert_eq!(d.virtual_size(), size);
            }
        }
    }
    d.flush().unwrap();
    drop(d);
    let d = VhdxBackend::open(&path, true, CacheMode::Writeback).unwrap();
    let mut all = vec![0u8; size as usize];
    read_at(&d, 0, &mut all).unwrap();
    assert!(all == model, "final content differs");
    // Allocation status agrees with the content: an unallocated extent reads as zeroes.
    let mut pos = 0;
    while pos < size {
        let st = d.block_status(pos, size - pos).unwrap();
        assert!(st.len >= 1 && pos + st.len <= size);
        if st.zero {
            assert!(model[pos as usize..(pos + st.len) as usize]
                .iter()
                .all(|&b| b == 0));
        }
        pos += st.len;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, .. ProptestConfig::default() })]

    #[test]
    fn dynamic_1m_blocks(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        run(VhdxSubformat::Dynamic, 1 << 20, 512, 6 << 20, &ops);
    }

    #[test]
    fn dynamic_4k_sectors_partial_last_block(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        run(VhdxSubformat::Dynamic, 2 << 20, 4096, (5 << 20) + 8192, &ops);
    }

    #[test]
    fn fixed(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        run(VhdxSubformat::Fixed, 1 << 20, 512, 3 << 20, &ops);
    }
}
