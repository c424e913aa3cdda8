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

/// Checks an RSDP candidate; returns the address of the root table and whether it is an XSDT.
fn check_rsdp(mem: &impl PhysMem, addr: u64) -> Option<(u64, bool)> {
    if addr >= ADDR_LIMIT {
        return None;
    }
    let mut sig = [0u8; 8];
    if !mem.read(addr, &mut sig) || &sig != b"RSD PTR " {
        return None;
    }
    if mem.checksum(addr, 20)? != 0 {
        return None;
    }
    let revision = mem.read_u8(addr + 15)?;
    if revision >= 2 {
        let length = mem.read_u32(addr + 20)?;
        let xsdt = mem.read_u64(addr + 24)?;
        if (36..=4096).contains(&length)
            && xsdt != 0
            && mem.checksum(addr, u64::from(length)) == Some(0)
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
    let sig = u64::from_le_bytes(*b"RSD PTR ");
    (0..len / 16)
        .map(|i| start + i * 16)
        .find(|a| mem.read_u64(*a) == Some(sig) && check_rsdp(mem, *a).is_some())
}

/// Finds the RSDP: `hint` first (the address the VMM passed), then the first KiB of the EBDA,
/// then the BIOS area `0xE0000..0xFFFFF`.
pub fn find_rsdp(mem: &impl PhysMem, hint: Option<u64>) -> Option<u64> {
    if let Some(h) = hint {
        if check_rsdp(mem, h).is_some() {
            return Some(h);
        }
    }
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
    find_checked_table(mem, rsdp, signature).map(|(addr, _)| addr)
}

fn find_checked_table(mem: &impl PhysMem, rsdp: u64, signature: &[u8; 4]) -> Option<(u64, u32)> {
    let (root, xsdt) = check_rsdp(mem, rsdp)?;
    if root >= ADDR_LIMIT {
        return None;
    }
    let mut root_sig = [0u8; 4];
    if !mem.read(root, &mut root_sig) || &root_sig != if xsdt { b"XSDT" } else { b"RSDT" } {
        return None;
    }
    let length = check_sdt(mem, root)?;
    let entry_size = if xsdt { 8 } else { 4 };
    let count = (length - SDT_HEADER_LEN) / entry_size;
    for i in 0..count {
        let at = root + u64::from(SDT_HEADER_LEN + i * entry_size);
        let table = if xsdt {
            mem.read_u64(at)?
        } else {
            u64::from(mem.read_u32(at)?)
        };
        let mut sig = [0u8; 4];
        if table != 0 && mem.read(table, &mut sig) && &sig == signature {
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
    let mut sig = [0u8; 4];
    if madt >= ADDR_LIMIT || !mem.read(madt, &mut sig) || &sig != b"APIC" {
        return None;
    }
    let length = check_sdt(mem, madt)?;
    parse_checked_madt(mem, madt, length, cpus)
}

/// [`parse_madt`] for a table whose header and checksum were already checked.
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
        let kind = mem.read_u8(at)?;
        let len = u64::from(mem.read_u8(at + 1)?);
        if len < 2 || at + len > end {
            break;
        }
        match kind {
            0 if len >= 8 => {
                let id = mem.read_u8(at + 3)?;
                let flags = mem.read_u32(at + 4)?;
                if flags & 1 != 0 {
                    cpus.insert(u32::from(id));
                    info.lapic_entries += 1;
                }
            }
            1 if len >= 12 && info.ioapic_count < MAX_IOAPICS => {
                info.ioapics[info.ioapic_count] = IoApic {
                    id: mem.read_u8(at + 2)?,
                    address: mem.read_u32(at + 4)?,
                    gsi_base: mem.read_u32(at + 8)?,
                };
                info.ioapic_count += 1;
            }
            5 if len >= 12 => info.lapic_address = mem.read_u64(at + 4)?,
            9 if len >= 16 => {
                let id = mem.read_u32(at + 4)?;
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

/// Finds the MADT (via `rsdp_hint` or a scan) and collects the enabled CPUs' APIC IDs.
/// Returns `None` if there is no usable ACPI MADT or it lists no enabled CPU.
pub fn discover_cpus<const N: usize>(
    mem: &impl PhysMem,
    rsdp_hint: Option<u64>,
    cpus: &mut ApicIdSet<N>,
) -> Option<MadtInfo> {
    let rsdp = find_rsdp(mem, rsdp_hint)?;
    let (madt, length) = find_checked_table(mem, rsdp, b"APIC")?;
    cpus.clear();
    let info = parse_checked_madt(mem, madt, length, cpus)?;
    if cpus.is_empty() {
        return None;
    }
    Some(info)
}
