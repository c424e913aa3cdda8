// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ACPI: find the RSDP, walk the XSDT (or RSDT), parse the MADT.
//!
//! Every length, count and pointer comes from VMM-provided memory and is checked: tables must
//! have a valid checksum and a sane length, entries must lie inside their table, and a failed
//! read means "not there". Nothing here can panic on garbage.

use super::physmem::{ApicIdSet, PhysMem};

/// Largest table accepted (a MADT with 4096 x2APIC entries is 64 KiB).
pub const MAX_TABLE_LEN: u32 = 1 << 20;
const SDT_HEADER_LEN: u32 = 36;
/// Addresses at or above this are rejected up front, so that adding a table offset or length
/// (both < 2^32) can never overflow.
pub const ADDR_LIMIT: u64 = 1 << 63;
/// Most I/O APICs remembered from the MADT.
pub const MAX_IOAPICS: usize = 8;

/// An I/O APIC listed in the MADT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoApic {
    /// I/O APIC ID.
    pub id: u8,
    /// MMIO base address.
    pub address: u32,
    /// First GSI it serves.
    pub gsi_base: u32,
}

/// What the MADT says besides the CPU list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MadtInfo {
    /// Local APIC MMIO address (after any type-5 override).
    pub lapic_address: u64,
    /// MADT flags (bit 0: PC-AT compatible dual 8259 present).
    pub flags: u32,
    /// I/O APICs, `ioapic_count` of them valid.
    pub ioapics: [IoApic; MAX_IOAPICS],
    /// Number of valid entries in `ioapics`.
    pub ioapic_count: usize,
    /// Enabled Local APIC (type 0) entries seen.
    pub lapic_entries: u32,
    /// Enabled Local x2APIC (type 9) entries seen.
    pub x2apic_entries: u32,
}

/// A signature as the little-endian integer its bytes form (one load and compare instead of
/// a byte-wise comparison: every guest instruction counts when KVM emulates them).
const fn sig32(s: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*s)
}

const RSDP_SIGNATURE: u64 = u64::from_le_bytes(*b"RSD PTR ");

/// Checks an RSDP candidate; returns the address of the root table and whether it is an XSDT.
fn check_rsdp(mem: &impl PhysMem, addr: u64) -> Option<(u64, bool)> {
    if addr >= ADDR_LIMIT || mem.read_u64(addr)? != RSDP_SIGNATURE {
        return None;
    }
    // ACPI 1.0 checksum: the first 20 bytes.
    if mem.checksum(addr, 20)? != 0 {
        return None;
    }
    let revision = mem.read_u8(addr + 15)?;
    if revision >= 2 {
        let length = mem.read_u32(addr + 20)?;
        let xsdt = mem.read_u64(addr + 24)?;
        // Extended checksum over `length` bytes: the first 20 sum to 0 (checked above), so
        // the whole sums to 0 exactly when the rest does.
        if (36..=4096).contains(&length)
            && xsdt != 0
            && mem.checksum(addr + 20, u64::from(length) - 20) == Some(0)
        {
            return Some((xsdt, true));
        }
    }
    let rsdt = mem.read_u32(addr + 16)?;
    (rsdt != 0).then_some((u64::from(rsdt), false))
}

/// Scans `[start, start+len)` on 16-byte boundaries for a valid RSDP (one 8-byte compare per
/// candidate: the scan is the guest's slowest loop when it is emulated).
fn scan_rsdp(mem: &impl PhysMem, start: u64, len: u64) -> Option<u64> {
    (0..len / 16)
        .map(|i| start + i * 16)
        .find(|a| mem.read_u64(*a) == Some(RSDP_SIGNATURE) && check_rsdp(mem, *a).is_some())
}

/// Scans the first KiB of the EBDA, then the BIOS area `0xE0000..0xFFFFF`, for the RSDP.
fn scan_for_rsdp(mem: &impl PhysMem) -> Option<u64> {
    if let Some(seg) = mem.read_u16(0x40E) {
        let ebda = u64::from(seg) << 4;
        if (0x8_0000..0xA_0000).contains(&ebda) {
            if let Some(a) = scan_rsdp(mem, ebda, 1024) {
                return Some(a);
            }
        }
    }
    scan_rsdp(mem, 0xE_0000, 0x2_0000)
}

/// Finds the RSDP: `hint` first (the address the VMM passed), then the first KiB of the EBDA,
/// then the BIOS area `0xE0000..0xFFFFF`.
#[allow(dead_code)] // the guest goes through `discover_cpus`; tested on the host
pub fn find_rsdp(mem: &impl PhysMem, hint: Option<u64>) -> Option<u64> {
    if let Some(h) = hint {
        if check_rsdp(mem, h).is_some() {
            return Some(h);
        }
    }
    scan_for_rsdp(mem)
}

