// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Block I/O harness: `vmkit-img` (our `vmkit-block` crate) against `qemu-img` on the same
//! images, in the same run, whole process to whole process.
//!
//! `cargo bench --bench block` (needs `qemu-img`; without it only vmkit is measured).
//! Environment:
//! - `VMKIT_BLOCKBENCH_RUNS` (default 5): runs per case; the figures are medians.
//! - `VMKIT_BLOCKBENCH_CONVERT_RUNS` (default twice the runs): runs per convert case, which
//!   are the noisiest (each writes 1 GiB of fresh page cache).
//! - `VMKIT_BLOCKBENCH_MIB` (default 1024): size of the test images in MiB.
//! - `VMKIT_BLOCKBENCH_DIR`: where the images go (kept, and reused when present); default a
//!   fresh temporary directory under `$TMPDIR` that is removed at the end. It must be on a
//!   file system with `O_DIRECT` (not tmpfs) for the `cache=none` cases.
//! - `VMKIT_BLOCKBENCH_JSON`: where the JSON report is written (default
//!   `<target dir>/block-bench.json`; it is printed to stdout as well).
//! - `VMKIT_BLOCKBENCH_ONLY`: run only the cases whose group or name contains this text
//!   (e.g. `convert`, `scatter read`).
//! - `VMKIT_IMG`: a prebuilt `vmkit-img` (default: `cargo build --release --example
//!   vmkit-img` first). `QEMU_IMG`: the qemu-img binary (default `qemu-img` on `PATH`).
//!
//! What runs:
//! 1. Images: a raw file of random (incompressible, never zero) data; qcow2 with 64 KiB
//!    clusters, dynamic VPC and dynamic VHDX converted from it by `qemu-img convert`. As the
//!    data has no zero block, every converted image is fully allocated (checked with
//!    `qemu-img map`), so reads go through the data path of each format.
//! 2. `bench` with identical options for both tools (`-f fmt -c N -d depth -s size [-S step]
//!    [-w --pattern 165] [-t cache]`). `qemu-img bench` has no random mode, so the "4k
//!    scatter" cases use a stride `-S` of an odd number of 4 KiB blocks close to 0.618 of the
//!    image: offsets `i*S mod size` visit every block of the image once, in an order
//!    that defeats read-ahead, identically for both tools. `vmkit-img --random` (uniform
//!    random offsets) is measured for vmkit alone and compared with raw.
//! 3. `convert -O qcow2` and `-O raw` of the raw and qcow2 images, both tools with their
//!    default target cache mode (`unsafe`: no final sync); the outputs are deleted and
//!    `sync(2)` called before every run, and each timed run follows an untimed warm-up run
//!    of the same tool (see below); the first run's outputs are checked with
//!    `qemu-img compare` (and `qemu-img check` for qcow2).
//! 4. The physical limit: `dd if=raw of=/dev/null bs=1M` with `iflag=direct` (`O_DIRECT`,
//!    the device itself) and without it (buffered, the file being hot in the page cache:
//!    the memory-copy limit a cache=writeback read through any format can approach).
//!
//! Runs interleave the tools (which goes first alternates) so noise on a shared machine
//! hits both alike. Every figure is spawn to exit of the whole process (`wait4`), median of
//! the runs; `cpu` is the median user+system time of the process. Ratios: `vmkit/qemu` is
//! a time ratio (below 1 = vmkit faster); `fmt/raw` is the format's time over raw's for the
//! same tool and workload.
//!
//! Convert noise: each convert writes 1 GiB of fresh page cache. On this host (a VM with
//! free page reporting) how fast the kernel gets that memory depends on what was freed just
//! before, so without the warm-up whichever tool ran second in a pair was up to 5x faster.
//! Both the median and the best run are reported.
//!
//! Caching: with the default `cache=writeback` every image is hot in the page cache, so
//! these cases measure each tool's own overhead (format mapping, request dispatch, memory
//! copies), not the disk. The `cache=none` cases measure the O_DIRECT path to the device.

mod common;

use common::make_raw;

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One timed process.
#[derive(Clone, Copy, Debug)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    /// The tool's own "Run completed in X seconds." figure (bench only).
    inner: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Vmkit,
    Qemu,
    /// `dd` reading the raw file (the host's limit).
    Dd,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Vmkit => "vmkit",
            Tool::Qemu => "qemu",
            Tool::Dd => "dd",
        }
    }
}

