// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Intel MultiProcessor Specification table: the fallback CPU list when there is no ACPI.
//!
//! Finds the `_MP_` floating pointer (first KiB of the EBDA, last KiB of base memory, BIOS
//! area `0xF0000..0xFFFFF`), checks it and the `PCMP` configuration table, and collects the
//! local APIC IDs of enabled processor entries. All reads are bounds-checked.

use super::physmem::{ApicIdSet, PhysMem};

const ADDR_LIMIT: u64 = 1 << 63;

fn check_floating(mem: &impl PhysMem, addr: u64) -> bool {
    let mut sig = [0u8; 4];
    if !mem.read(addr, &mut sig) || &sig != b"_MP_" {
        return false;
    }
    let Some(len16) = mem.read_u8(addr + 8) else {
        return false;
    };
    len16 != 0 && mem.checksum(addr, u64::from(len16) * 16) == Some(0)
}

fn scan(mem: &impl PhysMem, start: u64, len: u64) -> Option<u64> {
    let sig = u32::from_le_bytes(*b"_MP_");
    (0..len / 16)
        .map(|i| start + i * 16)
        .find(|a| mem.read_u32(*a) == Some(sig) && check_floating(mem, *a))
}

/// Finds the MP floating pointer structure.
pub fn find_floating_pointer(mem: &impl PhysMem) -> Option<u64> {
    if let Some(seg) = mem.read_u16(0x40E) {
        let ebda = u64::from(seg) << 4;
        if (0x8_0000..0xA_0000).contains(&ebda) {
            if let Some(a) = scan(mem, ebda, 1024) {
                return Some(a);
            }
        }
    }
    if let Some(kib) = mem.read_u16(0x413) {
        let top = u64::from(kib) * 1024;
        if (0x8_0400..=0xA_0000).contains(&top) {
            if let Some(a) = scan(mem, top - 1024, 1024) {
                return Some(a);
            }
        }
    }
    scan(mem, 0xF_0000, 0x1_0000)
}

/// Collects the APIC IDs of enabled processors from the MP table. Returns `false` if there is
/// no valid MP table or it lists no enabled processor.
pub fn discover_cpus<const N: usize>(mem: &impl PhysMem, cpus: &mut ApicIdSet<N>) -> bool {
    let Some(fp) = find_floating_pointer(mem) else {
        return false;
    };
    let (Some(config), Some(default_config)) = (mem.read_u32(fp + 4), mem.read_u8(fp + 11)) else {
        return false;
    };
    cpus.clear();
    if config == 0 {
        // Default configurations (MP spec chapter 5) all have two processors, APIC IDs 0 and 1.
        if default_config == 0 {
            return false;
        }
        cpus.insert(0);
        cpus.insert(1);
        return true;
    }
    parse_config_table(mem, u64::from(config), cpus) && !cpus.is_empty()
}

/// Parses a `PCMP` configuration table at `addr`, adding enabled processors to `cpus`.
pub fn parse_config_table<const N: usize>(
    mem: &impl PhysMem,
    addr: u64,
    cpus: &mut ApicIdSet<N>,
) -> bool {
    let mut sig = [0u8; 4];
    if addr >= ADDR_LIMIT || !mem.read(addr, &mut sig) || &sig != b"PCMP" {
        return false;
    }
    let (Some(length), Some(count)) = (mem.read_u16(addr + 4), mem.read_u16(addr + 34)) else {
        return false;
    };
    if length < 44 || mem.checksum(addr, u64::from(length)) != Some(0) {
        return false;
    }
    let end = addr + u64::from(length);
    let mut at = addr + 44;
    for _ in 0..count {
        let Some(kind) = mem.read_u8(at) else { break };
        let size = match kind {
            0 => 20,
            1..=4 => 8,
            _ => break,
        };
        if at + size > end {
            break;
        }
        if kind == 0 {
            let (Some(id), Some(flags)) = (mem.read_u8(at + 1), mem.read_u8(at + 3)) else {
                break;
            };
            if flags & 1 != 0 {
                cpus.insert(u32::from(id));
            }
        }
        at += size;
    }
    true
}
