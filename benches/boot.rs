// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Boot-time and memory harness: the example VMM and QEMU boot the same test guest in the same
//! run, and the harness prints medians, a table, JSON, and vmkit/QEMU ratios.
//!
//! `cargo bench --bench boot` (needs `/dev/kvm`). Options through environment variables:
//! `VMKIT_BENCH_RUNS` (default 15), `VMKIT_BENCH_CPUS` (default `1,2,64`),
//! `VMKIT_BENCH_NO_QEMU=1` to skip the peer. QEMU comes from Debian's packages, unpacked by
//! `scripts/fetch-qemu.sh` into `.cache/qemu` when missing.
//!
//! What is measured, per run, from the moment the harness spawns the process:
//! - `first_insn`: the guest's first instruction (its POST 0x10 write), as timestamped by the
//!   VMM from the start of its `main` (vmkit only; QEMU has no such probe);
//! - `online`: the harness reads the guest's `VMKIT-GUEST cpus=` line on the serial output,
//!   which the guest prints right after all vCPUs are online (same probe for both);
//! - `exit`: the process has exited (both).
//!
//! Memory: peak RSS of the whole process (`ru_maxrss`) for a 1-vCPU, 128 MiB guest, and for
//! vmkit the VMM's own resident memory excluding guest RAM, as the VMM reports it.

mod common;

use common::{build_vmm, fetch_qemu};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Sample {
    first_insn: Option<Duration>,
    online: Duration,
    exit: Duration,
    maxrss_kib: u64,
    overhead_kib: Option<u64>,
}

/// Waits for the child and returns (exit time, peak RSS in KiB).
fn wait_rusage(pid: u32, spawned: Instant) -> (Duration, u64) {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child `pid`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on our own child with valid pointers to locals.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut ru) };
    let exit = spawned.elapsed();
    assert_eq!(r, pid as i32, "wait4 failed");
    (exit, ru.ru_maxrss as u64)
}

