// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Typed results of the guest's device report lines (formats in [`crate::abi::devices`]).

use crate::report::{fields, flag, get, malformed, number, ReportError};
use std::collections::BTreeMap;

/// A fixed-point value with two decimals (MiB/s), stored as hundredths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hundredths(pub u64);

impl Hundredths {
    /// The value as a float.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 100.0
    }

    fn parse(line: &str, key: &str, v: &str) -> Result<Self, ReportError> {
        let (int, frac) = v
            .split_once('.')
            .ok_or_else(|| malformed(line, format!("{key}={v:?} has no decimals")))?;
        if frac.len() != 2 {
            return Err(malformed(line, format!("{key}={v:?} needs two decimals")));
        }
        let int: u64 = number(line, key, int)?;
        let frac: u64 = number(line, key, frac)?;
        int.checked_mul(100)
            .and_then(|i| i.checked_add(frac))
            .map(Hundredths)
            .ok_or_else(|| malformed(line, format!("{key}={v:?} is too large")))
    }
}

/// Which virtio transport a device line is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    /// virtio-pci at this `bb:dd.f`.
    Pci(String),
    /// virtio-mmio at this base address.
    Mmio(u64),
}

fn transport(line: &str, f: &BTreeMap<&str, &str>) -> Result<Transport, ReportError> {
    let addr = get(line, f, "addr")?;
    match get(line, f, "transport")? {
        "pci" => Ok(Transport::Pci(addr.to_string())),
        "mmio" => {
            let hex = addr
                .strip_prefix("0x")
                .ok_or_else(|| malformed(line, "mmio addr= is not 0x-hex"))?;
            u64::from_str_radix(hex, 16)
                .map(Transport::Mmio)
                .map_err(|_| malformed(line, "mmio addr= is not 0x-hex"))
        }
        t => Err(malformed(line, format!("unknown transport {t:?}"))),
    }
}

fn hex_u64(line: &str, key: &str, v: &str) -> Result<u64, ReportError> {
    v.strip_prefix("0x")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| malformed(line, format!("{key}={v:?} is not 0x-hex")))
}

/// `VMKIT-PCI`: how PCI was found and what BAR programming did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciSummary {
    /// `true` for ECAM, `false` for the legacy ports.
    pub ecam: bool,
    /// ECAM base address.
    pub ecam_base: Option<u64>,
    /// Buses scanned.
    pub buses: u32,
    /// Functions found.
    pub devices: u32,
    /// Memory BARs the guest programmed.
    pub assigned: u32,
    /// Of those, BARs moved from another non-zero address.
    pub relocated: u32,
    /// Memory BARs that did not fit the window.
    pub failed: u32,
}

/// `VMKIT-PCI-DEV`: one function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    /// `bb:dd.f`.
    pub bdf: String,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code, subclass, programming interface.
    pub class: u32,
    /// Total size of its memory BARs.
    pub bar_bytes: u64,
}

/// Verdict of the virtio-blk verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verify {
    /// Everything read back as written.
    Ok,
    /// Mismatches or I/O errors.
    Fail,
    /// Read-only disk: nothing written.
    Skipped,
}

/// Flush result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flush {
    /// Completed with status OK.
    Ok,
    /// Completed with an error status.
    Fail,
    /// The device does not offer `VIRTIO_BLK_F_FLUSH`.
    Unsupported,
}

/// `VMKIT-VIRTIO-BLK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkReport {
    /// Transport and address.
    pub transport: Transport,
    /// Queues driven.
    pub queues: u32,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Verdict.
    pub verify: Verify,
    /// Bytes written and read back.
    pub bytes: u64,
    /// Sectors that read back wrong.
    pub bad_sectors: u64,
    /// Requests completed with an error status.
    pub io_errors: u64,
    /// Flush result.
    pub flush: Flush,
    /// Interrupts counted on its vectors.
    pub irqs: u64,
    /// Time the verification took, in microseconds.
    pub us: u64,
}

/// `VMKIT-VIRTIO-BLK-BENCH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkBench {
    /// Transport and address.
    pub transport: Transport,
    /// Queues used.
    pub queues: u32,
    /// Requests in flight per queue.
    pub qd: u32,
    /// Sequential request size.
    pub bs: u32,
    /// Duration of each phase, ms.
    pub ms: u64,
    /// Sequential write throughput, MiB/s.
    pub seq_write_mibps: Hundredths,
    /// Sequential read throughput, MiB/s.
    pub seq_read_mibps: Hundredths,
    /// Random 4 KiB read IOPS.
    pub rand_read_iops: u64,
    /// Requests that failed.
    pub io_errors: u64,
}

