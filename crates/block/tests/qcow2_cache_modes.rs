// SPDX-License-Identifier: Apache-2.0 OR MIT
//! qcow2 and raw images in every cache mode, with vectored, unaligned guest buffers
//! (O_DIRECT goes through bounce buffers then), and run-time cache mode switches.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use vm_memory::VolatileSlice;
use vmkit_block::qcow2::{self, CreateOptions, Qcow2Backend};
use vmkit_block::raw::RawBackend;
use vmkit_block::{open_image, BlockBackend, BlockError, CacheMode, OpenOptions};

const MODES: [CacheMode; 4] = [
    CacheMode::Writeback,
    CacheMode::Writethrough,
    CacheMode::None,
    CacheMode::Unsafe,
];

/// Writes through three buffers of odd sizes at an odd offset, reads back through a
/// different split, and compares.
fn vectored_round_trip(disk: &dyn BlockBackend, offset: u64, seed: u8) {
    let mut a = vec![0u8; 1000];
    let mut b = vec![0u8; 70_001];
    let mut c = vec![0u8; 3];
    for (i, x) in a
        .iter_mut()
        .chain(b.iter_mut())
        .chain(c.iter_mut())
        .enumerate()
    {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    let expect: Vec<u8> = a.iter().chain(&b).chain(&c).copied().collect();
    {
        let bufs = [
            VolatileSlice::from(a.as_mut_slice()),
            VolatileSlice::from(b.as_mut_slice()),
            VolatileSlice::from(c.as_mut_slice()),
        ];
        disk.write_vectored(offset, &bufs).unwrap();
    }
    let mut x = vec![0u8; 4097];
    let mut y = vec![0u8; expect.len() - 4097];
    {
        let bufs = [
            VolatileSlice::from(x.as_mut_slice()),
            VolatileSlice::from(y.as_mut_slice()),
        ];
        disk.read_vectored(offset, &bufs).unwrap();
    }
    x.extend_from_slice(&y);
    assert!(
        x == expect,
        "vectored round trip differs at offset {offset}"
    );
}

fn direct_supported(dir: &std::path::Path) -> bool {
    let p = dir.join("probe");
    std::fs::write(&p, [0u8; 4096]).unwrap();
    RawBackend::open(&p, false, CacheMode::None).is_ok()
}

#[test]
fn qcow2_in_every_cache_mode() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let direct = direct_supported(dir.path());
    for (i, mode) in MODES.into_iter().enumerate() {
        if mode == CacheMode::None && !direct {
            eprintln!("O_DIRECT is not supported on this file system: cache=none skipped");
            continue;
        }
        let p = dir.path().join(format!("m{i}.qcow2"));
        qcow2::create(
            &p,
            &CreateOptions {
                cluster_size: 4096,
                ..CreateOptions::new(4 << 20)
            },
        )
        .unwrap();
        let disk = open_image(
            &p,
            OpenOptions {
                cache: mode,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(disk.cache_mode(), mode);
        vectored_round_trip(&*disk, 12_345, i as u8);
        vectored_round_trip(&*disk, 1 << 20, i as u8 + 1);
        disk.write_zeroes(12_345, 500, false).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let q = Qcow2Backend::open(&p, &OpenOptions::read_only()).unwrap();
        assert!(q.check().unwrap().is_clean());
    }
}

#[test]
fn raw_in_every_cache_mode() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let direct = direct_supported(dir.path());
    for (i, mode) in MODES.into_iter().enumerate() {
        if mode == CacheMode::None && !direct {
            continue;
        }
        let p = dir.path().join(format!("m{i}.raw"));
        RawBackend::create(&p, 4 << 20).unwrap();
        let disk = RawBackend::open(&p, false, mode).unwrap();
        vectored_round_trip(&disk, 4095, i as u8);
        vectored_round_trip(&disk, (4 << 20) - 71_004, i as u8);
        disk.flush().unwrap();
    }
}

#[test]
fn cache_mode_switches() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    qcow2::create(&p, &CreateOptions::new(1 << 20)).unwrap();
    let disk = open_image(&p, OpenOptions::new()).unwrap();
    disk.set_cache_mode(CacheMode::Writethrough).unwrap();
    assert_eq!(disk.cache_mode(), CacheMode::Writethrough);
    vectored_round_trip(&*disk, 0, 9);
    disk.set_cache_mode(CacheMode::Writeback).unwrap();
    assert!(matches!(
        disk.set_cache_mode(CacheMode::None),
        Err(BlockError::InvalidArgument(_))
    ));
    assert_eq!(disk.cache_mode(), CacheMode::Writeback);
}

#[test]
fn raw_block_status_follows_holes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.raw");
    RawBackend::create(&p, 8 << 20).unwrap();
    let disk = RawBackend::open(&p, false, CacheMode::Writeback).unwrap();
    vmkit_block::write_at(&disk, 1 << 20, &vec![1u8; 1 << 20]).unwrap();
    let st = disk.block_status(0, 8 << 20).unwrap();
    assert!(!st.allocated && st.zero);
    assert_eq!(st.len, 1 << 20);
    let st = disk.block_status(1 << 20, 8 << 20).unwrap();
    assert!(st.allocated && !st.zero);
    assert_eq!(st.len, 1 << 20);
    // Discard punches the data out again.
    disk.discard(1 << 20, 1 << 20).unwrap();
    let st = disk.block_status(1 << 20, 4096).unwrap();
    assert!(st.zero);
    let mut buf = [9u8; 16];
    vmkit_block::read_at(&disk, (1 << 20) + 5, &mut buf).unwrap();
    assert_eq!(buf, [0; 16]);
    assert!(disk.block_status(8 << 20, 1).is_err());
}
