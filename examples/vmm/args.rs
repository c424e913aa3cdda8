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

/// How virtio devices reach the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Modern virtio-pci functions behind the PCI host bridge (MSI-X interrupts).
    Pci,
    /// virtio-mmio (version 2) windows announced in ACPI and on the kernel command line.
    Mmio,
}

/// Host cache behaviour of a disk (`cache=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskCache {
    /// Page cache, flushed on the guest's FLUSH (the guest may toggle writethrough).
    Writeback,
    /// Every write is durable before it completes.
    Writethrough,
    /// O_DIRECT, bypassing the host page cache.
    None,
}

/// One `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub read_only: bool,
    pub cache: DiskCache,
    pub queues: u16,
}

/// Where a console port's data goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortBackendArg {
    /// The VMM's stdin/stdout.
    Stdio,
    /// A Unix socket the VMM listens on.
    Socket(PathBuf),
    /// Output appended to a file.
    File(PathBuf),
    /// A new pseudo-terminal (its path is printed).
    Pty,
}

/// One `--console-port NAME=BACKEND`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsolePortArg {
    pub name: String,
    pub backend: PortBackendArg,
}

/// Parses `PATH[,readonly][,cache=writeback|writethrough|none][,queues=N]`.
pub fn parse_disk(v: &str) -> Result<DiskArg, ArgError> {
    let mut parts = v.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
        ArgError(format!(
            "--disk needs PATH[,readonly][,cache=MODE][,queues=N], got {v:?}"
        ))
    })?;
    let mut disk = DiskArg {
        path: PathBuf::from(path),
        read_only: false,
        cache: DiskCache::Writeback,
        queues: 1,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "readonly" || opt == "ro" => disk.read_only = true,
            Some(("cache", "writeback")) => disk.cache = DiskCache::Writeback,
            Some(("cache", "writethrough")) => disk.cache = DiskCache::Writethrough,
            Some(("cache", "none")) => disk.cache = DiskCache::None,
            Some(("queues", n)) => {
                disk.queues = n
                    .parse()
                    .ok()
                    .filter(|&q: &u16| (1..=256).contains(&q))
                    .ok_or_else(|| {
                        ArgError(format!("--disk {v:?}: queues must be 1..=256, got {n:?}"))
                    })?;
            }
            _ => {
                return Err(ArgError(format!(
                    "--disk {v:?}: unknown option {opt:?} (readonly, cache=writeback|writethrough|none, queues=N)"
                )))
            }
        }
    }
    Ok(disk)
}

/// Parses `NAME=stdio|socket:PATH|file:PATH|pty`.
pub fn parse_console_port(v: &str) -> Result<ConsolePortArg, ArgError> {
    let bad = || {
        ArgError(format!(
            "--console-port takes NAME=stdio|socket:PATH|file:PATH|pty, got {v:?}"
        ))
    };
    let (name, backend) = v.split_once('=').ok_or_else(bad)?;
    if name.is_empty() || name.len() > 255 || name.contains(char::is_control) {
        return Err(bad());
    }
    let backend = if backend == "stdio" {
        PortBackendArg::Stdio
    } else if backend == "pty" {
        PortBackendArg::Pty
    } else if let Some(p) = backend.strip_prefix("socket:").filter(|p| !p.is_empty()) {
        PortBackendArg::Socket(PathBuf::from(p))
    } else if let Some(p) = backend.strip_prefix("file:").filter(|p| !p.is_empty()) {
        PortBackendArg::File(PathBuf::from(p))
    } else {
        return Err(bad());
    };
    Ok(ConsolePortArg {
        name: name.to_owned(),
        backend,
    })
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
    pub transport: Transport,
    pub disks: Vec<DiskArg>,
    pub console_ports: Vec<ConsolePortArg>,
    pub rng: bool,
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
  --transport pci|mmio     how virtio devices are attached (default pci)
  --disk PATH[,readonly][,cache=writeback|writethrough|none][,queues=N]
                           a virtio-blk disk (repeatable; raw images)
  --console-port NAME=stdio|socket:PATH|file:PATH|pty
                           a named virtio-console port (repeatable)
  --rng                    a virtio-rng device fed by the host's getrandom
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
            transport: Transport::Pci,
            disks: Vec::new(),
            console_ports: Vec::new(),
            rng: false,
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
            if flag == "--rng" {
                a.rng = true;
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
                "--transport" => {
                    a.transport = match value()?.as_str() {
                        "pci" => Transport::Pci,
                        "mmio" => Transport::Mmio,
                        v => {
                            return Err(ArgError(format!(
                                "--transport takes pci or mmio, got {v:?}"
                            )))
                        }
                    }
                }
                "--disk" => a.disks.push(parse_disk(&value()?)?),
                "--console-port" => {
                    let port = parse_console_port(&value()?)?;
                    if a.console_ports.iter().any(|p| p.name == port.name) {
                        return Err(ArgError(format!(
                            "--console-port: the name {:?} is used twice",
                            port.name
                        )));
                    }
                    a.console_ports.push(port);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, ArgError> {
        Args::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn disks_ports_rng_and_transport() {
        let a = parse(&[
            "--disk",
            "/tmp/a.img,readonly,cache=none,queues=4",
            "--disk=/tmp/b.img",
            "--console-port",
            "vmkit.echo=socket:/tmp/echo.sock",
            "--console-port=log=file:/tmp/log",
            "--rng",
            "--transport",
            "mmio",
        ])
        .expect("valid")
        .expect("not help");
        assert_eq!(a.transport, Transport::Mmio);
        assert!(a.rng);
        assert_eq!(
            a.disks,
            vec![
                DiskArg {
                    path: "/tmp/a.img".into(),
                    read_only: true,
                    cache: DiskCache::None,
                    queues: 4
                },
                DiskArg {
                    path: "/tmp/b.img".into(),
                    read_only: false,
                    cache: DiskCache::Writeback,
                    queues: 1
                }
            ]
        );
        assert_eq!(a.console_ports[0].name, "vmkit.echo");
        assert_eq!(
            a.console_ports[0].backend,
            PortBackendArg::Socket("/tmp/echo.sock".into())
        );
        assert_eq!(
            a.console_ports[1].backend,
            PortBackendArg::File("/tmp/log".into())
        );
    }

    #[test]
    fn bad_device_flags_are_refused_with_the_reason() {
        let err = |args: &[&str]| match parse(args) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{args:?} must be refused"),
        };
        assert!(err(&["--disk", ""]).contains("--disk needs PATH"));
        assert!(err(&["--disk", "/a,queues=0"]).contains("queues must be 1..=256"));
        assert!(err(&["--disk", "/a,cache=sometimes"]).contains("unknown option"));
        assert!(err(&["--console-port", "noequals"]).contains("--console-port takes"));
        assert!(err(&["--console-port", "p=tcp:1"]).contains("--console-port takes"));
        assert!(
            err(&["--console-port", "p=pty", "--console-port", "p=stdio"]).contains("used twice")
        );
        assert!(err(&["--transport", "isa"]).contains("--transport takes"));
    }
}