/// Echo result of the console test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Echo {
    /// The bytes came back unchanged.
    Ok,
    /// Different bytes came back.
    Mismatch,
    /// Not everything came back in time.
    Timeout,
    /// No port with the wanted name (not a failure).
    NoPort,
}

/// `VMKIT-VIRTIO-CONSOLE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleReport {
    /// Transport and address.
    pub transport: Transport,
    /// Port number.
    pub port: u32,
    /// Port name (`-` for none).
    pub name: String,
    /// Bytes sent.
    pub sent: u32,
    /// Bytes received.
    pub received: u32,
    /// Result.
    pub echo: Echo,
    /// Interrupts counted on its vectors.
    pub irqs: u64,
}

/// `VMKIT-VIRTIO-RNG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RngReport {
    /// Transport and address.
    pub transport: Transport,
    /// Entropy bytes received.
    pub bytes: u32,
    /// Bytes received and not all equal.
    pub ok: bool,
    /// Interrupts counted on its vectors.
    pub irqs: u64,
}

/// `VMKIT-VIRTIO-ERROR`: a virtio device the guest could not drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioError {
    /// Transport and address.
    pub transport: Transport,
    /// virtio device type (0 if unknown).
    pub device: u32,
    /// Short reason (`no_common_cfg`, `timeout`, `not_version_2`, ...).
    pub reason: String,
}

/// `VMKIT-MSIX`: where device interrupts went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsixReport {
    /// MSI-X entries and IOAPIC routes programmed.
    pub vectors: u32,
    /// Online CPUs usable as destinations.
    pub cpus: u32,
    /// Distinct CPUs some vector was aimed at.
    pub cpus_targeted: u32,
    /// CPUs that received device interrupts.
    pub cpus_hit: u32,
    /// Device interrupts received in total.
    pub interrupts: u64,
    /// Interrupts that arrived on another CPU than programmed.
    pub wrong_cpu: u32,
    /// CPUs the rotation test aimed the rng's vector at.
    pub rotation_cpus: u32,
    /// Of those, CPUs that received it.
    pub rotation_hit: u32,
}

/// Every device line of a report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceReport {
    /// `VMKIT-PCI`.
    pub pci: Option<PciSummary>,
    /// `VMKIT-PCI-DEV`, in order.
    pub pci_functions: Vec<PciFunction>,
    /// `VMKIT-VIRTIO-BLK`.
    pub blk: Vec<BlkReport>,
    /// `VMKIT-VIRTIO-BLK-BENCH`.
    pub blk_bench: Vec<BlkBench>,
    /// `VMKIT-VIRTIO-CONSOLE`.
    pub console: Vec<ConsoleReport>,
    /// `VMKIT-VIRTIO-RNG`.
    pub rng: Vec<RngReport>,
    /// `VMKIT-VIRTIO-ERROR`.
    pub errors: Vec<VirtioError>,
    /// `VMKIT-MSIX`.
    pub msix: Option<MsixReport>,
}

impl DeviceReport {
    /// `true` if no virtio line was printed.
    pub fn no_virtio(&self) -> bool {
        self.blk.is_empty()
            && self.blk_bench.is_empty()
            && self.console.is_empty()
            && self.rng.is_empty()
            && self.errors.is_empty()
    }
}

