// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Parsing the guest's serial report.
//!
//! The guest prints (see `guest-src/report.rs` for the writer):
//! ```text
//! VMKIT-GUEST boot=<pvh|linux64> cmdline="<cmdline, truncated to 200 chars>"
//! VMKIT-GUEST cpus=<online incl. BSP> expected=<n> apic_ids=<ranges> x2apic=<0|1>
//! VMKIT-GUEST topo smt_bits=<n> core_bits=<n> consistent=<0|1>
//! VMKIT-GUEST exit=<code>
//! ```
//! or, on failure, `VMKIT-GUEST panic <message>` (Rust panic) /
//! `VMKIT-GUEST panic exception=<n> rip=<hex> err=<hex>` (CPU exception) followed by the exit
//! line. With `vmkit.debug=1` a `VMKIT-GUEST debug key=value ...` line is added.
//! Other output, and `VMKIT-GUEST` lines of kinds this version does not know, are ignored
//! (kept in [`GuestReport::other_lines`]). The device lines (`VMKIT-PCI ...`,
//! `VMKIT-VIRTIO-...`, `VMKIT-MSIX ...`, see [`crate::abi::devices`]) go to
//! [`GuestReport::devices`].

use crate::devices::{parse_device_line, DeviceReport};
use std::collections::BTreeMap;
use thiserror::Error;

const PREFIX: &str = "VMKIT-GUEST ";
/// Most APIC IDs an `apic_ids=` value may expand to (guards against `0-4294967295`).
pub const MAX_APIC_IDS: usize = 1 << 16;

/// How the guest was booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootProtocol {
    /// PVH (`XEN_ELFNOTE_PHYS32_ENTRY`).
    Pvh,
    /// Linux 64-bit boot protocol.
    Linux64,
}

impl BootProtocol {
    /// The name the guest prints.
    pub fn as_str(self) -> &'static str {
        match self {
            BootProtocol::Pvh => "pvh",
            BootProtocol::Linux64 => "linux64",
        }
    }
}

/// Everything the guest reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestReport {
    /// Boot protocol the guest was entered with.
    pub boot: BootProtocol,
    /// The command line as the guest saw it (at most 200 bytes; unprintable bytes and `"` as `?`).
    pub cmdline: String,
    /// CPUs online, BSP included.
    pub cpus: u32,
    /// CPUs the firmware tables (MADT, else MP table, else 1) announced.
    pub expected: u32,
    /// APIC IDs of the online CPUs, ascending.
    pub apic_ids: Vec<u32>,
    /// Whether the guest ran its LAPICs in x2APIC mode.
    pub x2apic: bool,
    /// SMT width of the APIC ID (CPUID leaf 0xB) seen by the BSP.
    pub smt_bits: u32,
    /// Core width above SMT (CPUID leaf 0xB) seen by the BSP.
    pub core_bits: u32,
    /// Every CPU's CPUID IDs matched its LAPIC ID and the online set equals the expected set.
    pub consistent: bool,
    /// Exit code the guest wrote to port 0xF4.
    pub exit_code: u8,
    /// Key/value pairs of the `debug` line (with `vmkit.debug=1`).
    pub debug: BTreeMap<String, String>,
    /// `VMKIT-GUEST` lines of kinds this parser does not know (from newer guests).
    pub other_lines: Vec<String>,
    /// The device lines (PCI, virtio, MSI-X); empty when the guest found no devices.
    pub devices: DeviceReport,
}

impl GuestReport {
    /// `true` if the guest exited with code 0 (all CPUs online, topology consistent).
    pub fn passed(&self) -> bool {
        self.exit_code == 0
    }
}

/// Why the serial output is not a complete report.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReportError {
    /// The guest printed a panic line (the rest of the line is the message).
    #[error("guest panicked: {0}")]
    Panic(String),
    /// A required line is missing (named by its first key).
    #[error("guest report has no `{0}` line")]
    Missing(&'static str),
    /// A line could not be parsed.
    #[error("malformed guest report line {line:?}: {reason}")]
    Malformed {
        /// The offending line (after the prefix).
        line: String,
        /// What is wrong with it.
        reason: String,
    },
}

