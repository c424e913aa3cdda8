// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Interoperability with QEMU's qemu-img / qemu-io (package qemu-utils).
//!
//! - Images that qemu-img creates and qemu-io writes (v2/v3, cluster sizes 512 B .. 2 MiB,
//!   extended L2, refcount widths, zlib and zstd compression, backing chains) read
//!   byte-identical to `qemu-img convert -O raw`.
//! - Images that we create and write pass `qemu-img check` and `qemu-img compare`
//!   against the expected raw content.
//!
//! These tests fail (they do not skip) when qemu-img is missing: install qemu-utils.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use vmkit_block::qcow2::{self, CreateOptions, Qcow2Backend};
use vmkit_block::{open_image, read_at, write_at, BlockBackend, OpenOptions};

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install qemu-utils (apt-get install qemu-utils) to run the qemu interop tests");
}

fn run(name: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    out
}

fn run_ok(name: &str, args: &[&str]) {
    let out = run(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = img.to_str().unwrap();
    args.push(p);
    run_ok("qemu-io", &args);
}

/// Deterministic test content: pseudo-random bytes with zero stretches.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, chunk) in v.chunks_mut(4096).enumerate() {
        if i % 5 == 3 {
            continue; // zero block
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Compressible but not trivially so.
            *b = (x % 17) as u8;
        }
    }
    v
}

fn read_all(b: &dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; b.virtual_size() as usize];
    // Odd-sized reads crossing cluster boundaries.
    let mut pos = 0usize;
    let mut step = 77_777usize;
    while pos < v.len() {
        let n = step.min(v.len() - pos);
        read_at(b, pos as u64, &mut v[pos..pos + n]).unwrap();
        pos += n;
        step = step * 3 % 300_007 + 1;
    }
    v
}

fn qemu_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.qemu-raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at byte {i} (0x{i:x}): ours {:#x}, expected {:#x}",
            a[i], b[i]
        );
    }
}

fn open_ro(p: &Path) -> Arc<dyn BlockBackend> {
    open_image(p, OpenOptions::read_only()).unwrap()
}

fn open_rw(p: &Path) -> Arc<dyn BlockBackend> {
    open_image(p, OpenOptions::new()).unwrap()
}

fn qemu_check(img: &Path) {
    let out = run("qemu-img", &["check", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check {} failed:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_compare(img: &Path, raw: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {} failed:\n{}{}",
        img.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const SIZE: usize = 6 << 20;

/// qemu-img convert from a raw pattern with the given -o options; our read equals the
/// raw source and qemu's own conversion back to raw.
fn convert_and_compare(opts: &str, compress: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = pattern(SIZE, seed);
    std::fs::write(&raw, &data).unwrap();
    let img = dir.path().join("img.qcow2");
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
    if compress {
        args.push("-c");
    }
    args.push(raw.to_str().unwrap());
    args.push(img.to_str().unwrap());
    run_ok("qemu-img", &args);
    let b = open_ro(&img);
    assert_eq!(b.format(), "qcow2");
    let ours = read_all(&*b);
    assert_same(&ours, &data, opts);
    assert_same(&ours, &qemu_raw(&img, dir.path()), opts);
}

#[test]
fn reads_qemu_v2_images() {
    convert_and_compare("compat=0.10", false, 1);
    convert_and_compare("compat=0.10,cluster_size=4096", false, 2);
}

#[test]
fn reads_qemu_v3_cluster_sizes() {
    for cs in ["512", "65536", "2M"] {
        convert_and_compare(&format!("compat=1.1,cluster_size={cs}"), false, 3);
    }
}

#[test]
fn reads_qemu_extended_l2_and_refcount_widths() {
    convert_and_compare("extended_l2=on", false, 4);
    convert_and_compare("extended_l2=on,cluster_size=2M", false, 5);
    convert_and_compare("refcount_bits=1", false, 6);
    convert_and_compare("refcount_bits=64,cluster_size=4096", false, 7);
}

#[test]
fn reads_qemu_compressed_zlib_and_zstd() {
    convert_and_compare("compat=1.1", true, 8);
    convert_and_compare("compat=0.10", true, 9);
    convert_and_compare("compression_type=zstd", true, 10);
    convert_and_compare("compression_type=zstd,cluster_size=2M", true, 11);
    convert_and_compare("compression_type=zlib,cluster_size=512", true, 12);
}

/// Builds base (raw) <- mid (qcow2 `mid_opts`) <- top (qcow2 `top_opts`), writes
/// through qemu-io at each level and checks our read of top.
fn chain_case(mid_opts: &str, top_opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(SIZE, 20)).unwrap();
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            mid_opts,
            "-b",
            "base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
        ],
    );
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0xab 0 1M",
            "write -P 0x11 1500000 3000",
            "write -z 2M 100k",
            "discard 3M 64k",
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            top_opts,
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0xcd 512k 4097",
            "write -P 0x22 4M 1M",
            "write -z 5M 70000",
        ],
    );
    let b = open_ro(&top);
    assert_eq!(b.backing_chain().len(), 2);
    let ours = read_all(&*b);
    assert_same(
        &ours,
        &qemu_raw(&top, dir.path()),
        &format!("{mid_opts} / {top_opts}"),
    );
}