/// Parses one device line (`kind` is its prefix, e.g. `VMKIT-PCI`); `Ok(false)` if `kind`
/// is not a device line.
pub(crate) fn parse_device_line(
    kind: &str,
    line: &str,
    rest: &str,
    d: &mut DeviceReport,
) -> Result<bool, ReportError> {
    let n = |f: &BTreeMap<&str, &str>, k: &str| -> Result<u64, ReportError> {
        number(line, k, get(line, f, k)?)
    };
    let n32 = |f: &BTreeMap<&str, &str>, k: &str| -> Result<u32, ReportError> {
        number(line, k, get(line, f, k)?)
    };
    match kind {
        "VMKIT-PCI" => {
            let f = fields(line, rest)?;
            let ecam = match get(line, &f, "access")? {
                "ecam" => true,
                "legacy" => false,
                a => return Err(malformed(line, format!("unknown access {a:?}"))),
            };
            let ecam_base = match get(line, &f, "ecam")? {
                "-" => None,
                v => Some(hex_u64(line, "ecam", v)?),
            };
            d.pci = Some(PciSummary {
                ecam,
                ecam_base,
                buses: n32(&f, "buses")?,
                devices: n32(&f, "devices")?,
                assigned: n32(&f, "assigned")?,
                relocated: n32(&f, "relocated")?,
                failed: n32(&f, "failed")?,
            });
        }
        "VMKIT-PCI-DEV" => {
            let f = fields(line, rest)?;
            let id = get(line, &f, "id")?;
            let (v, dv) = id
                .split_once(':')
                .ok_or_else(|| malformed(line, "id= is not vvvv:dddd"))?;
            let hex16 = |s: &str| {
                u16::from_str_radix(s, 16).map_err(|_| malformed(line, "id= is not vvvv:dddd"))
            };
            let class = hex_u64(line, "class", get(line, &f, "class")?)?;
            d.pci_functions.push(PciFunction {
                bdf: get(line, &f, "bdf")?.to_string(),
                vendor: hex16(v)?,
                device: hex16(dv)?,
                class: u32::try_from(class).map_err(|_| malformed(line, "class= too large"))?,
                bar_bytes: n(&f, "bar_bytes")?,
            });
        }
        "VMKIT-VIRTIO-BLK" => {
            let f = fields(line, rest)?;
            let verify = match get(line, &f, "verify")? {
                "ok" => Verify::Ok,
                "fail" => Verify::Fail,
                "skipped" => Verify::Skipped,
                v => return Err(malformed(line, format!("unknown verify={v:?}"))),
            };
            let flush = match get(line, &f, "flush")? {
                "ok" => Flush::Ok,
                "fail" => Flush::Fail,
                "unsupported" => Flush::Unsupported,
                v => return Err(malformed(line, format!("unknown flush={v:?}"))),
            };
            d.blk.push(BlkReport {
                transport: transport(line, &f)?,
                queues: n32(&f, "queues")?,
                capacity: n(&f, "capacity")?,
                verify,
                bytes: n(&f, "bytes")?,
                bad_sectors: n(&f, "bad_sectors")?,
                io_errors: n(&f, "io_errors")?,
                flush,
                irqs: n(&f, "irqs")?,
                us: n(&f, "us")?,
            });
        }
        "VMKIT-VIRTIO-BLK-BENCH" => {
            let f = fields(line, rest)?;
            let w = get(line, &f, "seq_write_mibps")?;
            let r = get(line, &f, "seq_read_mibps")?;
            d.blk_bench.push(BlkBench {
                transport: transport(line, &f)?,
                queues: n32(&f, "queues")?,
                qd: n32(&f, "qd")?,
                bs: n32(&f, "bs")?,
                ms: n(&f, "ms")?,
                seq_write_mibps: Hundredths::parse(line, "seq_write_mibps", w)?,
                seq_read_mibps: Hundredths::parse(line, "seq_read_mibps", r)?,
                rand_read_iops: n(&f, "rand_read_iops")?,
                io_errors: n(&f, "io_errors")?,
            });
        }
        "VMKIT-VIRTIO-CONSOLE" => {
            let f = fields(line, rest)?;
            let echo = match get(line, &f, "echo")? {
                "ok" => Echo::Ok,
                "mismatch" => Echo::Mismatch,
                "timeout" => Echo::Timeout,
                "no_port" => Echo::NoPort,
                v => return Err(malformed(line, format!("unknown echo={v:?}"))),
            };
            d.console.push(ConsoleReport {
                transport: transport(line, &f)?,
                port: n32(&f, "port")?,
                name: get(line, &f, "name")?.to_string(),
                sent: n32(&f, "sent")?,
                received: n32(&f, "received")?,
                echo,
                irqs: n(&f, "irqs")?,
            });
        }
        "VMKIT-VIRTIO-RNG" => {
            let f = fields(line, rest)?;
            d.rng.push(RngReport {
                transport: transport(line, &f)?,
                bytes: n32(&f, "bytes")?,
                ok: flag(line, "ok", get(line, &f, "ok")?)?,
                irqs: n(&f, "irqs")?,
            });
        }
        "VMKIT-VIRTIO-ERROR" => {
            let f = fields(line, rest)?;
            d.errors.push(VirtioError {
                transport: transport(line, &f)?,
                device: n32(&f, "device")?,
                reason: get(line, &f, "reason")?.to_string(),
            });
        }
        "VMKIT-MSIX" => {
            let f = fields(line, rest)?;
            d.msix = Some(MsixReport {
                vectors: n32(&f, "vectors")?,
                cpus: n32(&f, "cpus")?,
                cpus_targeted: n32(&f, "cpus_targeted")?,
                cpus_hit: n32(&f, "cpus_hit")?,
                interrupts: n(&f, "interrupts")?,
                wrong_cpu: n32(&f, "wrong_cpu")?,
                rotation_cpus: n32(&f, "rotation_cpus")?,
                rotation_hit: n32(&f, "rotation_hit")?,
            });
        }
        _ => return Ok(false),
    }
    Ok(true)
}
