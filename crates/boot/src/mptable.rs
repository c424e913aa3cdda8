// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Intel MultiProcessor Specification 1.4 table: floating pointer at
//! [`MPTABLE_START`] followed by the configuration table.
//!
//! Contents: one processor entry per APIC ID below 255 (the first ID of the list is the
//! bootstrap processor; IDs of 255 and above cannot be described here and are left to the
//! ACPI MADT), an ISA bus, the IOAPIC, I/O interrupt entries for ISA IRQs 0-15 (IRQ 0 on
//! IOAPIC pin 2, matching the MADT's interrupt source override; IRQ 2 is the cascade and
//! has no entry; pin 0 carries the 8259's ExtINT) and the local interrupts LINT0 = ExtINT,
//! LINT1 = NMI.

use std::collections::HashSet;

use vm_memory::GuestMemoryBackend;

use crate::error::{Error, Result};
use crate::guest::write_bytes;
use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_LIMIT, MPTABLE_START};

/// ISA IRQ that the timer (PIT, IRQ 0) is rerouted to on the IOAPIC. Shared with the MADT.
pub const TIMER_GSI: u8 = 2;
/// Number of ISA IRQs described.
pub const ISA_IRQS: u8 = 16;
/// ISA IRQ of the ACPI SCI; level triggered, active high (shared with the MADT).
pub const SCI_IRQ: u8 = 9;

const FLOATING_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU | APIC
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity active high (01) | trigger level (11 << 2).
const FLAGS_LEVEL_HIGH: u16 = 0x000d;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xff;

/// Largest APIC ID the MP table can describe.
pub const MP_MAX_APIC_ID: u32 = 254;

/// A built MP table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpTable {
    /// Guest address of the floating pointer.
    pub addr: u64,
    /// Floating pointer followed by the configuration table.
    pub bytes: Vec<u8>,
    /// Number of processor entries.
    pub cpus: usize,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// ISA IRQ -> IOAPIC pin used by both the MP table and the MADT.
pub fn isa_irq_to_gsi(irq: u8) -> u8 {
    if irq == 0 {
        TIMER_GSI
    } else {
        irq
    }
}

/// Builds the MP table for `apic_ids` (first = bootstrap processor) and the IOAPIC
/// `ioapic_id` at the default address, to live at [`MPTABLE_START`].
///
/// Errors: empty list, duplicate IDs, no ID below 255, IOAPIC ID 255, or a table that would
/// reach the ACPI area.
pub fn build_mptable(apic_ids: &[u32], ioapic_id: u8) -> Result<MpTable> {
    const TABLE: &str = "MP table";
    if apic_ids.is_empty() {
        return Err(Error::NoCpus { table: TABLE });
    }
    let mut seen = HashSet::with_capacity(apic_ids.len());
    for &id in apic_ids {
        if !seen.insert(id) {
            return Err(Error::DuplicateApicId(id));
        }
    }
    if ioapic_id == 0xff {
        return Err(Error::InvalidConfig {
            what: "IOAPIC ID",
            reason: "255 is the broadcast ID".into(),
        });
    }
    let cpus: Vec<u8> = apic_ids
        .iter()
        .filter(|&&id| id <= MP_MAX_APIC_ID)
        .map(|&id| id as u8)
        .collect();
    if cpus.is_empty() {
        return Err(Error::InvalidApicId {
            id: apic_ids[0],
            reason: "the MP table needs at least one APIC ID below 255",
        });
    }
    let bsp = if apic_ids[0] <= MP_MAX_APIC_ID {
        Some(apic_ids[0] as u8)
    } else {
        None
    };

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for &id in &cpus {
        let mut flags = 1u8; // enabled
        if Some(id) == bsp {
            flags |= 2; // bootstrap processor
        }
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    let mut io_int = |int_type: u8, flags: u16, irq: u8, pin: u8| {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, int_type]);
        entries.extend_from_slice(&flags.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, pin]);
        count += 1;
    };
    io_int(INT_TYPE_EXTINT, 0, 0, 0);
    for irq in 0..ISA_IRQS {
        if irq == TIMER_GSI {
            continue; // cascade; its pin carries IRQ 0
        }
        let flags = if irq == SCI_IRQ { FLAGS_LEVEL_HIGH } else { 0 };
        io_int(INT_TYPE_INT, flags, irq, isa_irq_to_gsi(irq));
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, int_type, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, lint]);
        count += 1;
    }

    let table_len = HEADER_SIZE + entries.len();
    let total = FLOATING_SIZE + table_len;
    if MPTABLE_START + total as u64 > MPTABLE_LIMIT {
        return Err(Error::TableAreaFull {
            what: "MP table",
            size: total as u64,
            start: MPTABLE_START,
            end: MPTABLE_LIMIT,
        });
    }
    let config_addr = MPTABLE_START + FLOATING_SIZE as u64;

    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum
    header.extend_from_slice(b"VMKIT   ");
    header.extend_from_slice(b"VMKIT-BOOT  ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    debug_assert_eq!(header.len(), HEADER_SIZE);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_SIZE);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(config_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // spec revision 1.4
    floating.push(0); // checksum
    floating.extend_from_slice(&[0u8; 5]); // feature bytes: configuration table present
    floating[10] = checksum(&floating);

    let mut bytes = floating;
    bytes.extend_from_slice(&table);
    Ok(MpTable {
        addr: MPTABLE_START,
        bytes,
        cpus: cpus.len(),
    })
}

