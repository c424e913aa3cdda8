// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Interoperability of the VPC (VHD) and VHDX backends with QEMU's qemu-img and qemu-io
//! (package qemu-utils).
//!
//! - Images that qemu-img creates (fixed and dynamic, several VHDX block sizes) and that
//!   qemu-img convert / qemu-io fill read byte-identical to `qemu-img convert -O raw`.
//! - Images that we create and write pass `qemu-img check` (VHDX; qemu has no check for
//!   VPC) and `qemu-img compare` against the expected raw content.
//! - A VHDX with a pending log that we construct by hand (per the specification) is
//!   replayed by us (in memory read-only, on disk read-write) and by qemu-img, with
//!   identical results.
//!
//! These tests fail (they do not skip) when qemu-img is missing: install qemu-utils.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use vmkit_block::vhdx::crc32c::crc32c;
use vmkit_block::vhdx::{VhdxBackend, VhdxCreateOptions, VhdxSubformat};
use vmkit_block::vpc::{VpcBackend, VpcCreateOptions, VpcSubformat};
use vmkit_block::{read_at, write_at, BlockBackend, BlockError, CacheMode};

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install qemu-utils to run the qemu interop tests");
}

fn run(name: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Deterministic content: pseudo-random runs separated by zero stretches.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut pos = 0usize;
    while pos < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let run = (x % (300 * 1024)) as usize + 1;
        let zero = x % 3 == 0;
        let end = (pos + run).min(len);
        if !zero {
            for (i, b) in v[pos..end].iter_mut().enumerate() {
                *b = (x >> ((i % 8) * 8)) as u8 ^ (i as u8);
            }
        }
        pos = end;
    }
    v
}

fn read_all(d: &dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    for (i, chunk) in v.chunks_mut(3 << 20).enumerate() {
        read_at(d, (i * (3 << 20)) as u64, chunk).unwrap();
    }
    v
}

fn qemu_to_raw(img: &Path, fmt: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.qemu.raw",
        img.file_name().unwrap().to_str().unwrap()
    ));
    run_ok(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", s(img), s(&out)],
    );
    std::fs::read(&out).unwrap()
}

fn open_vpc(p: &Path, ro: bool) -> VpcBackend {
    VpcBackend::open(p, ro, CacheMode::Writeback).unwrap()
}

fn open_vhdx(p: &Path, ro: bool) -> VhdxBackend {
    VhdxBackend::open(p, ro, CacheMode::Writeback).unwrap()
}

fn qemu_virtual_size(img: &Path, fmt: &str) -> u64 {
    let out = run_ok("qemu-img", &["info", "-f", fmt, "--output=json", s(img)]);
    let key = "\"virtual-size\":";
    // The image's own entry comes last (after its children).
    let at = out.rfind(key).expect("virtual-size in qemu-img info");
    out[at + key.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn qemu_made_vpc_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = pattern(13 << 20, 1);
    std::fs::write(&raw, &data).unwrap();
    for sub in ["dynamic", "fixed"] {
        let img = dir.path().join(format!("q-{sub}.vhd"));
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                &format!("subformat={sub}"),
                s(&raw),
                s(&img),
            ],
        );
        let d = open_vpc(&img, true);
        assert_eq!(d.virtual_size(), qemu_virtual_size(&img, "vpc"), "{sub}");
        let ours = read_all(&d);
        let theirs = qemu_to_raw(&img, "vpc", dir.path());
        assert_eq!(ours.len(), theirs.len(), "{sub}");
        assert!(
            ours == theirs,
            "{sub}: content differs from qemu-img convert"
        );
        assert_eq!(&ours[..data.len()], &data[..], "{sub}");
    }
    // force_size images ("qem2" creator) use current_size, not the geometry.
    let img = dir.path().join("q-force.vhd");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            s(&img),
            "10M",
        ],
    );
    run_ok(
        "qemu-io",
        &["-f", "vpc", "-c", "write -P 0x5a 1M 300k", s(&img)],
    );
    let d = open_vpc(&img, true);
    assert_eq!(d.virtual_size(), 10 << 20);
    assert_eq!(d.virtual_size(), qemu_virtual_size(&img, "vpc"));
    assert!(read_all(&d) == qemu_to_raw(&img, "vpc", dir.path()));
}

