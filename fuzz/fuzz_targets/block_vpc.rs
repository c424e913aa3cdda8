// SPDX-License-Identifier: Apache-2.0 OR MIT
//! VHD (vpc) images from the fuzzer: either arbitrary bytes, or a valid dynamic or fixed
//! image with fuzzer-chosen patches to its footers, dynamic header and BAT (checksums
//! optionally recomputed so the deeper code runs). The footer and header parsers, then the
//! image opened read-only and read-write: reads, writes, discard, write-zeroes, block
//! status, flush. Nothing may panic.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_block::vpc::dynamic::DynHeader;
use vmkit_block::vpc::footer::{vhd_checksum, Footer};
use vmkit_block::vpc::{VpcBackend, VpcCreateOptions, VpcSubformat};
use vmkit_block::{read_at, write_at, BlockBackend, CacheMode};

#[derive(Arbitrary, Debug)]
struct Patch {
    /// 0: head footer copy, 1: dynamic header, 2: BAT, 3: trailing footer, 4: anywhere.
    area: u8,
    offset: u16,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Patched {
        fixed: bool,
        patches: Vec<Patch>,
        fix_checksums: bool,
        truncate: Option<u16>,
    },
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmkit-fuzz-vpc-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("image.vhd")
}

/// A small written image of each subformat (dynamic: 4 KiB blocks, a few allocated).
fn template(fixed: bool) -> &'static [u8] {
    static T: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
    let t = T.get_or_init(|| {
        let make = |sub| {
            let p = std::env::temp_dir().join(format!(
                "vmkit-fuzz-vpc-template-{}-{sub:?}",
                std::process::id()
            ));
            let opts = VpcCreateOptions {
                subformat: sub,
                block_size: 4096,
                force_size: true,
            };
            let mut bytes = Vec::new();
            if VpcBackend::create(&p, 64 << 10, &opts).is_ok() {
                if let Ok(d) = VpcBackend::open(&p, false, CacheMode::Unsafe) {
                    let _ = write_at(&d, 5000, &[0x11; 3000]);
                    let _ = write_at(&d, 40_000, &[0x22; 100]);
                }
                bytes = std::fs::read(&p).unwrap_or_default();
            }
            let _ = std::fs::remove_file(&p);
            bytes
        };
        [make(VpcSubformat::Dynamic), make(VpcSubformat::Fixed)]
    });
    &t[usize::from(fixed)]
}

fn exercise(img: &VpcBackend, write: bool) {
    let size = img.virtual_size();
    let mut buf = vec![0u8; 9000];
    for off in [0, size / 3, size / 2, size.saturating_sub(9000)] {
        let n = (size - off.min(size)).min(9000) as usize;
        let _ = read_at(img, off, &mut buf[..n]);
        let _ = img.block_status(off.min(size.saturating_sub(1)), 1 << 20);
    }
    if write {
        let _ = write_at(img, 1, &[0xa5; 3000]);
        let _ = write_at(img, size / 2, &vec![0x5a; 10_000.min(size as usize / 2)]);
        let _ = img.write_zeroes(size / 4, 5000.min(size / 4), false);
        let _ = img.discard(0, 4096.min(size));
        let _ = img.flush();
    }
}

fuzz_target!(|input: Input| {
    let bytes = match input {
        Input::Raw(b) => {
            let _ = Footer::parse(&b);
            let _ = DynHeader::parse(&b);
            b
        }
        Input::Patched {
            fixed,
            patches,
            fix_checksums,
            truncate,
        } => {
            let mut b = template(fixed).to_vec();
            if b.len() < 2048 {
                return;
            }
            let n = b.len();
            for p in patches.iter().take(16) {
                let base = match p.area % 5 {
                    0 => 0,
                    1 => 512,
                    2 => 1536,
                    3 => n - 512,
                    _ => 0,
                };
                let span = if p.area % 5 == 4 { n } else { 512 };
                let start = base + usize::from(p.offset) % span;
                for (i, v) in p.bytes.iter().take(64).enumerate() {
                    if let Some(x) = b.get_mut(start + i) {
                        *x = *v;
                    }
                }
            }
            if fix_checksums {
                let sum = vhd_checksum(&b[n - 512..], 64);
                b[n - 512 + 64..n - 512 + 68].copy_from_slice(&sum.to_be_bytes());
                if !fixed {
                    let sum = vhd_checksum(&b[..512], 64);
                    b[64..68].copy_from_slice(&sum.to_be_bytes());
                    let sum = vhd_checksum(&b[512..1536], 36);
                    b[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
                }
            }
            if let Some(t) = truncate {
                b.truncate(n.saturating_sub(usize::from(t)));
            }
            b
        }
    };
    let path = scratch();
    if std::fs::write(&path, &bytes).is_err() {
        return;
    }
    if let Ok(img) = VpcBackend::open(&path, true, CacheMode::Unsafe) {
        exercise(&img, false);
    }
    if let Ok(img) = VpcBackend::open(&path, false, CacheMode::Unsafe) {
        exercise(&img, true);
    }
    let _ = std::fs::remove_file(&path);
});
