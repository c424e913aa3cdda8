// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio end to end: the example VMM serves the test guest a disk, a multiport console and
//! an entropy source over virtio-pci (MSI-X) and virtio-mmio, with 1 and 64 vCPUs; the
//! guest's drivers verify the disk, echo through a console port and read entropy, and the
//! data the guest wrote is in the backing file — also after the VMM is killed with SIGKILL
//! right after the guest's flush completed. Bad disk arguments fail at start.
//!
//! Needs `/dev/kvm` (skips loudly without it; fails under `VMKIT_REQUIRE_KVM`). Files and
//! sockets live in per-test temporary directories.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmkit_guest::devices::{Echo, Flush, Transport, Verify};
use vmkit_guest::GuestReport;

const DISK_BYTES: u64 = 16 << 20;
/// What the guest verifies (its default `vmkit.blk_verify_mib`).
const VERIFIED_BYTES: u64 = 2 << 20;

fn disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk.raw");
    let f = std::fs::File::create(&path).expect("create disk");
    f.set_len(DISK_BYTES).expect("size disk");
    path
}

/// The guest's pattern: word `w` of sector `s` is `(s << 6 | w) * K ^ seed`; the seed is
/// per boot, so it is recovered from the first word (sector 0, word 0).
fn check_pattern(path: &Path, bytes: u64) {
    let mut data = vec![0u8; bytes as usize];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut data))
        .expect("read back the disk");
    let word = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let seed = word(0);
    assert_ne!(seed, 0, "the guest's data is not in the backing file");
    for i in 0..(bytes / 8) as usize {
        let (sector, w) = ((i / 64) as u64, (i % 64) as u64);
        let expect = (sector << 6 | w).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
        assert_eq!(word(i), expect, "word {w} of sector {sector} differs");
    }
}

/// Connects to the console port's socket (once the VMM created it) and echoes every byte
/// back until the VMM closes it.
fn echo_server(socket: PathBuf) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stream = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
            }
        };
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

fn boot(transport: &str, cpus: u32, queues: u16) -> (GuestReport, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let disk = disk(dir.path());
    let socket = dir.path().join("echo.sock");
    let echo = echo_server(socket.clone());
    let out = common::run_vmm_with_timeout(
        &[
            "--cpus",
            &cpus.to_string(),
            "--memory",
            "512M",
            "--transport",
            transport,
            "--disk",
            &format!("{},queues={queues}", disk.display()),
            "--console-port",
            &format!("vmkit.echo=socket:{}", socket.display()),
            "--rng",
        ],
        120,
    );
    let (stdout, stderr) = common::texts(&out);
    assert!(!stderr.contains("panicked"), "the VMM panicked: {stderr}");
    let _ = echo.join();
    let report = vmkit_guest::parse_report(&stdout).expect("guest report");
    assert!(
        out.status.success(),
        "exit {}: {stdout}\n{stderr}",
        out.status
    );
    assert!(report.passed(), "{stdout}");
    assert_eq!(report.cpus, cpus, "{stdout}");
    let dev = &report.devices;
    assert!(dev.errors.is_empty(), "{:?}", dev.errors);

    let blk = dev.blk.first().expect("a virtio-blk line");
    assert_eq!(blk.verify, Verify::Ok, "{stdout}");
    assert_eq!(blk.flush, Flush::Ok, "{stdout}");
    assert_eq!((blk.bad_sectors, blk.io_errors), (0, 0), "{stdout}");
    assert_eq!(blk.capacity, DISK_BYTES);
    assert_eq!(blk.queues, u32::from(queues));
    let console = dev.console.first().expect("a virtio-console line");
    assert_eq!(console.name, "vmkit.echo");
    assert_eq!(console.echo, Echo::Ok, "{stdout}");
    let rng = dev.rng.first().expect("a virtio-rng line");
    assert!(rng.ok && rng.bytes > 0, "{stdout}");
    for t in [&blk.transport, &console.transport, &rng.transport] {
        match (transport, t) {
            ("pci", Transport::Pci(_)) | ("mmio", Transport::Mmio(_)) => {}
            _ => panic!("{t:?} is not on the {transport} transport"),
        }
    }
    let msix = dev.msix.as_ref().expect("a VMKIT-MSIX line");
    assert_eq!(msix.wrong_cpu, 0, "{stdout}");
    assert!(msix.interrupts > 0, "no device interrupt arrived: {stdout}");
    if cpus > 1 {
        // The BSP polls; interrupts aimed at it wait for its next `hlt`, so per-device
        // counts are checked where APs receive them.
        assert!(blk.irqs > 0, "no virtio-blk interrupt arrived: {stdout}");
        assert!(
            msix.cpus_hit > 1,
            "interrupts should arrive on several CPUs: {stdout}"
        );
    }
    check_pattern(&disk, VERIFIED_BYTES);
    (report, dir)
}

macro_rules! kvm_test {
    ($name:ident, $body:expr) => {
        #[test]
        fn $name() {
            if !vmkit_testkit::kvm_available(stringify!($name)) {
                return;
            }
            $body
        }
    };
}