#[test]
fn qemu_made_vhdx_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = pattern(21 << 20, 2);
    std::fs::write(&raw, &data).unwrap();
    for (sub, bs) in [
        ("dynamic", "0"),
        ("dynamic", "1M"),
        ("dynamic", "32M"),
        ("fixed", "0"),
        ("fixed", "2M"),
    ] {
        let img = dir.path().join(format!("q-{sub}-{bs}.vhdx"));
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vhdx",
                "-o",
                &format!("subformat={sub},block_size={bs}"),
                s(&raw),
                s(&img),
            ],
        );
        let d = open_vhdx(&img, true);
        assert_eq!(d.virtual_size(), qemu_virtual_size(&img, "vhdx"));
        let ours = read_all(&d);
        assert!(ours == data, "{sub}/{bs}: content differs from the source");
        assert!(
            ours == qemu_to_raw(&img, "vhdx", dir.path()),
            "{sub}/{bs}: content differs from qemu-img convert"
        );
    }
    // Partial writes by qemu-io into a sparse image (blocks in the ZERO state).
    let img = dir.path().join("q-io.vhdx");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            s(&img),
            "12M",
        ],
    );
    run_ok(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "write -P 0x11 0 4k",
            "-c",
            "write -P 0x22 1536k 700k",
            "-c",
            "write -P 0x33 11M 1M",
            s(&img),
        ],
    );
    let d = open_vhdx(&img, true);
    let ours = read_all(&d);
    assert!(ours == qemu_to_raw(&img, "vhdx", dir.path()));
    assert_eq!(ours[100], 0x11);
    assert_eq!(ours[(1536 << 10) + 5], 0x22);
    assert_eq!(ours[(11 << 20) + 5], 0x33);
    assert!(ours[8192..1 << 20].iter().all(|&b| b == 0));
}

/// Writes a mix of aligned, unaligned and block-crossing requests, a discard and a
/// write-zeroes, keeping `model` in step.
fn exercise(d: &dyn BlockBackend, model: &mut [u8], seed: u64) {
    let size = d.virtual_size();
    let writes = [
        (0u64, 4096usize),
        (5 * 512 + 3, 70_000),
        ((1 << 20) - 1000, 5000),
        (3 << 20, 2 << 20),
        (size - 777, 777),
        ((7 << 20) + 123, 1),
    ];
    for (i, (off, len)) in writes.iter().enumerate() {
        let p = pattern(*len, seed + i as u64 + 10)
            .iter()
            .map(|b| b | 1)
            .collect::<Vec<_>>();
        write_at(d, *off, &p).unwrap();
        model[*off as usize..*off as usize + len].copy_from_slice(&p);
    }
    d.discard((3 << 20) + 4096, 300_000).unwrap();
    model[(3 << 20) + 4096..(3 << 20) + 4096 + 300_000].fill(0);
    d.write_zeroes(10, 100, false).unwrap();
    model[10..110].fill(0);
    d.flush().unwrap();
}