pub(crate) fn malformed(line: &str, reason: impl Into<String>) -> ReportError {
    ReportError::Malformed {
        line: line.to_string(),
        reason: reason.into(),
    }
}

/// Splits `key=value` tokens; every token must have a key and a value.
pub(crate) fn fields<'a>(
    line: &str,
    rest: &'a str,
) -> Result<BTreeMap<&'a str, &'a str>, ReportError> {
    let mut map = BTreeMap::new();
    for tok in rest.split_ascii_whitespace() {
        let (k, v) = tok
            .split_once('=')
            .ok_or_else(|| malformed(line, format!("token {tok:?} is not key=value")))?;
        if k.is_empty() {
            return Err(malformed(line, format!("token {tok:?} has no key")));
        }
        if map.insert(k, v).is_some() {
            return Err(malformed(line, format!("key {k:?} appears twice")));
        }
    }
    Ok(map)
}

pub(crate) fn get<'a>(
    line: &str,
    map: &BTreeMap<&str, &'a str>,
    key: &str,
) -> Result<&'a str, ReportError> {
    map.get(key)
        .copied()
        .ok_or_else(|| malformed(line, format!("no {key}=")))
}

pub(crate) fn number<T: std::str::FromStr>(
    line: &str,
    key: &str,
    v: &str,
) -> Result<T, ReportError> {
    v.parse()
        .map_err(|_| malformed(line, format!("{key}={v:?} is not a valid number")))
}

pub(crate) fn flag(line: &str, key: &str, v: &str) -> Result<bool, ReportError> {
    match v {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(malformed(line, format!("{key}={v:?} is not 0 or 1"))),
    }
}

/// Parses an `apic_ids=` value: comma-separated IDs and `a-b` ranges, `-` for none.
/// Ranges must be ascending and not overlap; at most [`MAX_APIC_IDS`] IDs in total.
pub fn parse_apic_ids(s: &str) -> Result<Vec<u32>, String> {
    if s == "-" {
        return Ok(Vec::new());
    }
    let mut ids: Vec<u32> = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: u32 = a
            .parse()
            .map_err(|_| format!("bad APIC ID {a:?} in {part:?}"))?;
        let b: u32 = b
            .parse()
            .map_err(|_| format!("bad APIC ID {b:?} in {part:?}"))?;
        if a > b {
            return Err(format!("descending range {part:?}"));
        }
        if ids.last().is_some_and(|last| *last >= a) {
            return Err(format!("range {part:?} is not above the previous IDs"));
        }
        let count = (b - a) as usize + 1;
        if ids.len() + count > MAX_APIC_IDS {
            return Err(format!("more than {MAX_APIC_IDS} APIC IDs"));
        }
        ids.extend(a..=b);
    }
    Ok(ids)
}

#[derive(Default)]
struct Partial {
    boot: Option<(BootProtocol, String)>,
    cpus: Option<(u32, u32, Vec<u32>, bool)>,
    topo: Option<(u32, u32, bool)>,
    exit: Option<u8>,
    debug: BTreeMap<String, String>,
    other: Vec<String>,
    devices: DeviceReport,
}