/// [`find_rsdp`], returning what [`check_rsdp`] found there (the RSDP is checked once).
fn find_root(mem: &impl PhysMem, hint: Option<u64>) -> Option<(u64, bool)> {
    if let Some(root) = hint.and_then(|h| check_rsdp(mem, h)) {
        return Some(root);
    }
    check_rsdp(mem, scan_for_rsdp(mem)?)
}

/// Validates a system description table header at `addr`; returns its length.
fn check_sdt(mem: &impl PhysMem, addr: u64) -> Option<u32> {
    if addr >= ADDR_LIMIT {
        return None;
    }
    let length = mem.read_u32(addr + 4)?;
    if !(SDT_HEADER_LEN..=MAX_TABLE_LEN).contains(&length) {
        return None;
    }
    (mem.checksum(addr, u64::from(length))? == 0).then_some(length)
}

/// Finds the table with `signature` through the RSDP at `rsdp`; returns its address (the
/// table's header, length and checksum have been checked). (Unused by the guest so far; the
/// PCI work will look up MCFG with it. Tested on the host.)
#[allow(dead_code)]
pub fn find_table(mem: &impl PhysMem, rsdp: u64, signature: &[u8; 4]) -> Option<u64> {
    let (root, xsdt) = check_rsdp(mem, rsdp)?;
    find_in_root(mem, root, xsdt, signature).map(|(addr, _)| addr)
}

/// Finds the table with `signature` listed by the root table (XSDT or RSDT) at `root`;
/// returns its address and checked length.
fn find_in_root(
    mem: &impl PhysMem,
    root: u64,
    xsdt: bool,
    signature: &[u8; 4],
) -> Option<(u64, u32)> {
    if root >= ADDR_LIMIT {
        return None;
    }
    let root_sig = if xsdt { sig32(b"XSDT") } else { sig32(b"RSDT") };
    if mem.read_u32(root)? != root_sig {
        return None;
    }
    let length = check_sdt(mem, root)?;
    let entry_size = if xsdt { 8 } else { 4 };
    let count = (length - SDT_HEADER_LEN) / entry_size;
    let wanted = sig32(signature);
    for i in 0..count {
        let at = root + u64::from(SDT_HEADER_LEN + i * entry_size);
        let table = if xsdt {
            mem.read_u64(at)?
        } else {
            u64::from(mem.read_u32(at)?)
        };
        if table != 0 && mem.read_u32(table) == Some(wanted) {
            if let Some(len) = check_sdt(mem, table) {
                return Some((table, len));
            }
        }
    }
    None
}

/// Parses the MADT at `madt` (validating it first): adds the APIC ID of every enabled Local APIC (type 0) and Local
/// x2APIC (type 9) entry to `cpus`. Returns `None` if the table is not a valid MADT.
#[allow(dead_code)] // the guest goes through `discover_cpus`; tested on the host
pub fn parse_madt<const N: usize>(
    mem: &impl PhysMem,
    madt: u64,
    cpus: &mut ApicIdSet<N>,
) -> Option<MadtInfo> {
    if madt >= ADDR_LIMIT || mem.read_u32(madt) != Some(sig32(b"APIC")) {
        return None;
    }
    let length = check_sdt(mem, madt)?;
    parse_checked_madt(mem, madt, length, cpus)
}