fn compare_with_qemu(img: &Path, fmt: &str, expected: &[u8], dir: &Path) {
    let exp = dir.join(format!(
        "{}.expected.raw",
        img.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::write(&exp, expected).unwrap();
    let out = run_ok(
        "qemu-img",
        &["compare", "-f", fmt, "-F", "raw", s(img), s(&exp)],
    );
    assert!(out.contains("identical"), "{out}");
    assert!(qemu_to_raw(img, fmt, dir) == expected);
}

#[test]
fn our_vpc_images_match_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (sub, force, block_size) in [
        (VpcSubformat::Dynamic, false, 2 << 20),
        (VpcSubformat::Fixed, false, 2 << 20),
        (VpcSubformat::Dynamic, true, 2 << 20),
        (VpcSubformat::Dynamic, false, 64 << 10),
        (VpcSubformat::Dynamic, true, 4096),
    ] {
        let img = dir
            .path()
            .join(format!("ours-{sub:?}-{force}-{block_size}.vhd"));
        let opts = VpcCreateOptions {
            subformat: sub,
            force_size: force,
            block_size,
        };
        VpcBackend::create(&img, 9 << 20, &opts).unwrap();
        let d = open_vpc(&img, false);
        assert_eq!(d.virtual_size(), qemu_virtual_size(&img, "vpc"));
        if force {
            assert_eq!(d.virtual_size(), 9 << 20);
        }
        let mut model = vec![0u8; d.virtual_size() as usize];
        exercise(&d, &mut model, 3);
        assert!(read_all(&d) == model);
        drop(d);
        compare_with_qemu(&img, "vpc", &model, dir.path());
        // And the image stays usable for qemu-io writes that we then read.
        run_ok(
            "qemu-io",
            &["-f", "vpc", "-c", "write -P 0x77 2M 64k", s(&img)],
        );
        model[2 << 20..(2 << 20) + (64 << 10)].fill(0x77);
        let d = open_vpc(&img, true);
        assert!(read_all(&d) == model);
    }
}

#[test]
fn our_vhdx_images_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for (sub, bs, lss) in [
        (VhdxSubformat::Dynamic, 0u32, 512u32),
        (VhdxSubformat::Dynamic, 1 << 20, 512),
        (VhdxSubformat::Fixed, 1 << 20, 512),
        (VhdxSubformat::Fixed, 0, 512),
    ] {
        let img = dir.path().join(format!("ours-{sub:?}-{bs}-{lss}.vhdx"));
        let opts = VhdxCreateOptions {
            subformat: sub,
            block_size: bs,
            logical_sector_size: lss,
            ..Default::default()
        };
        VhdxBackend::create(&img, 9 << 20, &opts).unwrap();
        run_ok("qemu-img", &["check", "-f", "vhdx", s(&img)]);
        let d = open_vhdx(&img, false);
        assert_eq!(d.virtual_size(), 9 << 20);
        let mut model = vec![0u8; d.virtual_size() as usize];
        exercise(&d, &mut model, 4);
        assert!(read_all(&d) == model);
        drop(d);
        run_ok("qemu-img", &["check", "-f", "vhdx", s(&img)]);
        compare_with_qemu(&img, "vhdx", &model, dir.path());
        run_ok(
            "qemu-io",
            &["-f", "vhdx", "-c", "write -P 0x77 6M 64k", s(&img)],
        );
        model[6 << 20..(6 << 20) + (64 << 10)].fill(0x77);
        let d = open_vhdx(&img, true);
        assert!(read_all(&d) == model);
    }
}

// ---------------------------------------------------------------------------------------
// Log replay. The log entry is assembled here byte by byte from the specification
// (MS-VHDX 2.3), independently of the crate's own log code.

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn crc_with_zero_field(b: &[u8]) -> u32 {
    let mut v = b.to_vec();
    v[4..8].fill(0);
    crc32c(&v)
}