fn run_once(mut cmd: Command) -> Sample {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let spawned = Instant::now();
    let mut child = cmd.spawn().expect("spawn VMM");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut online = None;
    let mut out_text = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if online.is_none() && line.starts_with("VMKIT-GUEST cpus=") {
            online = Some(spawned.elapsed());
        }
        out_text.push_str(&line);
        out_text.push('\n');
    }
    let (exit, maxrss_kib) = wait_rusage(child.id(), spawned);
    // The child is reaped by wait4; forget it so Drop does not try again.
    std::mem::forget(child);
    let err_text = err_reader.join().unwrap_or_default();
    let report = vmkit_guest::parse_report(&out_text).unwrap_or_else(|e| {
        panic!("no guest report ({e}); stdout:\n{out_text}\nstderr:\n{err_text}")
    });
    assert!(report.passed(), "guest report failed:\n{out_text}");
    let field = |key: &str| -> Option<u64> {
        err_text
            .lines()
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix(key).and_then(|v| v.parse().ok()))
    };
    // The VMM timestamps POST writes from the start of its main(); exec and dynamic loading
    // before main() are not included in `first_insn` (they are in `online` and `exit`).
    let first_insn = field("first_insn_us=").map(Duration::from_micros);
    Sample {
        first_insn,
        online: online.expect("the guest printed its cpus line"),
        exit,
        maxrss_kib,
        overhead_kib: field("overhead_kib="),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("boot bench: /dev/kvm is missing; nothing to measure");
        return;
    }
    let runs: usize = std::env::var("VMKIT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let cpus: Vec<u32> = std::env::var("VMKIT_BENCH_CPUS")
        .unwrap_or_else(|_| "1,2,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let vmm = build_vmm();
    let qemu = fetch_qemu("boot");
    let guest = vmkit_guest::elf_path();

    let mut json = Vec::new();
    println!(
        "{:>5} {:>8} {:>14} {:>14} {:>14} {:>12}",
        "vcpus", "vmm", "first_insn ms", "online ms", "exit ms", "online ratio"
    );
    for &n in &cpus {
        let mem = if n >= 64 { "1G" } else { "128M" };
        let mut ours = Vec::new();
        let mut peer = Vec::new();
        // Interleave the two so that machine noise hits both alike.
        for _ in 0..runs {
            let mut c = Command::new(&vmm);
            c.args(["--cpus", &n.to_string(), "--memory", mem, "--timestamps"]);
            ours.push(run_once(c));
            if let Some(q) = &qemu {
                let mut c = Command::new(q);
                c.args([
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host,-arch-capabilities",
                    "-M",
                    "microvm",
                    "-smp",
                    &n.to_string(),
                    "-m",
                    mem,
                    "-nographic",
                    "-nodefaults",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                    "-kernel",
                    guest,
                ]);
                peer.push(run_once(c));
            }
        }
        let o_online = median(ours.iter().map(|s| s.online).collect());
        let o_exit = median(ours.iter().map(|s| s.exit).collect());
        let o_first: Vec<Duration> = ours.iter().filter_map(|s| s.first_insn).collect();
        let o_first = (!o_first.is_empty()).then(|| median(o_first));
        println!(
            "{:>5} {:>8} {:>14} {:>14.2} {:>14.2} {:>12}",
            n,
            "vmkit",
            o_first.map_or("-".into(), |d| format!("{:.2}", ms(d))),
            ms(o_online),
            ms(o_exit),
            ""
        );
        let mut entry = format!(
            "{{\"vcpus\":{n},\"runs\":{runs},\"vmkit\":{{\"first_insn_ms\":{},\"online_ms\":{:.3},\"exit_ms\":{:.3}}}",
            o_first.map_or("null".into(), |d| format!("{:.3}", ms(d))),
            ms(o_online),
            ms(o_exit)
        );
        if !peer.is_empty() {
            let q_online = median(peer.iter().map(|s| s.online).collect());
            let q_exit = median(peer.iter().map(|s| s.exit).collect());
            let ratio = o_online.as_secs_f64() / q_online.as_secs_f64();
            println!(
                "{:>5} {:>8} {:>14} {:>14.2} {:>14.2} {:>12.3}",
                n,
                "qemu",
                "-",
                ms(q_online),
                ms(q_exit),
                ratio
            );
            entry.push_str(&format!(
                ",\"qemu\":{{\"online_ms\":{:.3},\"exit_ms\":{:.3}}},\"online_ratio_vmkit_over_qemu\":{ratio:.4}",
                ms(q_online),
                ms(q_exit)
            ));
        }
        entry.push('}');
        json.push(entry);
    }

    // Memory: 1 vCPU, 128 MiB.
    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for _ in 0..5 {
        let mut c = Command::new(&vmm);
        c.args(["--cpus", "1", "--memory", "128M", "--timestamps"]);
        ours.push(run_once(c));
        if let Some(q) = &qemu {
            let mut c = Command::new(q);
            c.args([
                "-accel",
                "kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-M",
                "microvm",
                "-smp",
                "1",
                "-m",
                "128M",
                "-nographic",
                "-nodefaults",
                "-serial",
                "stdio",
                "-no-reboot",
                "-kernel",
                guest,
            ]);
            peer.push(run_once(c));
        }
    }
    let med = |v: Vec<u64>| {
        let mut v = v;
        v.sort_unstable();
        v[v.len() / 2]
    };
    let o_rss = med(ours.iter().map(|s| s.maxrss_kib).collect());
    let o_over: Vec<u64> = ours.iter().filter_map(|s| s.overhead_kib).collect();
    let o_over = (!o_over.is_empty()).then(|| med(o_over));
    println!();
    println!("memory, 1 vCPU / 128 MiB guest (median of 5):");
    println!(
        "  vmkit peak RSS {:.2} MiB, VMM overhead excluding guest RAM {}",
        o_rss as f64 / 1024.0,
        o_over.map_or("n/a".into(), |k| format!("{:.2} MiB", k as f64 / 1024.0))
    );
    let mut mem_json = format!(
        "{{\"vmkit_peak_rss_kib\":{o_rss},\"vmkit_overhead_kib\":{}",
        o_over.map_or("null".into(), |k| k.to_string())
    );
    if !peer.is_empty() {
        let q_rss = med(peer.iter().map(|s| s.maxrss_kib).collect());
        println!(
            "  qemu  peak RSS {:.2} MiB; ratio vmkit/qemu {:.3}",
            q_rss as f64 / 1024.0,
            o_rss as f64 / q_rss as f64
        );
        mem_json.push_str(&format!(",\"qemu_peak_rss_kib\":{q_rss}"));
    }
    mem_json.push('}');
    println!();
    println!("{{\"boot\":[{}],\"memory\":{mem_json}}}", json.join(","));
}
