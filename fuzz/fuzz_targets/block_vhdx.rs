// SPDX-License-Identifier: Apache-2.0 OR MIT
//! VHDX images from the fuzzer: the structure parsers on arbitrary bytes, and a valid
//! dynamic or fixed image with fuzzer-chosen patches to its headers, region tables,
//! metadata, BAT and log (CRCs optionally recomputed), optionally with a fuzzer-built
//! pending log. The image is opened read-only (log replayed in memory) and read-write
//! (log replayed on disk) and exercised. Nothing may panic.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_block::vhdx::crc32c::crc32c_with_zero_field;
use vmkit_block::vhdx::guid::Guid;
use vmkit_block::vhdx::header::{parse_region_table, Header};
use vmkit_block::vhdx::log::{parse_entry, LogEntryBuilder, LogWrite};
use vmkit_block::vhdx::metadata::parse_table;
use vmkit_block::vhdx::{VhdxBackend, VhdxCreateOptions, VhdxSubformat};
use vmkit_block::{read_at, write_at, BlockBackend, CacheMode};

const H1: usize = 64 << 10;
const H2: usize = 128 << 10;
const RT1: usize = 192 << 10;
const RT2: usize = 256 << 10;
const LOG: usize = 1 << 20;
const BAT: usize = 2 << 20;
const META: usize = 3 << 20;

#[derive(Arbitrary, Debug)]
struct Patch {
    /// 0/1 headers, 2/3 region tables, 4 metadata table, 5 metadata items, 6 BAT, 7 log.
    area: u8,
    offset: u16,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum LogOp {
    Data { offset_kib: u32, fill: u8 },
    Zero { offset_kib: u32, len_kib: u16 },
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Patched {
        fixed: bool,
        patches: Vec<Patch>,
        fix_crcs: bool,
        log: Option<(u64, u32, Vec<LogOp>)>,
    },
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmkit-fuzz-vhdx-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("image.vhdx")
}

/// An 8 MiB image of each subformat with 1 MiB blocks, a few blocks written.
fn template(fixed: bool) -> &'static [u8] {
    static T: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
    let t = T.get_or_init(|| {
        let make = |sub| {
            let p = std::env::temp_dir().join(format!(
                "vmkit-fuzz-vhdx-template-{}-{sub:?}",
                std::process::id()
            ));
            let opts = VhdxCreateOptions {
                subformat: sub,
                block_size: 1 << 20,
                ..Default::default()
            };
            let mut bytes = Vec::new();
            if VhdxBackend::create(&p, 8 << 20, &opts).is_ok() {
                if let Ok(d) = VhdxBackend::open(&p, false, CacheMode::Unsafe) {
                    let _ = write_at(&d, 5000, &[0x11; 3000]);
                    let _ = write_at(&d, 5 << 20, &[0x22; 100]);
                }
                bytes = std::fs::read(&p).unwrap_or_default();
            }
            let _ = std::fs::remove_file(&p);
            bytes
        };
        [make(VhdxSubformat::Dynamic), make(VhdxSubformat::Fixed)]
    });
    &t[usize::from(fixed)]
}

fn exercise(img: &VhdxBackend, write: bool) {
    let size = img.virtual_size();
    let mut buf = vec![0u8; 9000];
    for off in [0, size / 3, size / 2, size.saturating_sub(9000)] {
        let n = (size - off.min(size)).min(9000) as usize;
        let _ = read_at(img, off, &mut buf[..n]);
        let _ = img.block_status(off.min(size.saturating_sub(1)), 1 << 30);
    }
    if write {
        let _ = write_at(img, 1, &[0xa5; 3000]);
        let _ = write_at(img, size / 2, &vec![0x5a; 10_000.min(size as usize / 2)]);
        let _ = img.write_zeroes(size / 4, 5000.min(size / 4), false);
        let _ = img.discard(0, 4096.min(size));
        let _ = img.flush();
    }
}

fn current_header_slot(b: &[u8]) -> usize {
    let a = Header::parse(&b[H1..H1 + 4096]).map(|h| h.sequence_number);
    let c = Header::parse(&b[H2..H2 + 4096]).map(|h| h.sequence_number);
    match (a, c) {
        (Ok(x), Ok(y)) if y > x => H2,
        (Err(_), Ok(_)) => H2,
        _ => H1,
    }
}

fuzz_target!(|input: Input| {
    let bytes = match input {
        Input::Raw(b) => {
            let _ = Header::parse(&b);
            let _ = parse_region_table(&b);
            let _ = parse_table(&b, b.len() as u64);
            let _ = parse_entry(&b, 0, &Guid::ZERO);
            if b.len() < (1 << 20) {
                return;
            }
            b
        }
        Input::Patched {
            fixed,
            patches,
            fix_crcs,
            log,
        } => {
            let mut b = template(fixed).to_vec();
            if b.len() < META + (1 << 20) {
                return;
            }
            for p in patches.iter().take(16) {
                let (base, span) = match p.area % 8 {
                    0 => (H1, 4096),
                    1 => (H2, 4096),
                    2 => (RT1, 512),
                    3 => (RT2, 512),
                    4 => (META, 512),
                    5 => (META + (64 << 10), 64),
                    6 => (BAT, 256),
                    _ => (LOG, 16384),
                };
                let start = base + usize::from(p.offset) % span;
                for (i, v) in p.bytes.iter().take(64).enumerate() {
                    if let Some(x) = b.get_mut(start + i) {
                        *x = *v;
                    }
                }
            }
            if let Some((seq, tail, ops)) = log {
                let guid = Guid::new(0x1234_5678, 1, 2, [3; 8]);
                let writes = ops
                    .iter()
                    .take(8)
                    .map(|o| match *o {
                        LogOp::Data { offset_kib, fill } => LogWrite::Data {
                            file_offset: u64::from(offset_kib % (16 << 10)) * 4096,
                            data: vec![fill; 4096],
                        },
                        LogOp::Zero {
                            offset_kib,
                            len_kib,
                        } => LogWrite::Zero {
                            file_offset: u64::from(offset_kib % (16 << 10)) * 4096,
                            length: u64::from(len_kib) * 4096,
                        },
                    })
                    .collect();
                let e = LogEntryBuilder {
                    sequence_number: seq,
                    tail: (tail % 256) * 4096,
                    log_guid: guid,
                    flushed_file_offset: 0,
                    last_file_offset: b.len() as u64,
                    writes,
                }
                .to_bytes();
                if e.len() <= 1 << 20 {
                    b[LOG..LOG + e.len()].copy_from_slice(&e);
                }
                let slot = current_header_slot(&b);
                b[slot + 48..slot + 64].copy_from_slice(&guid.0);
                let c = crc32c_with_zero_field(&b[slot..slot + 4096], 4);
                b[slot + 4..slot + 8].copy_from_slice(&c.to_le_bytes());
            }
            if fix_crcs {
                for (at, len) in [(H1, 4096), (H2, 4096), (RT1, 64 << 10), (RT2, 64 << 10)] {
                    let c = crc32c_with_zero_field(&b[at..at + len], 4);
                    b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
                }
            }
            b
        }
    };
    let path = scratch();
    if std::fs::write(&path, &bytes).is_err() {
        return;
    }
    if let Ok(img) = VhdxBackend::open(&path, true, CacheMode::Unsafe) {
        exercise(&img, false);
    }
    if let Ok(img) = VhdxBackend::open(&path, false, CacheMode::Unsafe) {
        exercise(&img, true);
    }
    let _ = std::fs::remove_file(&path);
});
