// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Builds the freestanding guest program (`guest-src/`) into `$OUT_DIR/vmkit-guest.elf`.
//!
//! There is no `x86_64-unknown-none` target and no rust-src here, so the guest is compiled
//! for the host target as a `no_std`/`no_main` binary against the precompiled `core`, and
//! linked statically at 1 MiB by `guest-src/linker.ld` with no C runtime. The compiler is
//! `$RUSTC` (the one cargo uses), invoked directly: RUSTFLAGS meant for the host build
//! (coverage, sanitizers) must not leak into the guest.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest is always x86_64, whatever the host.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// No SSE in the guest's own code. This host's KVM runs guests through its instruction
/// emulator, which rejects most SSE instructions (`xorps`, `movd`, `pxor`, ...) that LLVM
/// likes to use for zeroing and copying. The guest has no floating point, so the ABI
/// difference rustc warns about does not matter.
const NO_SSE: &str = "target-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2";

/// The (future-incompatibility) warning rustc gives for [`NO_SSE`].
const SSE_ABI_WARNING: &str = "target feature `sse2` must be enabled";

fn watch(dir: &Path, files: &mut Vec<PathBuf>) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut entries: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => panic!("cannot read guest sources in {}: {e}", dir.display()),
    };
    entries.sort();
    for path in entries {
        if path.is_dir() {
            watch(&path, files);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
            files.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let src = manifest.join("guest-src");
    let mut files = Vec::new();
    watch(&src, &mut files);
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let elf = out_dir.join("vmkit-guest.elf");
    let linker_script = src.join("linker.ld");
    let build = |no_sse: bool| {
        let mut cmd = Command::new(&rustc);
        cmd.arg("--edition=2021")
            .args(["--crate-type", "bin", "--crate-name", "vmkit_guest"])
            .args(["--target", GUEST_TARGET])
            .args(["-C", "panic=abort"])
            .args(["-C", "opt-level=2"])
            .args(["-C", "relocation-model=static"])
            .args(["-C", "code-model=small"])
            .args(["-C", "target-feature=+crt-static"])
            .args(["-C", "no-redzone=yes"])
            .args(["-C", "debuginfo=0"])
            .args(["-C", "strip=debuginfo"])
            .args(["-C", "link-arg=-nostartfiles"])
            .args(["-C", "link-arg=-nostdlib"])
            .args(["-C", "link-arg=-static"])
            .args(["-C", "link-arg=-Wl,--build-id=none"])
            .arg("-C")
            .arg(format!("link-arg=-T{}", linker_script.display()))
            .arg("-o")
            .arg(&elf)
            .arg(src.join("main.rs"))
            // Keep the host build's wrappers and flags out of the guest build.
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS");
        if no_sse {
            cmd.args(["-C", NO_SSE]);
        }
        match cmd.output() {
            Ok(o) => o,
            Err(e) => panic!("cannot run {rustc:?} to build the guest: {e}"),
        }
    };
    let mut output = build(true);
    let mut stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() && stderr.contains(SSE_ABI_WARNING) {
        // A future rustc may refuse to drop SSE on this target. The guest still works on a
        // KVM that runs it natively; on an emulating KVM (like the development host's) it will
        // hit unsupported SSE instructions.
        println!(
            "cargo:warning=guest: this rustc refuses to build without SSE; building with SSE \
             (the guest may fail on KVMs that emulate guest instructions)"
        );
        output = build(false);
        stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    }
    if !output.status.success() {
        panic!(
            "building the vmkit guest ({} sources) failed ({}):\n{stderr}",
            files.len(),
            output.status
        );
    }
    // Forward real warnings; the SSE/ABI one is expected (see NO_SSE).
    let expected = stderr.contains(SSE_ABI_WARNING);
    for line in stderr.lines().filter(|l| l.starts_with("warning")) {
        let noise =
            line.contains(SSE_ABI_WARNING) || (expected && line == "warning: 1 warning emitted");
        if !noise {
            println!("cargo:warning=guest: {line}");
        }
    }
}