enum Desc {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

fn log_entry(
    seq: u64,
    tail: u32,
    guid: &[u8; 16],
    last_file_offset: u64,
    descs: &[Desc],
) -> Vec<u8> {
    let n = descs.len();
    let desc_sectors = (64 + 32 * n).div_ceil(4096);
    let data_sectors = descs.iter().filter(|d| matches!(d, Desc::Data(..))).count();
    let len = (desc_sectors + data_sectors) * 4096;
    let mut e = vec![0u8; len];
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    e[12..16].copy_from_slice(&tail.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(n as u32).to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&0u64.to_le_bytes()); // flushed file offset
    e[56..64].copy_from_slice(&last_file_offset.to_le_bytes());
    let mut ds = desc_sectors * 4096;
    for (i, d) in descs.iter().enumerate() {
        let at = 64 + 32 * i;
        match d {
            Desc::Zero(off, zlen) => {
                e[at..at + 4].copy_from_slice(b"zero");
                e[at + 8..at + 16].copy_from_slice(&zlen.to_le_bytes());
                e[at + 16..at + 24].copy_from_slice(&off.to_le_bytes());
            }
            Desc::Data(off, sector) => {
                assert_eq!(sector.len(), 4096);
                e[at..at + 4].copy_from_slice(b"desc");
                e[at + 4..at + 8].copy_from_slice(&sector[4092..]);
                e[at + 8..at + 16].copy_from_slice(&sector[..8]);
                e[at + 16..at + 24].copy_from_slice(&off.to_le_bytes());
                e[ds..ds + 4].copy_from_slice(b"data");
                e[ds + 4..ds + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                e[ds + 8..ds + 4092].copy_from_slice(&sector[8..4092]);
                e[ds + 4092..ds + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
                ds += 4096;
            }
        }
        e[at + 24..at + 32].copy_from_slice(&seq.to_le_bytes());
    }
    let c = crc_with_zero_field(&e);
    e[4..8].copy_from_slice(&c.to_le_bytes());
    e
}

/// Builds `img` (dynamic, 1 MiB blocks, 8 MiB) with block 2 written normally and a pending
/// log that (1) allocates block 5 at the end of the file by writing its BAT sector,
/// zeroing the new block and writing a data sector into it, (2) zeroes 8 KiB of block 2. Returns the expected disk content.
fn build_log_pending_image(img: &Path) -> Vec<u8> {
    let opts = VhdxCreateOptions {
        block_size: 1 << 20,
        ..Default::default()
    };
    VhdxBackend::create(img, 8 << 20, &opts).unwrap();
    let mut expected = vec![0u8; 8 << 20];
    {
        let d = open_vhdx(img, false);
        let p = pattern(1 << 20, 9)
            .iter()
            .map(|b| b | 0x80)
            .collect::<Vec<_>>();
        write_at(&d, 2 << 20, &p).unwrap();
        expected[2 << 20..3 << 20].copy_from_slice(&p);
        d.flush().unwrap();
    }
    let mut f = std::fs::read(img).unwrap();
    // Current header (larger sequence number among the two valid ones).
    let h1 = &f[64 << 10..(64 << 10) + 4096];
    let h2 = &f[128 << 10..(128 << 10) + 4096];
    let (cur, other_off) = if le64(h2, 8) > le64(h1, 8) {
        (h2.to_vec(), 64 << 10)
    } else {
        (h1.to_vec(), 128 << 10)
    };
    let log_len = le32(&cur, 68) as u64;
    let log_off = le64(&cur, 72);
    // The BAT region from the region table.
    let rt = &f[192 << 10..(192 << 10) + (64 << 10)];
    let mut bat_off = 0;
    for i in 0..le32(rt, 8) as usize {
        let at = 16 + 32 * i;
        if rt[at..at + 16]
            == [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08,
            ]
        {
            bat_off = le64(rt, at + 16);
        }
    }
    assert_ne!(bat_off, 0);
    let block2 = le64(&f, bat_off as usize + 2 * 8) >> 20 << 20;
    assert_eq!(le64(&f, bat_off as usize + 2 * 8) & 7, 6, "block 2 present");
    // New block 5 at the 1 MiB-aligned end of the file.
    let new_block = (f.len() as u64).next_multiple_of(1 << 20);
    let mut bat_sector = f[bat_off as usize..bat_off as usize + 4096].to_vec();
    let e5 = (new_block >> 20) << 20 | 6;
    bat_sector[5 * 8..6 * 8].copy_from_slice(&e5.to_le_bytes());
    let mut data = vec![0u8; 4096];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8 | 1;
    }
    let guid: [u8; 16] = *b"pending-log-guid";
    let entry = log_entry(
        77,
        0,
        &guid,
        new_block + (1 << 20),
        &[
            Desc::Data(bat_off, bat_sector),
            // The new block is zeroed first (this also extends the file), then written.
            Desc::Zero(new_block, 1 << 20),
            Desc::Data(new_block + 12288, data.clone()),
            Desc::Zero(block2 + 4096, 8192),
        ],
    );
    f[log_off as usize..log_off as usize + entry.len()].copy_from_slice(&entry);
    assert!(entry.len() as u64 <= log_len);
    // A newer header naming the log.
    let mut h = cur.clone();
    let seq = le64(&cur, 8) + 1;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[48..64].copy_from_slice(&guid);
    let c = crc_with_zero_field(&h);
    h[4..8].copy_from_slice(&c.to_le_bytes());
    f[other_off..other_off + 4096].copy_from_slice(&h);
    std::fs::write(img, &f).unwrap();
    expected[(5 << 20) + 12288..(5 << 20) + 16384].copy_from_slice(&data);
    expected[(2 << 20) + 4096..(2 << 20) + 12288].fill(0);
    expected
}

#[test]
fn vhdx_log_replay_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("log.vhdx");
    let expected = build_log_pending_image(&img);
    let pristine = std::fs::read(&img).unwrap();

    // qemu refuses to read it without replaying (read-only open).
    let out = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            s(&img),
            s(&dir.path().join("x.raw")),
        ],
    );
    assert!(
        !out.status.success(),
        "qemu should refuse the log-pending image read-only"
    );

    // Read-only: replayed in memory, file untouched.
    {
        let d = open_vhdx(&img, true);
        assert!(d.info().log_replayed);
        assert!(read_all(&d) == expected);
        assert!(matches!(write_at(&d, 0, b"x"), Err(BlockError::ReadOnly)));
    }
    assert!(
        std::fs::read(&img).unwrap() == pristine,
        "read-only open modified the file"
    );

    // qemu replays a copy.
    let qcopy = dir.path().join("log-qemu.vhdx");
    std::fs::copy(&img, &qcopy).unwrap();
    run_ok("qemu-img", &["check", "-r", "all", "-f", "vhdx", s(&qcopy)]);
    let by_qemu = qemu_to_raw(&qcopy, "vhdx", dir.path());
    assert!(
        by_qemu == expected,
        "qemu's replay differs from the expected content"
    );

    // Read-write: replayed on disk, log GUID cleared.
    {
        let d = open_vhdx(&img, false);
        assert!(d.info().log_replayed);
        assert!(d.header().log_guid.is_zero());
        assert!(read_all(&d) == expected);
    }
    let d = open_vhdx(&img, true);
    assert!(!d.info().log_replayed);
    assert!(read_all(&d) == expected);
    drop(d);
    run_ok("qemu-img", &["check", "-f", "vhdx", s(&img)]);
    assert!(qemu_to_raw(&img, "vhdx", dir.path()) == expected);
}