fn parse_line(line: &str, p: &mut Partial) -> Result<(), ReportError> {
    let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
    if kind == "panic" {
        return Err(ReportError::Panic(rest.to_string()));
    }
    if let Some(v) = kind.strip_prefix("boot=") {
        let boot = match v {
            "pvh" => BootProtocol::Pvh,
            "linux64" => BootProtocol::Linux64,
            _ => return Err(malformed(line, format!("unknown boot protocol {v:?}"))),
        };
        let cmdline = rest
            .strip_prefix("cmdline=\"")
            .and_then(|c| c.rfind('"').map(|end| &c[..end]))
            .ok_or_else(|| malformed(line, "no cmdline=\"...\""))?;
        p.boot = Some((boot, cmdline.to_string()));
    } else if kind.starts_with("cpus=") {
        let f = fields(line, line)?;
        let cpus = number(line, "cpus", get(line, &f, "cpus")?)?;
        let expected = number(line, "expected", get(line, &f, "expected")?)?;
        let ids = parse_apic_ids(get(line, &f, "apic_ids")?).map_err(|e| malformed(line, e))?;
        let x2apic = flag(line, "x2apic", get(line, &f, "x2apic")?)?;
        p.cpus = Some((cpus, expected, ids, x2apic));
    } else if kind == "topo" {
        let f = fields(line, rest)?;
        let smt = number(line, "smt_bits", get(line, &f, "smt_bits")?)?;
        let core = number(line, "core_bits", get(line, &f, "core_bits")?)?;
        let consistent = flag(line, "consistent", get(line, &f, "consistent")?)?;
        p.topo = Some((smt, core, consistent));
    } else if let Some(v) = kind.strip_prefix("exit=") {
        if !rest.is_empty() {
            return Err(malformed(line, "text after the exit code"));
        }
        p.exit = Some(number(line, "exit", v)?);
    } else if kind == "debug" {
        for (k, v) in fields(line, rest)? {
            p.debug.insert(k.to_string(), v.to_string());
        }
    } else {
        p.other.push(line.to_string());
    }
    Ok(())
}