kvm_test!(kvm_virtio_pci_1_vcpu, {
    let (report, _dir) = boot("pci", 1, 1);
    let pci = report.devices.pci.as_ref().expect("a VMKIT-PCI line");
    assert!(pci.ecam, "the guest should find ECAM through MCFG");
    assert_eq!(pci.ecam_base, Some(0xe000_0000));
    assert_eq!(pci.failed, 0);
    // Host bridge, console (slot 1), rng (slot 2), disk 0 (slot 3): the fixed plan.
    let bdfs: Vec<&str> = report
        .devices
        .pci_functions
        .iter()
        .map(|f| f.bdf.as_str())
        .collect();
    assert_eq!(bdfs, ["00:00.0", "00:01.0", "00:02.0", "00:03.0"]);
});

/// The 64-vCPU machines run one at a time: the guest's MSI-X rotation waits for each CPU's
/// interrupt, and two such machines on a small host slow each other down for nothing.
static LARGE: std::sync::Mutex<()> = std::sync::Mutex::new(());

kvm_test!(kvm_virtio_pci_64_vcpus_multiqueue, {
    let _one_at_a_time = LARGE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (report, _dir) = boot("pci", 64, 4);
    let msix = report.devices.msix.as_ref().expect("VMKIT-MSIX");
    assert_eq!(msix.rotation_hit, msix.rotation_cpus, "{msix:?}");
});

kvm_test!(kvm_virtio_mmio_1_vcpu, {
    boot("mmio", 1, 1);
});

kvm_test!(kvm_virtio_mmio_64_vcpus, {
    let _one_at_a_time = LARGE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    boot("mmio", 64, 2);
});

kvm_test!(kvm_virtio_pci_bars_relocated_by_the_guest, {
    let dir = tempfile::tempdir().expect("temporary directory");
    let disk = disk(dir.path());
    let out = common::run_vmm_with_timeout(
        &[
            "--cpus",
            "2",
            "--memory",
            "512M",
            "--disk",
            &disk.display().to_string(),
            "--rng",
            "--cmdline",
            "vmkit.pci_reassign=1",
        ],
        120,
    );
    let (stdout, _) = common::texts(&out);
    assert!(out.status.success(), "{stdout}");
    let report = vmkit_guest::parse_report(&stdout).expect("guest report");
    let pci = report.devices.pci.as_ref().expect("VMKIT-PCI");
    assert!(pci.relocated >= 2, "BARs should have moved: {stdout}");
    assert_eq!(report.devices.blk[0].verify, Verify::Ok, "{stdout}");
    assert!(report.devices.rng[0].ok, "{stdout}");
    check_pattern(&disk, VERIFIED_BYTES);
});

// Reads the VMM's stdout until the guest reported its verified, flushed disk, then kills
// the VMM with SIGKILL at once: what the guest flushed must be in the file.
kvm_test!(kvm_flushed_data_survives_sigkill, {
    let dir = tempfile::tempdir().expect("temporary directory");
    let disk = disk(dir.path());
    let mut child: Child = Command::new(common::vmm_binary())
        .args(["--cpus", "2", "--memory", "512M", "--disk"])
        .arg(format!("{},cache=writeback", disk.display()))
        .args(["--cmdline", "vmkit.blk_bench=1 vmkit.blk_bench_ms=5000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the VMM");
    let stdout = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut flushed = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read stdout");
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("VMKIT-VIRTIO-BLK ") {
            flushed = line.contains("flush=ok") && line.contains("verify=ok");
            // The guest is now in its 5 s benchmark; the VMM dies mid-I/O.
            child.kill().expect("SIGKILL the VMM");
            break;
        }
    }
    let _ = child.wait();
    assert!(flushed, "the guest did not report a flushed disk:\n{seen}");
    // The benchmark's writes may have overwritten the start of the disk after the flush,
    // with the same per-boot pattern (`vmkit.blk_bs` requests of it); what must hold is
    // that the flushed, verified region still reads as the pattern.
    check_pattern(&disk, VERIFIED_BYTES);
});

#[test]
fn bad_disk_arguments_fail_at_start() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let missing = dir.path().join("missing.raw");
    let odd = dir.path().join("odd.raw");
    std::fs::write(&odd, vec![0u8; 1000]).expect("write odd-sized disk");
    let cases: [(&str, String, &str); 3] = [
        ("missing", missing.display().to_string(), "missing.raw"),
        ("odd size", odd.display().to_string(), "multiple of 512"),
        // Not writable even for root (procfs refuses O_RDWR on this file).
        ("not writable", "/proc/version".into(), "/proc/version"),
    ];
    for (what, path, needle) in cases {
        let out = common::run_vmm(&["--disk", &path]);
        let (_, stderr) = common::texts(&out);
        assert_eq!(out.status.code(), Some(125), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(stderr.contains(needle), "{what}: {stderr}");
    }
}
