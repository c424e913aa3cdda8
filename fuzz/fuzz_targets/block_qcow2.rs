// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Arbitrary bytes as a qcow2 image: the header parser, then the image opened read-only
//! (reads, allocation status, check) and read-write (writes, write-zeroes, discard, flush,
//! repair). Nothing may panic, whatever the bytes.

#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use vmkit_block::qcow2::header::Header;
use vmkit_block::qcow2::Qcow2Backend;
use vmkit_block::{read_at, write_at, BlockBackend, OpenOptions};

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmkit-fuzz-qcow2-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("image.qcow2")
}

fn exercise(img: &Qcow2Backend, write: bool) {
    let size = img.virtual_size();
    let mut buf = vec![0u8; 8192];
    for off in [0, size / 3, size / 2, size.saturating_sub(8192)] {
        let n = (size - off.min(size)).min(8192) as usize;
        let _ = read_at(img, off, &mut buf[..n]);
        let _ = img.block_status(off, 1 << 20);
    }
    if write {
        let _ = write_at(img, 0, &[0xa5; 3000]);
        let big = vec![0x5a; 70_000.min(size as usize / 2)];
        let _ = write_at(img, size / 2, &big);
        let _ = img.write_zeroes(size / 4, 100_000.min(size / 4), false);
        let _ = img.discard(0, 65536.min(size));
        let _ = img.flush();
        let _ = img.repair();
    }
    let _ = img.check();
}

fuzz_target!(|data: &[u8]| {
    let _ = Header::parse(data, Path::new("fuzz"), data.len() as u64);
    let path = scratch();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    // Backing files named by the input are never opened.
    let ro = OpenOptions {
        no_backing: true,
        ..OpenOptions::read_only()
    };
    if let Ok(img) = Qcow2Backend::open(&path, &ro) {
        exercise(&img, false);
    }
    let rw = OpenOptions {
        no_backing: true,
        ..OpenOptions::new()
    };
    if let Ok(img) = Qcow2Backend::open(&path, &rw) {
        exercise(&img, true);
    }
    if let Ok(img) = Qcow2Backend::open_for_repair(&path) {
        let _ = img.repair();
    }
    let _ = std::fs::remove_file(&path);
});
