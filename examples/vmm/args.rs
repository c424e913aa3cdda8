// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Command-line parsing for the example VMM (hand-rolled: the flag set is small).

use std::path::PathBuf;

/// Where COM1 output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialTarget {
    /// The VMM's stdout (and input from stdin).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// A Unix socket the VMM listens on.
    Socket(PathBuf),
}

/// Everything the command line says.
#[derive(Clone, Debug)]
pub struct Args {
    pub cpus: u32,
    pub sockets: Option<u32>,
    pub threads_per_core: u32,
    pub memory: u64,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub serial: SerialTarget,
    pub boot_protocol: Option<String>,
    pub remove_cpuid: Vec<String>,
    pub timestamps: bool,
    pub dump_guest: Option<PathBuf>,
    pub stop_on: Option<String>,
    pub x2apic: bool,
}

pub const USAGE: &str = "\
usage: vmm [options]
  --cpus N                 number of vCPUs (default 1)
  --sockets N              sockets in the CPU topology (default 1)
  --threads-per-core N     SMT threads per core (default 1)
  --memory SIZE            guest RAM, e.g. 512M, 1G (default 512M)
  --kernel PATH            bzImage or ELF (PVH note or 64-bit entry); default: the embedded test guest
  --initramfs PATH         initramfs to load with the kernel
  --cmdline STR            kernel command line
  --boot pvh|linux64       force a boot protocol for an ELF kernel (default: PVH when the ELF has the note)
  --serial stdout|file:PATH|socket:PATH   where COM1 goes (default stdout)
  --cpuid-remove LIST      comma-separated CPUID features to hide (default: cx16, which this host's KVM cannot emulate)
  --timestamps             print POST-port (0x80) timestamps and a boot timing line to stderr
  --x2apic                 start every LAPIC in x2APIC mode, as firmware does for large machines
                           (always on when an APIC ID exceeds 254)
  --stop-on TEXT           stop the VM (exit 0) once the guest prints TEXT on COM1
  --dump-guest PATH        write the embedded test guest ELF to PATH and exit
  -h, --help               this text";

/// A command-line problem, with the message to print.
#[derive(Debug, thiserror::Error)]
#[error("{0}\n\n{USAGE}")]
pub struct ArgError(String);

/// Parses sizes like `512M`, `1G`, `1048576`, `64K`.
pub fn parse_size(s: &str) -> Result<u64, ArgError> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(ArgError(format!("bad size {s:?}: unknown suffix {c:?}"))),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| ArgError(format!("bad size {s:?}: not a number")))?;
    n.checked_mul(mult)
        .ok_or_else(|| ArgError(format!("bad size {s:?}: too large")))
}

fn parse_u32(flag: &str, v: &str) -> Result<u32, ArgError> {
    v.parse()
        .map_err(|_| ArgError(format!("{flag} needs a number, got {v:?}")))
}

impl Args {
    /// Parses `argv` (without the program name). `Ok(None)` means help was printed.
    pub fn parse(argv: impl IntoIterator<Item = String>) -> Result<Option<Args>, ArgError> {
        let mut a = Args {
            cpus: 1,
            sockets: None,
            threads_per_core: 1,
            memory: 512 << 20,
            kernel: None,
            initramfs: None,
            cmdline: None,
            serial: SerialTarget::Stdout,
            boot_protocol: None,
            remove_cpuid: vec!["cx16".to_owned()],
            timestamps: false,
            dump_guest: None,
            stop_on: None,
            x2apic: false,
        };
        let mut it = argv.into_iter();
        while let Some(flag) = it.next() {
            if flag == "-h" || flag == "--help" {
                println!("{USAGE}");
                return Ok(None);
            }
            if flag == "--timestamps" {
                a.timestamps = true;
                continue;
            }
            if flag == "--x2apic" {
                a.x2apic = true;
                continue;
            }
            let (flag, inline) = match flag.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (flag, None),
            };
            let mut value = || -> Result<String, ArgError> {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| ArgError(format!("{flag} needs a value")))
            };
            match flag.as_str() {
                "--cpus" => a.cpus = parse_u32(&flag, &value()?)?,
                "--sockets" => a.sockets = Some(parse_u32(&flag, &value()?)?),
                "--threads-per-core" => a.threads_per_core = parse_u32(&flag, &value()?)?,
                "--memory" => a.memory = parse_size(&value()?)?,
                "--kernel" => a.kernel = Some(PathBuf::from(value()?)),
                "--initramfs" => a.initramfs = Some(PathBuf::from(value()?)),
                "--cmdline" => a.cmdline = Some(value()?),
                "--boot" => {
                    let v = value()?;
                    if v != "pvh" && v != "linux64" {
                        return Err(ArgError(format!("--boot takes pvh or linux64, got {v:?}")));
                    }
                    a.boot_protocol = Some(v);
                }
                "--serial" => {
                    let v = value()?;
                    a.serial = if v == "stdout" {
                        SerialTarget::Stdout
                    } else if let Some(p) = v.strip_prefix("file:") {
                        SerialTarget::File(PathBuf::from(p))
                    } else if let Some(p) = v.strip_prefix("socket:") {
                        SerialTarget::Socket(PathBuf::from(p))
                    } else {
                        return Err(ArgError(format!(
                            "--serial takes stdout, file:PATH or socket:PATH, got {v:?}"
                        )));
                    };
                }
                "--cpuid-remove" => {
                    a.remove_cpuid = value()?
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect();
                }
                "--stop-on" => a.stop_on = Some(value()?),
                "--dump-guest" => a.dump_guest = Some(PathBuf::from(value()?)),
                other => return Err(ArgError(format!("unknown option {other:?}"))),
            }
        }
        if a.cpus == 0 {
            return Err(ArgError("--cpus must be at least 1".into()));
        }
        if a.initramfs.is_some() && a.kernel.is_none() {
            return Err(ArgError("--initramfs needs --kernel".into()));
        }
        Ok(Some(a))
    }
}