#[test]
fn reads_qemu_backing_chains() {
    chain_case("compat=1.1", "compat=1.1");
    chain_case("compat=0.10", "compat=1.1,cluster_size=4096");
    chain_case("extended_l2=on", "extended_l2=on,cluster_size=32k");
    chain_case("cluster_size=512", "cluster_size=2M");
}

#[test]
fn reads_qemu_io_written_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", img.to_str().unwrap(), "8M"],
    );
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0xab 0 1M",
            "write -P 0x5a 3333333 12345",
            "write -z 512k 64k",
        ],
    );
    let b = open_ro(&img);
    let ours = read_all(&*b);
    assert!(ours[..512 * 1024].iter().all(|&x| x == 0xab));
    assert!(ours[512 * 1024..576 * 1024].iter().all(|&x| x == 0));
    assert_same(&ours, &qemu_raw(&img, dir.path()), "qemu-io image");
    // Allocation status: the zeroed range is reported as zero.
    let st = b.block_status(512 * 1024, 64 * 1024).unwrap();
    assert!(st.zero);
    let st = b.block_status(0, 4096).unwrap();
    assert!(st.allocated && !st.zero);
    let st = b.block_status(7 << 20, 4096).unwrap();
    assert!(!st.allocated && st.zero);
}

/// A sequence of writes, zeroes and discards applied to both our image and a model.
fn exercise(b: &dyn BlockBackend, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..60 {
        let off = next() % size;
        let len = (next() % 300_000).min(size - off).max(1);
        match i % 6 {
            0..=2 => {
                let v = (next() % 255 + 1) as u8;
                let mut data = vec![v; len as usize];
                data[0] = v.wrapping_add(1);
                write_at(b, off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            3 => {
                b.write_zeroes(off, len, false).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            4 => {
                b.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                b.write_zeroes(off, len, true).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
        }
    }
    b.flush().unwrap();
}

fn our_write_case(opts: CreateOptions, with_base: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 5 << 20;
    let mut model = vec![0u8; size];
    let mut opts = opts;
    if with_base {
        let base = dir.path().join("base.qcow2");
        run_ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                base.to_str().unwrap(),
                &size.to_string(),
            ],
        );
        qemu_io(
            &base,
            "qcow2",
            &["write -P 0x77 0 3M", "write -P 0x78 4000000 100000"],
        );
        model = qemu_raw(&base, dir.path());
        opts.backing_file = Some("base.qcow2".into());
        opts.backing_format = Some("qcow2".into());
        opts.size = None;
    } else {
        opts.size = Some(size as u64);
    }
    let img = dir.path().join("ours.qcow2");
    qcow2::create(&img, &opts).unwrap();
    qemu_check(&img);
    {
        let b = open_rw(&img);
        exercise(&*b, &mut model, seed);
        let ours = read_all(&*b);
        assert_same(&ours, &model, "our read after our writes");
    }
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, &model).unwrap();
    qemu_check(&img);
    qemu_compare(&img, &expected);
    // Our own check agrees.
    let q = Qcow2Backend::open(&img, &OpenOptions::read_only()).unwrap();
    let rep = q.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}

#[test]
fn our_images_pass_qemu_check_and_compare() {
    our_write_case(CreateOptions::default(), false, 1);
    our_write_case(
        CreateOptions {
            version: 2,
            ..Default::default()
        },
        false,
        2,
    );
    our_write_case(
        CreateOptions {
            cluster_size: 512,
            ..Default::default()
        },
        false,
        3,
    );
    our_write_case(
        CreateOptions {
            cluster_size: 2 << 20,
            ..Default::default()
        },
        false,
        4,
    );
    our_write_case(
        CreateOptions {
            extended_l2: true,
            ..Default::default()
        },
        false,
        5,
    );
    our_write_case(
        CreateOptions {
            refcount_bits: 1,
            cluster_size: 4096,
            ..Default::default()
        },
        false,
        6,
    );
}

#[test]
fn our_backed_images_pass_qemu_check_and_compare() {
    our_write_case(CreateOptions::default(), true, 11);
    our_write_case(
        CreateOptions {
            version: 2,
            cluster_size: 4096,
            ..Default::default()
        },
        true,
        12,
    );
    our_write_case(
        CreateOptions {
            extended_l2: true,
            cluster_size: 32768,
            ..Default::default()
        },
        true,
        13,
    );
}

/// Writing into images qemu made: compressed clusters get copied on write, extended L2
/// subclusters get allocated one by one.
#[test]
fn writes_into_qemu_images() {
    for (opts, compress) in [
        ("compat=1.1", true),
        ("compression_type=zstd", true),
        ("extended_l2=on", false),
        ("compat=0.10,cluster_size=1024", false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        let data = pattern(SIZE, 30);
        std::fs::write(&raw, &data).unwrap();
        let img = dir.path().join("img.qcow2");
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
        if compress {
            args.push("-c");
        }
        args.push(raw.to_str().unwrap());
        args.push(img.to_str().unwrap());
        run_ok("qemu-img", &args);
        let mut model = data.clone();
        {
            let b = open_rw(&img);
            exercise(&*b, &mut model, 99);
            assert_same(&read_all(&*b), &model, opts);
        }
        let expected = dir.path().join("expected.raw");
        std::fs::write(&expected, &model).unwrap();
        qemu_check(&img);
        qemu_compare(&img, &expected);
    }
}

#[test]
fn qemu_reads_what_we_create_with_backing_chain_info() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(1 << 20, 40)).unwrap();
    let img = dir.path().join("top.qcow2");
    qcow2::create(
        &img,
        &CreateOptions {
            backing_file: Some("base.raw".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let out = run(
        "qemu-img",
        &["info", "--output", "json", img.to_str().unwrap()],
    );
    assert!(out.status.success());
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(
        info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
    assert!(info.contains("\"virtual-size\": 1048576"), "{info}");
}

#[test]
fn reads_external_data_file_images_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    // qemu-img resolves a relative data_file name against its working directory.
    let data = dir.path().join("img.data");
    let opt = format!("data_file={}", data.display());
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &opt,
            img.to_str().unwrap(),
            "4M",
        ],
    );
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x42 64k 100k", "write -P 0x43 3M 5000"],
    );
    let b = open_ro(&img);
    assert_same(&read_all(&*b), &qemu_raw(&img, dir.path()), "data_file");
    let e = open_image(&img, OpenOptions::new())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("external data file") && e.contains("img.qcow2"),
        "{e}"
    );
}