/// [`parse_madt`] for a table whose header and checksum were already checked.
///
/// Each entry's first 8 bytes are read with one load when they lie inside the table: that
/// is the whole of a Local APIC entry (type, length, UID, APIC ID, flags), the entry that
/// repeats once per CPU.
fn parse_checked_madt<const N: usize>(
    mem: &impl PhysMem,
    madt: u64,
    length: u32,
    cpus: &mut ApicIdSet<N>,
) -> Option<MadtInfo> {
    if length < 44 || madt >= ADDR_LIMIT {
        return None;
    }
    let mut info = MadtInfo {
        lapic_address: u64::from(mem.read_u32(madt + 36)?),
        flags: mem.read_u32(madt + 40)?,
        ..MadtInfo::default()
    };
    let end = madt + u64::from(length);
    let mut at = madt + 44;
    while at + 2 <= end {
        let (next, enabled) = lapic_run(mem, at, end, cpus)?;
        at = next;
        info.lapic_entries += enabled;
        if at + 2 > end {
            break;
        }
        let head = if at + 8 <= end {
            mem.read_u64(at)?
        } else {
            u64::from(mem.read_u16(at)?)
        };
        let kind = head as u8;
        let len = (head >> 8) & 0xFF;
        if len < 2 || at + len > end {
            break;
        }
        match kind {
            // Flags (bytes 4..8) bit 0: enabled. APIC ID: byte 3.
            0 if len >= 8 && (head >> 32) & 1 != 0 => {
                cpus.insert(((head >> 24) & 0xFF) as u32);
                info.lapic_entries += 1;
            }
            1 if len >= 12 && info.ioapic_count < MAX_IOAPICS => {
                info.ioapics[info.ioapic_count] = IoApic {
                    id: (head >> 16) as u8,
                    address: (head >> 32) as u32,
                    gsi_base: mem.read_u32(at + 8)?,
                };
                info.ioapic_count += 1;
            }
            5 if len >= 12 => info.lapic_address = mem.read_u64(at + 4)?,
            9 if len >= 16 => {
                let id = (head >> 32) as u32;
                let flags = mem.read_u32(at + 8)?;
                if flags & 1 != 0 {
                    cpus.insert(id);
                    info.x2apic_entries += 1;
                }
            }
            _ => {}
        }
        at += len;
    }
    Some(info)
}

/// Fast path of the MADT walk: a run of Local APIC entries (type 0, length 8: one per CPU)
/// from `at`, handled exactly as the general loop in [`parse_checked_madt`] would. Returns
/// where the run ends and how many enabled entries it had. A function of its own so that its
/// few values live in registers (memory accesses are the expensive emulated instructions).
#[inline(never)]
fn lapic_run<const N: usize>(
    mem: &impl PhysMem,
    mut at: u64,
    end: u64,
    cpus: &mut ApicIdSet<N>,
) -> Option<(u64, u32)> {
    let mut enabled = 0u32;
    let mut unreadable = false;
    cpus.insert_all(core::iter::from_fn(|| {
        while at + 8 <= end {
            let Some(entry) = mem.read_u64(at) else {
                unreadable = true;
                return None;
            };
            if entry & 0xFFFF != 0x0800 {
                return None;
            }
            at += 8;
            // Flags (bytes 4..8) bit 0: enabled. APIC ID: byte 3.
            if (entry >> 32) & 1 != 0 {
                enabled += 1;
                return Some(((entry >> 24) & 0xFF) as u32);
            }
        }
        None
    }));
    (!unreadable).then_some((at, enabled))
}

/// Finds the MADT (via `rsdp_hint` or a scan) and collects the enabled CPUs' APIC IDs.
/// Returns `None` if there is no usable ACPI MADT or it lists no enabled CPU.
pub fn discover_cpus<const N: usize>(
    mem: &impl PhysMem,
    rsdp_hint: Option<u64>,
    cpus: &mut ApicIdSet<N>,
) -> Option<MadtInfo> {
    let (root, xsdt) = find_root(mem, rsdp_hint)?;
    let (madt, length) = find_in_root(mem, root, xsdt, b"APIC")?;
    cpus.clear();
    let info = parse_checked_madt(mem, madt, length, cpus)?;
    if cpus.is_empty() {
        return None;
    }
    Some(info)
}

/// One ECAM region of the MCFG table (PCI segment group 0 only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ecam {
    /// Physical base address of the region (for bus 0, whatever `start_bus` is).
    pub base: u64,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

/// Finds the MCFG table through the RSDP at `rsdp_hint` (or a scan) and returns its first
/// allocation for PCI segment group 0. `None` without a valid MCFG or such an entry.
pub fn find_ecam(mem: &impl PhysMem, rsdp_hint: Option<u64>) -> Option<Ecam> {
    let (root, xsdt) = find_root(mem, rsdp_hint)?;
    let (mcfg, length) = find_in_root(mem, root, xsdt, b"MCFG")?;
    // Header (36), 8 reserved bytes, then 16-byte entries: base u64, segment u16, start bus
    // u8, end bus u8, 4 reserved bytes.
    let mut at = 44u32;
    while at + 16 <= length {
        let e = mcfg + u64::from(at);
        let base = mem.read_u64(e)?;
        let segment = mem.read_u16(e + 8)?;
        let start_bus = mem.read_u8(e + 10)?;
        let end_bus = mem.read_u8(e + 11)?;
        if segment == 0 && start_bus <= end_bus && base != 0 && base < ADDR_LIMIT {
            return Some(Ecam {
                base,
                start_bus,
                end_bus,
            });
        }
        at += 16;
    }
    None
}
