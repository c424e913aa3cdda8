// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The machine-readable report lines (parsed on the host by `vmkit_guest::parse_report`).
//!
//! ```text
//! VMKIT-GUEST boot=<pvh|linux64> cmdline="<cmdline, truncated to 200 chars>"
//! VMKIT-GUEST cpus=<online incl. BSP> expected=<n> apic_ids=<ranges> x2apic=<0|1>
//! VMKIT-GUEST topo smt_bits=<n> core_bits=<n> consistent=<0|1>
//! VMKIT-GUEST exit=<code>
//! ```
//!
//! Formatting is done by hand ([`Sink`]) instead of `core::fmt`: the precompiled `core`
//! formats integers with SSE instructions that this host's KVM instruction emulator cannot
//! execute.

/// Prefix of every report line.
pub const PREFIX: &str = "VMKIT-GUEST";
/// Most command-line bytes printed.
pub const CMDLINE_REPORT_MAX: usize = 200;

/// A byte sink with integer formatting.
pub trait Sink {
    /// Writes raw bytes.
    fn put(&mut self, bytes: &[u8]);

    /// Writes a string.
    fn put_str(&mut self, s: &str) {
        self.put(s.as_bytes());
    }

    /// Writes `v` in decimal.
    fn put_dec(&mut self, mut v: u64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.put(&buf[i..]);
    }

    /// Writes `v` as `0x` and lowercase hex digits.
    fn put_hex(&mut self, mut v: u64) {
        let mut buf = [0u8; 18];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b"0123456789abcdef"[(v & 0xF) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        i -= 1;
        buf[i] = b'x';
        i -= 1;
        buf[i] = b'0';
        self.put(&buf[i..]);
    }
}

/// Writes the boot line. Bytes that are not printable ASCII, and `"`, are printed as `?`.
pub fn write_boot_line(w: &mut impl Sink, protocol: &str, cmdline: &[u8]) {
    w.put_str(PREFIX);
    w.put_str(" boot=");
    w.put_str(protocol);
    w.put_str(" cmdline=\"");
    for &b in cmdline.iter().take(CMDLINE_REPORT_MAX) {
        let c = if (0x20..0x7F).contains(&b) && b != b'"' {
            b
        } else {
            b'?'
        };
        w.put(&[c]);
    }
    w.put_str("\"\n");
}

/// Writes ascending `ids` as compact ranges: `0-3,8,10-11` (`-` for none).
pub fn write_ranges(w: &mut impl Sink, ids: &[u32]) {
    if ids.is_empty() {
        w.put_str("-");
        return;
    }
    let mut i = 0;
    let mut first = true;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && end.checked_add(1) == Some(ids[i + 1]) {
            i += 1;
            end = ids[i];
        }
        if !first {
            w.put_str(",");
        }
        first = false;
        w.put_dec(u64::from(start));
        if start != end {
            w.put_str("-");
            w.put_dec(u64::from(end));
        }
        i += 1;
    }
}

/// Writes the CPU line; `ids` must be ascending.
pub fn write_cpus_line(w: &mut impl Sink, cpus: u32, expected: u32, ids: &[u32], x2apic: bool) {
    w.put_str(PREFIX);
    w.put_str(" cpus=");
    w.put_dec(u64::from(cpus));
    w.put_str(" expected=");
    w.put_dec(u64::from(expected));
    w.put_str(" apic_ids=");
    write_ranges(w, ids);
    w.put_str(" x2apic=");
    w.put_dec(u64::from(x2apic));
    w.put_str("\n");
}

/// Writes the topology line.
pub fn write_topo_line(w: &mut impl Sink, smt_bits: u32, core_bits: u32, consistent: bool) {
    w.put_str(PREFIX);
    w.put_str(" topo smt_bits=");
    w.put_dec(u64::from(smt_bits));
    w.put_str(" core_bits=");
    w.put_dec(u64::from(core_bits));
    w.put_str(" consistent=");
    w.put_dec(u64::from(consistent));
    w.put_str("\n");
}