#[test]
fn internal_snapshots_read_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", img.to_str().unwrap(), "4M"],
    );
    qemu_io(&img, "qcow2", &["write -P 0x42 0 300k"]);
    run_ok(
        "qemu-img",
        &["snapshot", "-c", "one", img.to_str().unwrap()],
    );
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0x43 64k 100k", "write -P 0x44 2M 64k"],
    );
    run_ok(
        "qemu-img",
        &["snapshot", "-c", "two", img.to_str().unwrap()],
    );
    qemu_io(&img, "qcow2", &["write -P 0x45 0 10k"]);
    let b = open_ro(&img);
    assert_same(&read_all(&*b), &qemu_raw(&img, dir.path()), "snapshots");
    let q = Qcow2Backend::open(&img, &OpenOptions::read_only()).unwrap();
    let rep = q.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    let e = open_image(&img, OpenOptions::new())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("snapshots"), "{e}");
}

#[test]
fn repair_clears_the_corrupt_bit_and_qemu_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", img.to_str().unwrap(), "4M"],
    );
    qemu_io(&img, "qcow2", &["write -P 0x42 0 300k"]);
    // Set the corrupt bit and leak a cluster past the data.
    let mut d = std::fs::read(&img).unwrap();
    d[79] |= 2;
    let rt = u64::from_be_bytes(d[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(d[rt..rt + 8].try_into().unwrap()) as usize;
    // The header cluster's refcount 1 -> 2: a leak for qemu and for us.
    d[rb + 1] = 2;
    std::fs::write(&img, &d).unwrap();
    let out = run("qemu-img", &["check", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "qemu sees the leak");
    assert!(open_image(&img, OpenOptions::new()).is_err());
    let q = Qcow2Backend::open_for_repair(&img).unwrap();
    assert_eq!(q.check().unwrap().leaks.len(), 1);
    let after = q.repair().unwrap();
    assert!(after.is_clean() && after.fixed >= 1, "{after:?}");
    drop(q);
    qemu_check(&img);
    let b = open_rw(&img);
    write_at(&*b, 0, &[1, 2, 3]).unwrap();
    drop(b);
    qemu_check(&img);
}
