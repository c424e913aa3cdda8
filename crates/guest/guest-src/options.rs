// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Parsing command-line option values: numbers, sizes, address ranges and Linux's
//! `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` syntax. Pure code (host-tested); nothing
//! here panics on any input.

/// Parses a decimal or `0x`-prefixed hexadecimal number.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16u64),
        _ => (s, 10u64),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            b'A'..=b'F' if radix == 16 => c - b'A' + 10,
            _ => return None,
        };
        v = v.checked_mul(radix)?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Parses a size: a number with an optional `K`, `M` or `G` suffix (binary units, either case).
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.split_last() {
        Some((b'k' | b'K', rest)) => (rest, 10),
        Some((b'm' | b'M', rest)) => (rest, 20),
        Some((b'g' | b'G', rest)) => (rest, 30),
        _ => (s, 0),
    };
    // `0x10K` is not a size Linux accepts; keep hex only without a suffix.
    let v = parse_u64(num)?;
    v.checked_mul(1u64 << shift)
}

/// A virtio-mmio device announced on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Size of the register window.
    pub size: u64,
    /// Physical base address.
    pub base: u64,
    /// Interrupt (an IOAPIC GSI).
    pub irq: u32,
}

/// Parses the value of one `virtio_mmio.device=` option: `<size>@<base>:<irq>[:<id>]`.
/// The optional platform-device id is accepted and ignored.
pub fn parse_virtio_mmio(v: &[u8]) -> Option<MmioDevice> {
    let at = v.iter().position(|&b| b == b'@')?;
    let (size, rest) = (v.get(..at)?, v.get(at + 1..)?);
    let mut parts = rest.split(|&b| b == b':');
    let base = parse_u64(parts.next()?)?;
    let irq = parse_u64(parts.next()?)?;
    if let Some(id) = parts.next() {
        parse_u64(id)?;
    }
    if parts.next().is_some() {
        return None;
    }
    let size = parse_size(size)?;
    let irq = u32::try_from(irq).ok()?;
    if size == 0 || base.checked_add(size).is_none() {
        return None;
    }
    Some(MmioDevice { size, base, irq })
}

/// Parses `<start>-<end>` (end exclusive, `start < end`).
pub fn parse_range(v: &[u8]) -> Option<(u64, u64)> {
    let dash = v.iter().position(|&b| b == b'-')?;
    let start = parse_u64(v.get(..dash)?)?;
    let end = parse_u64(v.get(dash + 1..)?)?;
    (start < end).then_some((start, end))
}