/// Writes the exit line.
pub fn write_exit_line(w: &mut impl Sink, code: u8) {
    w.put_str(PREFIX);
    w.put_str(" exit=");
    w.put_dec(u64::from(code));
    w.put_str("\n");
}

/// Writes the exception panic line.
pub fn write_exception_line(w: &mut impl Sink, vector: u8, rip: u64, error: u64) {
    w.put_str(PREFIX);
    w.put_str(" panic exception=");
    w.put_dec(u64::from(vector));
    w.put_str(" rip=");
    w.put_hex(rip);
    w.put_str(" err=");
    w.put_hex(error);
    w.put_str("\n");
}

/// Prefix of the PCI summary line (see `abi.rs` on the host side for every device line).
pub const PCI_PREFIX: &str = "VMKIT-PCI";
/// Prefix of the per-function PCI line.
pub const PCI_DEV_PREFIX: &str = "VMKIT-PCI-DEV";
/// Prefix of the virtio-blk verification line.
pub const BLK_PREFIX: &str = "VMKIT-VIRTIO-BLK";
/// Prefix of the virtio-blk benchmark line.
pub const BLK_BENCH_PREFIX: &str = "VMKIT-VIRTIO-BLK-BENCH";
/// Prefix of the virtio-console echo line.
pub const CONSOLE_PREFIX: &str = "VMKIT-VIRTIO-CONSOLE";
/// Prefix of the virtio-rng line.
pub const RNG_PREFIX: &str = "VMKIT-VIRTIO-RNG";
/// Prefix of the line for a virtio device the guest could not drive.
pub const VIRTIO_ERROR_PREFIX: &str = "VMKIT-VIRTIO-ERROR";
/// Prefix of the interrupt-distribution line.
pub const MSIX_PREFIX: &str = "VMKIT-MSIX";

/// Starts a `key=value` report line with `prefix`.
pub fn begin(w: &mut impl Sink, prefix: &str) {
    w.put_str(prefix);
}

/// Writes ` key=<decimal>`.
pub fn field_dec(w: &mut impl Sink, key: &str, v: u64) {
    w.put_str(" ");
    w.put_str(key);
    w.put_str("=");
    w.put_dec(v);
}

/// Writes ` key=<0x hex>`.
pub fn field_hex(w: &mut impl Sink, key: &str, v: u64) {
    w.put_str(" ");
    w.put_str(key);
    w.put_str("=");
    w.put_hex(v);
}

/// Writes ` key=<word>`; bytes that are not printable ASCII, space, `=` and `"` become `?`
/// (so the line still splits into `key=value` tokens).
pub fn field_str(w: &mut impl Sink, key: &str, v: &[u8]) {
    w.put_str(" ");
    w.put_str(key);
    w.put_str("=");
    if v.is_empty() {
        w.put_str("-");
    }
    for &b in v.iter().take(64) {
        let c = if (0x21..0x7F).contains(&b) && b != b'"' && b != b'=' {
            b
        } else {
            b'?'
        };
        w.put(&[c]);
    }
}

/// Writes ` key=<n>.<nn>` for a value given in hundredths.
pub fn field_centi(w: &mut impl Sink, key: &str, hundredths: u64) {
    field_dec(w, key, hundredths / 100);
    let frac = hundredths % 100;
    w.put_str(if frac < 10 { ".0" } else { "." });
    w.put_dec(frac);
}

/// Writes ` key=<bb>:<dd>.<f>` (hex bus and device, as `lspci` prints them).
pub fn field_bdf(w: &mut impl Sink, key: &str, bus: u8, dev: u8, func: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    w.put_str(" ");
    w.put_str(key);
    w.put_str("=");
    w.put(&[
        HEX[usize::from(bus >> 4)],
        HEX[usize::from(bus & 0xF)],
        b':',
        HEX[usize::from((dev >> 4) & 1)],
        HEX[usize::from(dev & 0xF)],
        b'.',
        b'0' + (func & 7),
    ]);
}

/// Ends a report line.
pub fn end(w: &mut impl Sink) {
    w.put_str("\n");
}