#[test]
fn vhdx_log_with_bad_checksum_is_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("badlog.vhdx");
    build_log_pending_image(&img);
    let mut f = std::fs::read(&img).unwrap();
    // Corrupt one byte of the entry's data sector: the checksum no longer matches, so the
    // log holds no valid sequence and nothing is replayed (as qemu does).
    f[(1 << 20) + 4096 + 100] ^= 0xff;
    std::fs::write(&img, &f).unwrap();
    let d = open_vhdx(&img, true);
    assert!(!d.info().log_replayed);
    let all = read_all(&d);
    assert!(all[5 << 20..6 << 20].iter().all(|&b| b == 0));
    assert!(std::fs::read(&img).unwrap() == f);
}

#[test]
fn open_image_probes_vpc_and_vhdx() {
    use vmkit_block::{open_image, OpenOptions};
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("f.vhd");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            s(&fixed),
            "4M",
        ],
    );
    let dynamic = dir.path().join("d.vhd");
    VpcBackend::create(&dynamic, 4 << 20, &VpcCreateOptions::default()).unwrap();
    let vhdx = dir.path().join("x.vhdx");
    VhdxBackend::create(&vhdx, 4 << 20, &VhdxCreateOptions::default()).unwrap();
    for (p, fmt) in [(&fixed, "vpc"), (&dynamic, "vpc"), (&vhdx, "vhdx")] {
        let d = open_image(p, OpenOptions::read_only()).unwrap();
        assert_eq!(d.format(), fmt, "{}", p.display());
        assert!(d.virtual_size() >= 4 << 20);
        let d = open_image(p, OpenOptions::new()).unwrap();
        write_at(&*d, 4096, b"probe").unwrap();
        let mut b = [0u8; 5];
        read_at(&*d, 4096, &mut b).unwrap();
        assert_eq!(&b, b"probe");
    }
}