/// How a case's throughput is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Iops,
    MibS,
}

/// A benchmark case: the same argument list is given to every tool in `tools`.
struct Case {
    group: &'static str,
    name: String,
    format: &'static str,
    tools: Vec<Tool>,
    /// Arguments after the tool binary.
    args: Vec<String>,
    /// Requests (IOPS) or bytes (MiB/s) moved by one run.
    amount: u64,
    unit: Unit,
    /// Prepares the run (untimed): e.g. recreate an empty image, delete an output.
    prepare: Prepare,
    /// How many runs this case gets.
    runs: u64,
    samples: Vec<(Tool, Sample)>,
}

#[derive(Clone, Debug)]
enum Prepare {
    Nothing,
    /// `qemu-img create -f qcow2 FILE SIZE` (a fresh empty image for allocating writes).
    FreshQcow2(PathBuf),
    /// Delete this output file, and every other convert output (`out.*`) so each run
    /// starts from the same memory state, then `sync(2)`.
    RemoveAndSync(PathBuf),
}

struct Env {
    vmkit: PathBuf,
    qemu: Option<PathBuf>,
    dir: PathBuf,
    size: u64,
    log: PathBuf,
    runs: u64,
    convert_runs: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn repo_root() -> PathBuf {
    std::env::var_os("VMKIT_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn build_vmkit_img() -> PathBuf {
    if let Some(p) = std::env::var_os("VMKIT_IMG") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--example", "vmkit-img"])
        .current_dir(repo_root())
        .status()
        .expect("run cargo build for the vmkit-img example");
    assert!(status.success(), "building the vmkit-img example failed");
    target_dir()
        .join("release")
        .join("examples")
        .join("vmkit-img")
}

fn find_qemu_img() -> Option<PathBuf> {
    let bin = std::env::var_os("QEMU_IMG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-img"));
    let out = Command::new(&bin).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v = String::from_utf8_lossy(&out.stdout);
    println!(
        "peer: {}",
        v.lines().next().unwrap_or("qemu-img (unknown version)")
    );
    Some(bin)
}

/// Runs a command to completion, untimed; panics with its output if it fails.
fn run_checked(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Spawns `bin args`, waits with `wait4`, returns wall and CPU time. Output goes to the log
/// file, which is shown if the process fails.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which also gives its rusage
fn run_timed(env: &Env, bin: &Path, args: &[String]) -> Sample {
    let log = File::create(&env.log).expect("create the log file");
    let err = log.try_clone().expect("clone the log file handle");
    let t0 = Instant::now();
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child `pid`, with pointers to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = t0.elapsed();
    assert_eq!(r, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    let output = std::fs::read_to_string(&env.log).unwrap_or_default();
    let st = std::process::ExitStatus::from_raw(status);
    assert!(
        st.success(),
        "{} {} failed ({st}):\n{output}",
        bin.display(),
        args.join(" ")
    );
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    let inner = output.lines().find_map(|l| {
        l.strip_prefix("Run completed in ")
            .and_then(|r| r.strip_suffix(" seconds."))
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(Duration::from_secs_f64)
    });
    Sample {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        inner,
    }
}

fn sync_all() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Creates (or reuses) the test images; returns (format, path) for raw, qcow2, vpc, vhdx.
fn make_images(env: &Env) -> Vec<(&'static str, PathBuf)> {
    let raw = env.dir.join("raw.img");
    let fresh = std::fs::metadata(&raw).map(|m| m.len()).ok() != Some(env.size);
    if fresh {
        let t = Instant::now();
        make_raw(&raw, env.size);
        println!(
            "created {} ({} MiB of random data) in {:.2} s",
            raw.display(),
            env.size >> 20,
            t.elapsed().as_secs_f64()
        );
    }
    let mut images = vec![("raw", raw.clone())];
    let conv: [(&'static str, &str, &str); 3] = [
        ("qcow2", "img.qcow2", "cluster_size=65536"),
        ("vpc", "img.vpc", "subformat=dynamic,force_size=on"),
        ("vhdx", "img.vhdx", "subformat=dynamic"),
    ];
    for (fmt, name, opts) in conv {
        let p = env.dir.join(name);
        if fresh || !p.exists() {
            let _ = std::fs::remove_file(&p);
            // qemu-img creates the images when it is there, vmkit-img otherwise.
            let bin = env.qemu.clone().unwrap_or_else(|| env.vmkit.clone());
            run_checked(
                Command::new(&bin)
                    .args(["convert", "-q", "-f", "raw", "-O", fmt, "-o", opts])
                    .arg(&raw)
                    .arg(&p),
                &format!("convert raw -> {fmt}"),
            );
        }
        if let Some(q) = &env.qemu {
            let map = run_checked(
                Command::new(q)
                    .args(["map", "--output=json", "-f", fmt])
                    .arg(&p),
                &format!("qemu-img map {name}"),
            );
            let holes = map.matches("\"data\": false").count();
            println!(
                "{name}: {} ({})",
                if holes == 0 {
                    "fully allocated".to_string()
                } else {
                    format!("{holes} unallocated extents")
                },
                human_size(std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0))
            );
        }
        images.push((fmt, p));
    }
    sync_all();
    images
}

fn human_size(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn direct_io_works(path: &Path) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

fn build_cases(env: &Env, images: &[(&'static str, PathBuf)]) -> Vec<Case> {
    let both: Vec<Tool> = if env.qemu.is_some() {
        vec![Tool::Vmkit, Tool::Qemu]
    } else {
        vec![Tool::Vmkit]
    };
    let blocks = env.size / 4096;
    // An odd stride (in 4 KiB blocks) near 0.618 of the image: coprime with the power-of-two
    // block count, so `i*S mod size` is a permutation of all blocks.
    let stride = (((blocks as f64) * 0.618) as u64 | 1) * 4096;
    let stride = stride.to_string();
    let mut cases = Vec::new();
    let bench = |group: &'static str,
                 name: &str,
                 fmt: &'static str,
                 path: &Path,
                 tools: &[Tool],
                 opts: &[&str],
                 count: u64,
                 size: u64,
                 unit: Unit,
                 prepare: Prepare| {
        let mut args = strs(&["bench", "-f", fmt, "-c", &count.to_string()]);
        args.extend(strs(opts));
        args.push(path.to_string_lossy().into_owned());
        Case {
            group,
            name: name.to_string(),
            format: fmt,
            tools: tools.to_vec(),
            args,
            amount: if unit == Unit::Iops {
                count
            } else {
                count * size
            },
            unit,
            prepare,
            runs: env.runs,
            samples: Vec::new(),
        }
    };
    let scatter = ["-d", "32", "-s", "4096", "-S", stride.as_str()];
    for (fmt, path) in images {
        cases.push(bench(
            "bench",
            "4k scatter read QD32",
            fmt,
            path,
            &both,
            &scatter,
            100_000,
            4096,
            Unit::Iops,
            Prepare::Nothing,
        ));
    }
    for (fmt, path) in images {
        let mut o = scatter.to_vec();
        o.extend(["-w", "--pattern", "165"]);
        cases.push(bench(
            "bench",
            "4k scatter write QD32",
            fmt,
            path,
            &both,
            &o,
            30_000,
            4096,
            Unit::Iops,
            Prepare::Nothing,
        ));
    }
    let seq_count = (env.size >> 20).max(64);
    for (fmt, path) in images {
        cases.push(bench(
            "bench",
            "1M seq read QD8",
            fmt,
            path,
            &both,
            &["-d", "8", "-s", "1M"],
            seq_count * 2,
            1 << 20,
            Unit::MibS,
            Prepare::Nothing,
        ));
    }
    for (fmt, path) in images {
        cases.push(bench(
            "bench",
            "1M seq write QD8",
            fmt,
            path,
            &both,
            &["-d", "8", "-s", "1M", "-w", "--pattern", "165"],
            seq_count / 2,
            1 << 20,
            Unit::MibS,
            Prepare::Nothing,
        ));
    }
    // Allocating writes: a fresh empty qcow2 each run.
    let fresh = env.dir.join("fresh.qcow2");
    let mut o = scatter.to_vec();
    o.extend(["-w", "--pattern", "165"]);
    cases.push(bench(
        "bench",
        "4k scatter alloc-write QD32",
        "qcow2",
        &fresh,
        &both,
        &o,
        20_000,
        4096,
        Unit::Iops,
        Prepare::FreshQcow2(fresh.clone()),
    ));
    // O_DIRECT: the device path.
    if direct_io_works(&images[0].1) {
        for (fmt, path) in images.iter().filter(|(f, _)| *f == "raw" || *f == "qcow2") {
            let mut o = scatter.to_vec();
            o.extend(["-t", "none"]);
            cases.push(bench(
                "bench",
                "4k scatter read QD32 cache=none",
                fmt,
                path,
                &both,
                &o,
                30_000,
                4096,
                Unit::Iops,
                Prepare::Nothing,
            ));
        }
    } else {
        println!(
            "note: O_DIRECT is not available in {}: cache=none cases skipped",
            env.dir.display()
        );
    }
    // Uniform random offsets: vmkit only (qemu-img bench has no random mode).
    for (fmt, path) in images {
        cases.push(bench(
            "random",
            "4k random read QD32",
            fmt,
            path,
            &[Tool::Vmkit],
            &["-d", "32", "-s", "4096", "--random"],
            100_000,
            4096,
            Unit::Iops,
            Prepare::Nothing,
        ));
    }
    // Convert.
    for (src_fmt, src) in images.iter().filter(|(f, _)| *f == "raw" || *f == "qcow2") {
        for out_fmt in ["qcow2", "raw"] {
            let out = env.dir.join(format!("out.{out_fmt}"));
            let mut args = strs(&["convert", "-f", src_fmt, "-O", out_fmt]);
            if out_fmt == "qcow2" {
                args.extend(strs(&["-o", "cluster_size=65536"]));
            }
            args.push(src.to_string_lossy().into_owned());
            args.push(out.to_string_lossy().into_owned());
            cases.push(Case {
                group: "convert",
                name: format!("convert {src_fmt} -> {out_fmt}"),
                format: src_fmt,
                tools: both.clone(),
                args,
                amount: env.size,
                unit: Unit::MibS,
                prepare: Prepare::RemoveAndSync(out),
                runs: env.convert_runs,
                samples: Vec::new(),
            });
        }
    }
    cases
}

fn prepare(env: &Env, p: &Prepare) {
    match p {
        Prepare::Nothing => {}
        Prepare::FreshQcow2(path) => {
            let _ = std::fs::remove_file(path);
            let bin = env.qemu.clone().unwrap_or_else(|| env.vmkit.clone());
            run_checked(
                Command::new(bin)
                    .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
                    .arg(path)
                    .arg(env.size.to_string()),
                "create a fresh qcow2",
            );
            sync_all();
        }
        Prepare::RemoveAndSync(path) => {
            // Outputs of other convert cases would otherwise stay until their next run,
            // so whichever tool went first in a case would find less just-freed memory
            // for its page cache than the second (in a VM with free page reporting, that
            // alone can make a 1 GiB write several times slower).
            let _ = std::fs::remove_file(path);
            for f in ["out.qcow2", "out.raw"] {
                let _ = std::fs::remove_file(env.dir.join(f));
            }
            sync_all();
        }
    }
}

/// Checks a convert output against its source (first run only).
fn verify_convert(env: &Env, case: &Case, tool: Tool) {
    let Some(q) = &env.qemu else { return };
    let Prepare::RemoveAndSync(out) = &case.prepare else {
        return;
    };
    let n = case.args.len();
    let src = &case.args[n - 2];
    let out_fmt = if out.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    run_checked(
        Command::new(q)
            .args(["compare", "-f", case.format, "-F", out_fmt, src])
            .arg(out),
        &format!(
            "{}: compare the {} output with its source",
            case.name,
            tool.name()
        ),
    );
    if out_fmt == "qcow2" {
        run_checked(
            Command::new(q).args(["check", "-f", "qcow2"]).arg(out),
            &format!(
                "{}: qemu-img check of the {} output",
                case.name,
                tool.name()
            ),
        );
    }
}

/// The physical limit: dd of the raw file, O_DIRECT and buffered (hot page cache).
fn dd_cases(env: &Env, raw: &Path) -> Vec<Case> {
    let dd = |name: &str, direct: bool| {
        let mut args = vec![
            format!("if={}", raw.display()),
            "of=/dev/null".to_string(),
            "bs=1M".to_string(),
        ];
        if direct {
            args.push("iflag=direct".into());
        }
        Case {
            group: "host",
            name: name.to_string(),
            format: "raw",
            tools: vec![Tool::Dd],
            args,
            amount: env.size,
            unit: Unit::MibS,
            prepare: Prepare::Nothing,
            runs: env.runs,
            samples: Vec::new(),
        }
    };
    let mut v = vec![dd("dd bs=1M buffered (page cache)", false)];
    if direct_io_works(raw) {
        v.push(dd("dd bs=1M iflag=direct (device)", true));
    }
    v
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

struct Stat {
    wall: Duration,
    min: Duration,
    max: Duration,
    cpu: Duration,
    inner: Option<Duration>,
    walls: Vec<Duration>,
}

fn stat(case: &Case, tool: Tool) -> Option<Stat> {
    let s: Vec<Sample> = case
        .samples
        .iter()
        .filter(|(t, _)| *t == tool)
        .map(|(_, s)| *s)
        .collect();
    if s.is_empty() {
        return None;
    }
    let walls: Vec<Duration> = s.iter().map(|x| x.wall).collect();
    let inners: Vec<Duration> = s.iter().filter_map(|x| x.inner).collect();
    Some(Stat {
        wall: median(walls.clone()),
        min: walls.iter().copied().min().unwrap_or_default(),
        max: walls.iter().copied().max().unwrap_or_default(),
        cpu: median(s.iter().map(|x| x.cpu).collect()),
        inner: (!inners.is_empty()).then(|| median(inners)),
        walls,
    })
}

fn throughput(case: &Case, t: Duration) -> f64 {
    let s = t.as_secs_f64().max(1e-9);
    match case.unit {
        Unit::Iops => case.amount as f64 / s,
        Unit::MibS => case.amount as f64 / s / (1u64 << 20) as f64,
    }
}

fn unit_name(u: Unit) -> &'static str {
    match u {
        Unit::Iops => "IOPS",
        Unit::MibS => "MiB/s",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median wall time of `tool` on the raw case of the same workload.
fn raw_time(cases: &[Case], case: &Case, tool: Tool) -> Option<Duration> {
    if case.group == "convert" || case.group == "host" {
        return None;
    }
    let raw = cases
        .iter()
        .find(|c| c.name == case.name && c.format == "raw")?;
    stat(raw, tool).map(|s| s.wall)
}

fn report(cases: &[Case], env: &Env) {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nHost limit, reading the raw image with dd (median of {}):",
        env.runs
    );
    for c in cases.iter().filter(|c| c.group == "host") {
        if let Some(s) = stat(c, Tool::Dd) {
            let _ = writeln!(
                t,
                "  {:<40} {:>9.1} ms {:>9.0} MiB/s",
                c.name,
                ms(s.wall),
                throughput(c, s.wall)
            );
        }
    }
    let _ = writeln!(
        t,
        "\n{:<31} {:<6} {:>9} {:>9} {:>6} {:>6} {:>9} {:>9} {:>6} {:>6} {:>6}",
        "case (whole process)",
        "format",
        "vmkit ms",
        "qemu ms",
        "v/q",
        "best",
        "vmkit",
        "qemu",
        "unit",
        "v/raw",
        "q/raw"
    );
    let _ = writeln!(t, "{}", "-".repeat(113));
    let mut last_group = "";
    for c in cases.iter().filter(|c| c.group != "host") {
        if c.group != last_group && !last_group.is_empty() {
            let _ = writeln!(t);
        }
        last_group = c.group;
        let v = stat(c, Tool::Vmkit);
        let q = stat(c, Tool::Qemu);
        let f = |s: &Option<Stat>| {
            s.as_ref()
                .map_or("-".to_string(), |s| format!("{:.1}", ms(s.wall)))
        };
        let tp = |s: &Option<Stat>| {
            s.as_ref()
                .map_or("-".to_string(), |s| format!("{:.0}", throughput(c, s.wall)))
        };
        let (ratio, best) = match (&v, &q) {
            (Some(v), Some(q)) => (
                format!("{:.2}", v.wall.as_secs_f64() / q.wall.as_secs_f64()),
                format!("{:.2}", v.min.as_secs_f64() / q.min.as_secs_f64()),
            ),
            _ => ("-".into(), "-".into()),
        };
        let fr = |tool: Tool, s: &Option<Stat>| match (s, raw_time(cases, c, tool)) {
            (Some(s), Some(r)) if c.format != "raw" => {
                format!("{:.2}", s.wall.as_secs_f64() / r.as_secs_f64())
            }
            _ => "-".into(),
        };
        let _ = writeln!(
            t,
            "{:<31} {:<6} {:>9} {:>9} {:>6} {:>6} {:>9} {:>9} {:>6} {:>6} {:>6}",
            c.name,
            c.format,
            f(&v),
            f(&q),
            ratio,
            best,
            tp(&v),
            tp(&q),
            unit_name(c.unit),
            fr(Tool::Vmkit, &v),
            fr(Tool::Qemu, &q),
        );
    }
    println!("{t}");
    println!(
        "ms: median wall time, spawn to exit, over {} runs ({} for convert). v/q: vmkit/qemu time \
         ratio of the medians (< 1: vmkit faster); best: the same for the fastest run of each \
         (noise only adds time). vmkit, qemu: throughput at the median. v/raw, q/raw: that \
         format's median time over raw's, same tool and workload.",
        env.runs, env.convert_runs
    );

    // Goals.
    println!("\nGoals (whole process to whole process):");
    let verdict = |v: &Stat, q: &Stat| {
        let med = if v.wall <= q.wall { "MET" } else { "NOT MET" };
        let best = if v.min <= q.min { "met" } else { "not met" };
        format!(
            "vmkit {:.1} ms, qemu {:.1} ms (median) -> {med}; best run {:.1} vs {:.1} ms -> {best}",
            ms(v.wall),
            ms(q.wall),
            ms(v.min),
            ms(q.min)
        )
    };
    for c in cases.iter().filter(|c| {
        (c.group == "bench" && c.name == "4k scatter read QD32" && c.format == "qcow2")
            || c.group == "convert"
    }) {
        if let (Some(v), Some(q)) = (stat(c, Tool::Vmkit), stat(c, Tool::Qemu)) {
            let what = if c.group == "convert" {
                format!("{} vs qemu-img convert", c.name)
            } else {
                "qcow2 4 KiB reads QD32 vs qemu-img bench".to_string()
            };
            println!("  {what:<42} {}", verdict(&v, &q));
        }
    }

    // JSON.
    let mut j = String::from("{\n");
    let _ = writeln!(j, "  \"runs\": {},", env.runs);
    let _ = writeln!(j, "  \"convert_runs\": {},", env.convert_runs);
    let _ = writeln!(j, "  \"image_bytes\": {},", env.size);
    j.push_str("  \"cases\": [\n");
    for (i, c) in cases.iter().enumerate() {
        let _ = write!(
            j,
            "    {{\"group\": \"{}\", \"case\": \"{}\", \"format\": \"{}\", \"unit\": \"{}\", \"args\": \"{}\"",
            c.group,
            c.name.replace('"', "'"),
            c.format,
            unit_name(c.unit),
            c.args.join(" ").replace('\\', "/").replace('"', "'")
        );
        for tool in [Tool::Vmkit, Tool::Qemu, Tool::Dd] {
            let Some(s) = stat(c, tool) else { continue };
            let walls: Vec<String> = s.walls.iter().map(|w| format!("{:.3}", ms(*w))).collect();
            let _ = write!(
                j,
                ", \"{}\": {{\"median_ms\": {:.3}, \"min_ms\": {:.3}, \"max_ms\": {:.3}, \"cpu_ms\": {:.3}, \"inner_ms\": {}, \"throughput\": {:.1}, \"runs_ms\": [{}]}}",
                tool.name(),
                ms(s.wall),
                ms(s.min),
                ms(s.max),
                ms(s.cpu),
                s.inner.map_or("null".to_string(), |d| format!("{:.3}", ms(d))),
                throughput(c, s.wall),
                walls.join(", ")
            );
        }
        if let (Some(v), Some(q)) = (stat(c, Tool::Vmkit), stat(c, Tool::Qemu)) {
            let _ = write!(
                j,
                ", \"vmkit_over_qemu\": {:.4}",
                v.wall.as_secs_f64() / q.wall.as_secs_f64()
            );
        }
        for tool in [Tool::Vmkit, Tool::Qemu] {
            if let (Some(s), Some(r)) = (stat(c, tool), raw_time(cases, c, tool)) {
                if c.format != "raw" {
                    let _ = write!(
                        j,
                        ", \"{}_over_raw\": {:.4}",
                        tool.name(),
                        s.wall.as_secs_f64() / r.as_secs_f64()
                    );
                }
            }
        }
        j.push('}');
        if i + 1 < cases.len() {
            j.push(',');
        }
        j.push('\n');
    }
    j.push_str("  ]\n}\n");
    println!("\nJSON:\n{j}");
    let path = std::env::var_os("VMKIT_BLOCKBENCH_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("block-bench.json"));
    match std::fs::write(&path, &j) {
        Ok(()) => println!("JSON written to {}", path.display()),
        Err(e) => println!("could not write {}: {e}", path.display()),
    }
}

fn main() {
    let runs = env_u64("VMKIT_BLOCKBENCH_RUNS", 5).max(1);
    let mib = env_u64("VMKIT_BLOCKBENCH_MIB", 1024).max(64);
    let size = mib << 20;
    let (dir, _tmp) = match std::env::var_os("VMKIT_BLOCKBENCH_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            std::fs::create_dir_all(&d).expect("create VMKIT_BLOCKBENCH_DIR");
            (d, None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("vmkit-blockbench")
                .tempdir()
                .expect("create a temporary directory");
            (t.path().to_path_buf(), Some(t))
        }
    };
    let vmkit = build_vmkit_img();
    let qemu = find_qemu_img();
    if qemu.is_none() {
        println!("qemu-img not found: measuring vmkit only (set QEMU_IMG to point at it)");
    }
    let convert_runs = env_u64("VMKIT_BLOCKBENCH_CONVERT_RUNS", runs * 2).max(1);
    let env = Env {
        vmkit,
        qemu,
        log: dir.join("last-run.log"),
        dir,
        size,
        runs,
        convert_runs,
    };
    println!(
        "block bench: {runs} runs ({convert_runs} for convert), {mib} MiB images in {}",
        env.dir.display()
    );
    let images = make_images(&env);
    let mut cases = dd_cases(&env, &images[0].1);
    cases.extend(build_cases(&env, &images));
    if let Ok(only) = std::env::var("VMKIT_BLOCKBENCH_ONLY") {
        cases.retain(|c| c.group.contains(only.as_str()) || c.name.contains(only.as_str()));
    }
    let t0 = Instant::now();
    let total_runs = runs.max(convert_runs);
    for run in 0..total_runs {
        for (i, case) in cases.iter_mut().enumerate() {
            if run >= case.runs {
                continue;
            }
            let mut order = case.tools.clone();
            if (run as usize + i) % 2 == 1 {
                order.reverse();
            }
            for tool in order {
                if case.group == "convert" {
                    // Untimed warm-up of the same tool: the measured run then follows a
                    // run that wrote the same output the same way, whichever tool goes
                    // first (the kernel's free memory, and in a VM the host's backing of
                    // it, otherwise favours whoever runs second).
                    prepare(&env, &case.prepare);
                    let bin = if tool == Tool::Qemu {
                        env.qemu.clone().expect("qemu-img is present")
                    } else {
                        env.vmkit.clone()
                    };
                    run_timed(&env, &bin, &case.args);
                }
                prepare(&env, &case.prepare);
                let bin = match tool {
                    Tool::Dd => PathBuf::from("dd"),
                    Tool::Vmkit => env.vmkit.clone(),
                    Tool::Qemu => env.qemu.clone().expect("qemu-img is present"),
                };
                let s = run_timed(&env, &bin, &case.args);
                if run == 0 && case.group == "convert" {
                    verify_convert(&env, case, tool);
                }
                case.samples.push((tool, s));
            }
        }
        eprintln!(
            "run {}/{total_runs} done ({:.0} s elapsed)",
            run + 1,
            t0.elapsed().as_secs_f64()
        );
    }
    for case in &cases {
        if let Prepare::RemoveAndSync(p) | Prepare::FreshQcow2(p) = &case.prepare {
            let _ = std::fs::remove_file(p);
        }
    }
    report(&cases, &env);
}