/// Parses the guest's serial output (the whole capture; non-report text is ignored).
///
/// Returns [`ReportError::Panic`] if the guest printed a panic line, [`ReportError::Missing`]
/// if one of the four report lines is absent, [`ReportError::Malformed`] for a report line
/// that does not parse. Never panics, whatever the input.
pub fn parse_report(output: &str) -> Result<GuestReport, ReportError> {
    let mut p = Partial::default();
    for raw in output.lines() {
        if let Some(pos) = raw.find("VMKIT-") {
            let line = raw[pos..].trim_end_matches(['\r', ' ']);
            let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
            if parse_device_line(kind, line, rest, &mut p.devices)? {
                continue;
            }
        }
        let Some(pos) = raw.find(PREFIX) else {
            continue;
        };
        let line = raw[pos + PREFIX.len()..].trim_end_matches(['\r', ' ']);
        parse_line(line, &mut p)?;
    }
    let (boot, cmdline) = p.boot.ok_or(ReportError::Missing("boot"))?;
    let (cpus, expected, apic_ids, x2apic) = p.cpus.ok_or(ReportError::Missing("cpus"))?;
    let (smt_bits, core_bits, consistent) = p.topo.ok_or(ReportError::Missing("topo"))?;
    let exit_code = p.exit.ok_or(ReportError::Missing("exit"))?;
    Ok(GuestReport {
        boot,
        cmdline,
        cpus,
        expected,
        apic_ids,
        x2apic,
        smt_bits,
        core_bits,
        consistent,
        exit_code,
        debug: p.debug,
        other_lines: p.other,
        devices: p.devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "SeaBIOS noise\r\n\
        VMKIT-GUEST boot=linux64 cmdline=\"a \"quoted\" b\"\r\n\
        VMKIT-GUEST cpus=6 expected=6 apic_ids=0-3,8,10 x2apic=0\r\n\
        VMKIT-GUEST topo smt_bits=1 core_bits=3 consistent=1\r\n\
        VMKIT-GUEST debug tsc_khz=2000000 bringup_us=1234\r\n\
        VMKIT-GUEST exit=0\r\n";

    #[test]
    fn parses_a_full_report() {
        let r = parse_report(GOOD).unwrap();
        assert_eq!(r.boot, BootProtocol::Linux64);
        assert_eq!(r.cmdline, "a \"quoted\" b");
        assert_eq!((r.cpus, r.expected), (6, 6));
        assert_eq!(r.apic_ids, vec![0, 1, 2, 3, 8, 10]);
        assert!(!r.x2apic);
        assert_eq!((r.smt_bits, r.core_bits, r.consistent), (1, 3, true));
        assert_eq!(r.exit_code, 0);
        assert!(r.passed());
        assert_eq!(r.debug.get("bringup_us").map(String::as_str), Some("1234"));
        assert!(r.other_lines.is_empty());
    }

    #[test]
    fn unknown_kinds_are_kept_not_rejected() {
        let out = format!("{GOOD}VMKIT-GUEST pci 00:01.0 1af4:1000\n");
        let r = parse_report(&out).unwrap();
        assert_eq!(r.other_lines, vec!["pci 00:01.0 1af4:1000".to_string()]);
    }

    #[test]
    fn panics_are_errors() {
        let out = "VMKIT-GUEST boot=pvh cmdline=\"\"\nVMKIT-GUEST panic exception=6 rip=0x1000 err=0x0\nVMKIT-GUEST exit=3\n";
        assert_eq!(
            parse_report(out),
            Err(ReportError::Panic("exception=6 rip=0x1000 err=0x0".into()))
        );
        let out = "VMKIT-GUEST panic bad hvm_start_info magic at main.rs:10\n";
        assert!(
            matches!(parse_report(out), Err(ReportError::Panic(m)) if m.starts_with("bad hvm"))
        );
    }

    #[test]
    fn missing_lines_are_named() {
        assert_eq!(parse_report(""), Err(ReportError::Missing("boot")));
        let no_exit = GOOD.replace("VMKIT-GUEST exit=0", "");
        assert_eq!(parse_report(&no_exit), Err(ReportError::Missing("exit")));
        let no_topo = GOOD.replace("VMKIT-GUEST topo", "topo");
        assert_eq!(parse_report(&no_topo), Err(ReportError::Missing("topo")));
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "VMKIT-GUEST boot=efi cmdline=\"\"",
            "VMKIT-GUEST boot=pvh",
            "VMKIT-GUEST boot=pvh cmdline=\"unterminated",
            "VMKIT-GUEST cpus=x expected=1 apic_ids=0 x2apic=0",
            "VMKIT-GUEST cpus=1 expected=1 apic_ids=0 x2apic=2",
            "VMKIT-GUEST cpus=1 expected=1 x2apic=0",
            "VMKIT-GUEST cpus=1 cpus=1 expected=1 apic_ids=0 x2apic=0",
            "VMKIT-GUEST cpus=1 expected=1 apic_ids=3-1 x2apic=0",
            "VMKIT-GUEST cpus=1 expected=1 apic_ids=0-4294967295 x2apic=0",
            "VMKIT-GUEST cpus=1 expected=1 apic_ids=2,1 x2apic=0",
            "VMKIT-GUEST cpus=1 expected=1 apic_ids=0 x2apic",
            "VMKIT-GUEST topo smt_bits=1 core_bits=-1 consistent=1",
            "VMKIT-GUEST topo smt_bits=1 consistent=1",
            "VMKIT-GUEST exit=256",
            "VMKIT-GUEST exit=0 trailing",
            "VMKIT-GUEST debug novalue",
        ] {
            assert!(
                matches!(parse_report(bad), Err(ReportError::Malformed { .. })),
                "{bad:?} gave {:?}",
                parse_report(bad)
            );
        }
    }

    #[test]
    fn apic_id_ranges() {
        assert_eq!(parse_apic_ids("-").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_apic_ids("7").unwrap(), vec![7]);
        assert_eq!(parse_apic_ids("0-2,4,6-7").unwrap(), vec![0, 1, 2, 4, 6, 7]);
        assert_eq!(parse_apic_ids("4294967295").unwrap(), vec![u32::MAX]);
        assert!(parse_apic_ids("").is_err());
        assert!(parse_apic_ids("1,,2").is_err());
        assert!(parse_apic_ids("1-2-3").is_err());
        assert!(parse_apic_ids("0-3,3").is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(s in ".{0,400}") {
            let _ = parse_report(&s);
        }

        #[test]
        fn never_panics_on_report_like_text(
            lines in proptest::collection::vec(
                "VMKIT-GUEST (boot=|cpus=|topo |exit=|debug |panic )[ -~]{0,60}", 0..8)
        ) {
            let _ = parse_report(&lines.join("\n"));
        }
    }
}