/// Builds the MP table and writes it to guest memory.
pub fn write_mptable<M: GuestMemoryBackend>(
    mem: &M,
    apic_ids: &[u32],
    ioapic_id: u8,
) -> Result<MpTable> {
    let table = build_mptable(apic_ids, ioapic_id)?;
    write_bytes(mem, "MP table", table.addr, &table.bytes)?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    struct Parsed {
        cpus: Vec<(u8, u8)>,
        ioapic: Option<(u8, u32)>,
        io_ints: Vec<(u8, u16, u8, u8)>,
        local_ints: Vec<(u8, u8, u8)>,
        buses: usize,
    }

    /// Parses the MP table from guest memory the way an OS does.
    fn parse(mem: &GuestMemoryMmap<()>) -> Parsed {
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0, "floating pointer checksum");
        assert_eq!(fp[8], 1);
        assert_eq!(fp[9], 4);
        let cfg = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; HEADER_SIZE];
        mem.read_slice(&mut hdr, GuestAddress(cfg)).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let count = u16::from_le_bytes([hdr[34], hdr[35]]) as usize;
        assert_eq!(
            u32::from_le_bytes(hdr[36..40].try_into().unwrap()),
            LAPIC_ADDR
        );
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(cfg)).unwrap();
        assert_eq!(sum(&table), 0, "configuration table checksum");
        let mut p = Parsed {
            cpus: vec![],
            ioapic: None,
            io_ints: vec![],
            local_ints: vec![],
            buses: 0,
        };
        let mut off = HEADER_SIZE;
        for _ in 0..count {
            let e = &table[off..];
            off += match e[0] {
                0 => {
                    p.cpus.push((e[1], e[3]));
                    20
                }
                1 => {
                    assert_eq!(&e[2..8], b"ISA   ");
                    p.buses += 1;
                    8
                }
                2 => {
                    p.ioapic = Some((e[1], u32::from_le_bytes(e[4..8].try_into().unwrap())));
                    8
                }
                3 => {
                    p.io_ints
                        .push((e[1], u16::from_le_bytes([e[2], e[3]]), e[5], e[7]));
                    8
                }
                4 => {
                    p.local_ints.push((e[1], e[6], e[7]));
                    8
                }
                t => panic!("unknown entry type {t}"),
            };
        }
        assert_eq!(off, len, "entries fill the table exactly");
        p
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn one_cpu_table_parses_back() {
        let m = mem();
        let t = write_mptable(&m, &[0], 1).unwrap();
        assert_eq!(t.cpus, 1);
        let p = parse(&m);
        assert_eq!(p.cpus, vec![(0, 3)]);
        assert_eq!(p.ioapic, Some((1, 0xfec0_0000)));
        assert_eq!(p.buses, 1);
        // ExtINT on pin 0, IRQ 0 on pin 2, IRQs 1,3..15 identity, no IRQ 2.
        assert_eq!(p.io_ints.len(), 16);
        assert!(p.io_ints.contains(&(INT_TYPE_EXTINT, 0, 0, 0)));
        assert!(p.io_ints.contains(&(INT_TYPE_INT, 0, 0, 2)));
        assert!(!p
            .io_ints
            .iter()
            .any(|&(t, _, irq, _)| t == INT_TYPE_INT && irq == 2));
        assert!(p.io_ints.contains(&(INT_TYPE_INT, FLAGS_LEVEL_HIGH, 9, 9)));
        for irq in [1u8, 3, 4, 8, 15] {
            assert!(
                p.io_ints.contains(&(INT_TYPE_INT, 0, irq, irq)),
                "irq {irq}"
            );
        }
        assert_eq!(
            p.local_ints,
            vec![(INT_TYPE_EXTINT, 0xff, 0), (INT_TYPE_NMI, 0xff, 1)]
        );
    }

    #[test]
    fn large_lists_skip_x2apic_ids() {
        let m = mem();
        let ids: Vec<u32> = (0..300).collect();
        let t = write_mptable(&m, &ids, 0xfe).unwrap();
        assert_eq!(t.cpus, 255);
        let p = parse(&m);
        assert_eq!(p.cpus.len(), 255);
        assert_eq!(p.cpus[0], (0, 3));
        assert!(p.cpus[1..].iter().all(|&(_, f)| f == 1));
        assert_eq!(p.cpus.last(), Some(&(254, 1)));
        // The table runs past the 1 KiB EBDA but stays below the ACPI area.
        assert!(MPTABLE_START + t.bytes.len() as u64 <= MPTABLE_LIMIT);
        // A BSP with an x2APIC ID: no processor entry is flagged as BSP.
        let t = build_mptable(&[300, 1, 2], 5).unwrap();
        assert_eq!(t.cpus, 2);
    }

    #[test]
    fn errors() {
        assert!(matches!(build_mptable(&[], 1), Err(Error::NoCpus { .. })));
        assert!(matches!(
            build_mptable(&[3, 3], 1),
            Err(Error::DuplicateApicId(3))
        ));
        assert!(matches!(
            build_mptable(&[255, 256], 1),
            Err(Error::InvalidApicId { .. })
        ));
        assert!(matches!(
            build_mptable(&[0], 255),
            Err(Error::InvalidConfig { .. })
        ));
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9fc00)]).unwrap();
        assert!(matches!(
            write_mptable(&small, &[0], 1),
            Err(Error::MissingMemory { .. })
        ));
    }
}
