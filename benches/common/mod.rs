// SPDX-License-Identifier: Apache-2.0 OR MIT
//! What the harnesses share: where the repository and the target directory are, building
//! the example VMM, fetching QEMU, and writing test images. Each harness uses a part.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The cargo target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target"))
}

/// Builds the example VMM in release mode and returns its path.
pub fn build_vmm() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--example", "vmm"])
        .current_dir(repo_root())
        .status()
        .expect("run cargo build for the vmm example");
    assert!(status.success(), "building the vmm example failed");
    target_dir().join("release").join("examples").join("vmm")
}

/// QEMU unpacked from Debian's packages by `scripts/fetch-qemu.sh`, unless
/// `VMKIT_BENCH_NO_QEMU=1` or it cannot be fetched (then the peer is skipped, loudly).
pub fn fetch_qemu(harness: &str) -> Option<PathBuf> {
    if std::env::var("VMKIT_BENCH_NO_QEMU").is_ok_and(|v| v == "1") {
        return None;
    }
    let out = Command::new(repo_root().join("scripts/fetch-qemu.sh"))
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("{harness} bench: QEMU unavailable (scripts/fetch-qemu.sh failed); peer skipped");
        return None;
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .trim()
        .to_owned();
    Some(PathBuf::from(path))
}

/// Writes `size` bytes of xorshift data (incompressible, never a zero 512-byte block) to
/// `path` and syncs them.
pub fn make_raw(path: &Path, size: u64) {
    let mut f = File::create(path).expect("create the raw image");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write the raw image");
        left -= n as u64;
    }
    f.sync_all().expect("sync the raw image");
}
