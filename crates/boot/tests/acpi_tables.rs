// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Writes the ACPI tables into guest memory and parses them back the way an OS does.
#![allow(clippy::unwrap_used)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_boot::acpi::{write_acpi_tables, AcpiConfig, AcpiDevice, PmRegisters};
use vmkit_boot::acpi_tables::{mcfg::MCFG, Aml};
use vmkit_boot::Error;

type Mem = GuestMemoryMmap<()>;

fn mem() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn read_table(m: &Mem, addr: u64) -> Vec<u8> {
    let mut hdr = [0u8; 8];
    m.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
    let len = u32_at(&hdr, 4) as usize;
    let mut t = vec![0u8; len];
    m.read_slice(&mut t, GuestAddress(addr)).unwrap();
    assert_eq!(
        sum(&t),
        0,
        "checksum of {}",
        String::from_utf8_lossy(&t[..4])
    );
    t
}

/// Follows RSDP -> XSDT -> tables; checks every checksum; returns (signature, table).
fn parse_all(m: &Mem, rsdp_addr: u64) -> Vec<([u8; 4], Vec<u8>)> {
    let mut rsdp = [0u8; 36];
    m.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36);
    let xsdt = read_table(m, u64_at(&rsdp, 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut out = vec![];
    for i in 0..(xsdt.len() - 36) / 8 {
        let t = read_table(m, u64_at(&xsdt, 36 + 8 * i));
        if &t[..4] == b"FACP" {
            let dsdt = read_table(m, u64_at(&t, 140));
            assert_eq!(
                u32_at(&t, 40) as u64,
                u64_at(&t, 140),
                "DSDT and X_DSDT agree"
            );
            out.push((*b"DSDT", dsdt));
            let facs_addr = u64_at(&t, 132);
            assert_eq!(facs_addr % 64, 0, "FACS alignment");
            let mut facs = [0u8; 64];
            m.read_slice(&mut facs, GuestAddress(facs_addr)).unwrap();
            assert_eq!(&facs[..4], b"FACS");
        }
        out.push(([t[0], t[1], t[2], t[3]], t));
    }
    out
}

#[derive(Debug, Default)]
struct Madt {
    flags: u32,
    lapics: Vec<(u8, u8)>,
    x2apics: Vec<(u32, u32)>,
    ioapics: Vec<(u8, u32, u32)>,
    overrides: Vec<(u8, u32, u16)>,
    nmis: Vec<(u8, u8)>,
    x2nmis: Vec<(u32, u8)>,
}

fn parse_madt(t: &[u8]) -> Madt {
    assert_eq!(&t[..4], b"APIC");
    assert_eq!(u32_at(t, 36), 0xfee0_0000);
    let mut m = Madt {
        flags: u32_at(t, 40),
        ..Default::default()
    };
    let mut off = 44;
    while off < t.len() {
        let (ty, len) = (t[off], t[off + 1] as usize);
        let e = &t[off..off + len];
        match ty {
            0 => {
                assert_eq!(len, 8);
                assert_eq!(u32_at(e, 4), 1, "enabled");
                m.lapics.push((e[2], e[3]));
            }
            1 => {
                assert_eq!(len, 12);
                m.ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
            }
            2 => {
                assert_eq!(len, 10);
                assert_eq!(e[2], 0, "bus ISA");
                m.overrides.push((e[3], u32_at(e, 4), u16_at(e, 8)));
            }
            4 => {
                assert_eq!(len, 6);
                m.nmis.push((e[2], e[5]));
            }
            9 => {
                assert_eq!(len, 16);
                assert_eq!(u32_at(e, 8), 1, "enabled");
                m.x2apics.push((u32_at(e, 4), u32_at(e, 12)));
            }
            0xa => {
                assert_eq!(len, 12);
                m.x2nmis.push((u32_at(e, 4), e[8]));
            }
            other => panic!("unexpected MADT entry type {other}"),
        }
        off += len;
    }
    assert_eq!(off, t.len());
    m
}

fn madt_for(ids: Vec<u32>) -> Madt {
    let m = mem();
    let tables = write_acpi_tables(&m, &AcpiConfig::new(ids, 0xfe)).unwrap();
    let all = parse_all(&m, tables.rsdp_addr);
    let (_, madt) = all.iter().find(|(s, _)| s == b"APIC").unwrap();
    parse_madt(madt)
}

#[test]
fn one_cpu() {
    let madt = madt_for(vec![0]);
    assert_eq!(madt.flags & 1, 1, "PCAT_COMPAT");
    assert_eq!(madt.lapics, vec![(0, 0)]);
    assert!(madt.x2apics.is_empty());
    assert!(madt.x2nmis.is_empty());
    assert_eq!(madt.ioapics, vec![(0xfe, 0xfec0_0000, 0)]);
    assert_eq!(madt.overrides, vec![(0, 2, 0), (9, 9, 0x000d)]);
    assert_eq!(madt.nmis, vec![(0xff, 1)]);
}

#[test]
fn sixty_four_cpus() {
    let madt = madt_for((0..64).collect());
    assert_eq!(madt.lapics.len(), 64);
    assert!(madt
        .lapics
        .iter()
        .enumerate()
        .all(|(i, &(uid, id))| uid as usize == i && id as usize == i));
    assert!(madt.x2apics.is_empty());
}

#[test]
fn three_hundred_cpus_use_x2apic_exactly_from_255() {
    // Sparse IDs like a topology with gaps: 0, 2, 4, ... 598.
    let ids: Vec<u32> = (0..300).map(|i| i * 2).collect();
    let madt = madt_for(ids.clone());
    let below: Vec<u32> = ids.iter().copied().filter(|&i| i < 255).collect();
    let above: Vec<u32> = ids.iter().copied().filter(|&i| i >= 255).collect();
    assert_eq!(madt.lapics.len(), below.len());
    assert_eq!(madt.x2apics.len(), above.len());
    assert_eq!(madt.lapics.len() + madt.x2apics.len(), 300);
    assert!(madt.lapics.iter().all(|&(_, id)| u32::from(id) < 255));
    assert_eq!(
        madt.x2apics.iter().map(|&(id, _)| id).collect::<Vec<_>>(),
        above
    );
    // UIDs are list positions and unique.
    for &(id, uid) in &madt.x2apics {
        assert_eq!(ids[uid as usize], id);
    }
    assert_eq!(madt.nmis, vec![(0xff, 1)]);
    assert_eq!(madt.x2nmis, vec![(0xffff_ffff, 1)]);
}

#[test]
fn fadt_is_full_hardware_with_sci_9() {
    let m = mem();
    let mut cfg = AcpiConfig::new(vec![0, 1], 2);
    cfg.pm = PmRegisters {
        pm_tmr: Some(0x608),
        reset: Some((0xcf9, 6)),
        gpe0: Some((0x620, 4)),
        ..PmRegisters::default()
    };
    let tables = write_acpi_tables(&m, &cfg).unwrap();
    let all = parse_all(&m, tables.rsdp_addr);
    let fadt = &all.iter().find(|(s, _)| s == b"FACP").unwrap().1;
    assert_eq!(fadt.len(), 276);
    let flags = u32_at(fadt, 112);
    assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 8), 0, "TMR_VAL_EXT");
    assert_eq!(u16_at(fadt, 46), 9, "SCI_INT");
    assert_eq!(u32_at(fadt, 48), 0, "SMI_CMD: always in ACPI mode");
    assert_eq!(u32_at(fadt, 56), 0x600, "PM1a_EVT_BLK");
    assert_eq!(u32_at(fadt, 64), 0x604, "PM1a_CNT_BLK");
    assert_eq!(u32_at(fadt, 76), 0x608, "PM_TMR_BLK");
    assert_eq!(u32_at(fadt, 80), 0x620, "GPE0_BLK");
    assert_eq!((fadt[88], fadt[89], fadt[91], fadt[92]), (4, 2, 4, 4));
    assert_eq!(fadt[116], 1, "RESET_REG in system I/O");
    assert_eq!(u64_at(fadt, 120), 0xcf9);
    assert_eq!(fadt[128], 6);
    assert_eq!(u64_at(fadt, 148 + 4), 0x600, "X_PM1a_EVT_BLK address");
    assert_eq!(fadt[148], 1, "X_PM1a_EVT_BLK in system I/O");
    assert_eq!(fadt[149], 32);
    assert_eq!(
        u16_at(fadt, 109),
        0b101,
        "IAPC_BOOT_ARCH: legacy devices, no VGA"
    );
}

#[test]
fn dsdt_has_s5_sb_and_com1() {
    let m = mem();
    let mut cfg = AcpiConfig::new(vec![0], 1);
    cfg.devices.push(AcpiDevice::VirtioMmio {
        base: 0xd000_0000,
        size: 0x1000,
        gsi: 5,
    });
    let tables = write_acpi_tables(&m, &cfg).unwrap();
    let all = parse_all(&m, tables.rsdp_addr);
    let dsdt = &all.iter().find(|(s, _)| s == b"DSDT").unwrap().1;
    let body = &dsdt[36..];
    let find = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    // NameOp "_S5_" PackageOp
    assert!(find(&[0x08, b'_', b'S', b'5', b'_', 0x12]));
    // Scope(\_SB_)
    assert!(find(b"\\_SB_"));
    assert!(find(b"COM1"));
    // EISAID("PNP0501") = 0x0105d041, encoded as DWordPrefix + LE bytes.
    assert!(find(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
    // IO(Decode16, 0x3f8, 0x3f8, 0, 8)
    assert!(find(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08]));
    // Extended interrupt descriptor for IRQ 4: consumer, edge, active high, exclusive.
    assert!(find(&[
        0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00
    ]));
    assert!(find(b"VR00"));
    assert!(find(b"LNRO0005\0"));
    // Memory32Fixed(ReadWrite, 0xd0000000, 0x1000)
    assert!(find(&[
        0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00
    ]));
}

#[test]
fn extra_tables_are_listed_in_the_xsdt() {
    let m = mem();
    let mut mcfg = MCFG::new(*b"VMKIT ", *b"VMKITMCF", 1);
    mcfg.add_ecam(0xe000_0000, 0, 0, 255);
    let mut bytes = Vec::new();
    mcfg.to_aml_bytes(&mut bytes);
    // MCFG itself is built by vmkit-boot (from PCI host bridges): an extra table with that
    // signature is refused; under another signature the same bytes are listed as given.
    let mut cfg = AcpiConfig::new(vec![0], 1);
    cfg.extra_tables.push(bytes.clone());
    assert!(matches!(
        write_acpi_tables(&m, &cfg),
        Err(Error::InvalidAcpiTable { index: 0, .. })
    ));
    bytes[..4].copy_from_slice(b"OEMT");
    let fix = sum(&bytes);
    bytes[9] = bytes[9].wrapping_sub(fix);
    cfg.extra_tables = vec![bytes.clone()];
    let tables = write_acpi_tables(&m, &cfg).unwrap();
    let all = parse_all(&m, tables.rsdp_addr);
    let sigs: Vec<[u8; 4]> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(sigs, vec![*b"DSDT", *b"FACP", *b"APIC", *b"OEMT"]);
    assert_eq!(all[3].1, bytes);
    assert!(tables
        .tables
        .iter()
        .all(|t| t.addr >= 0xe0000 && t.addr + t.bytes.len() as u64 <= 0x10_0000));
}

#[test]
fn errors_are_clear() {
    let build = |ids: Vec<u32>| AcpiConfig::new(ids, 1).build();
    assert!(matches!(build(vec![]), Err(Error::NoCpus { .. })));
    assert!(matches!(
        build(vec![1, 2, 1]),
        Err(Error::DuplicateApicId(1))
    ));
    assert!(matches!(
        build(vec![0, u32::MAX]),
        Err(Error::InvalidApicId { .. })
    ));
    // An xAPIC ID at position 300 cannot get an 8-bit processor UID.
    let mut ids: Vec<u32> = (1000..1300).collect();
    ids.push(3);
    assert!(matches!(
        build(ids),
        Err(Error::InvalidApicId { id: 3, .. })
    ));
    // 20000 x2APIC CPUs do not fit in 128 KiB.
    let err = build((300..20300).collect()).unwrap_err();
    assert!(matches!(err, Error::TableAreaFull { .. }), "{err}");
    assert!(err.to_string().contains("ACPI tables"), "{err}");

    let mut cfg = AcpiConfig::new(vec![0], 1);
    cfg.extra_tables.push(vec![0u8; 10]);
    assert!(matches!(
        cfg.build(),
        Err(Error::InvalidAcpiTable { index: 0, .. })
    ));
    let mut bad = MCFG::new(*b"VMKIT ", *b"VMKITMCF", 1);
    bad.add_ecam(0xe000_0000, 0, 0, 255);
    let mut bytes = Vec::new();
    bad.to_aml_bytes(&mut bytes);
    bytes[..4].copy_from_slice(b"OEMT");
    bytes[20] ^= 1;
    cfg.extra_tables = vec![bytes];
    let err = cfg.build().unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");

    let mut cfg = AcpiConfig::new(vec![0], 1);
    cfg.devices.push(AcpiDevice::VirtioMmio {
        base: 0xffff_f000,
        size: 0x2000,
        gsi: 5,
    });
    assert!(matches!(cfg.build(), Err(Error::InvalidConfig { .. })));

    // Tables need guest memory at 0xe0000.
    let small = Mem::from_ranges(&[(GuestAddress(0), 0xe0000)]).unwrap();
    assert!(matches!(
        write_acpi_tables(&small, &AcpiConfig::new(vec![0], 1)),
        Err(Error::MissingMemory { .. })
    ));
}

#[test]
fn pci_host_bridge_gets_mcfg_and_a_dsdt_device() {
    use vmkit_boot::acpi::PciHostBridge;
    let m = mem();
    let mut cfg = AcpiConfig::new(vec![0, 1], 1);
    let bridge = PciHostBridge {
        segment: 0,
        bus_start: 0,
        bus_end: 255,
        ecam_base: 0xe000_0000,
        mmio32: (0xc000_0000, 0x2000_0000),
        mmio64: Some((0x100_0000_0000, 0x10_0000_0000)),
        io: None,
    };
    assert_eq!(bridge.ecam_size(), 256 << 20);
    cfg.devices.push(AcpiDevice::PciHostBridge(bridge));
    let tables = write_acpi_tables(&m, &cfg).unwrap();
    let all = parse_all(&m, tables.rsdp_addr);
    let mcfg = &all
        .iter()
        .find(|(s, _)| s == b"MCFG")
        .expect("MCFG listed")
        .1;
    // Header (36) + 8 reserved bytes + one 16-byte allocation structure.
    assert_eq!(mcfg.len(), 36 + 8 + 16);
    assert_eq!(u64_at(mcfg, 44), 0xe000_0000);
    assert_eq!(u16_at(mcfg, 52), 0);
    assert_eq!((mcfg[54], mcfg[55]), (0, 255));
    let dsdt = &all.iter().find(|(s, _)| s == b"DSDT").unwrap().1;
    let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"PCI0"), "PCI0 device in the DSDT");
    // EISAID("PNP0A08") = 0x080AD041, as a DWordConst (0x0C) after _HID.
    assert!(has(&[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    // The 32-bit window as a DWord memory descriptor: min 0xc0000000, max 0xdfffffff.
    assert!(has(&[0x00, 0x00, 0x00, 0xc0, 0xff, 0xff, 0xff, 0xdf]));

    let mut bad = AcpiConfig::new(vec![0], 1);
    bad.devices.push(AcpiDevice::PciHostBridge(PciHostBridge {
        ecam_base: 0xe000_1000,
        ..bridge
    }));
    assert!(matches!(bad.build(), Err(Error::InvalidConfig { .. })));
    bad.devices = vec![AcpiDevice::PciHostBridge(PciHostBridge {
        mmio32: (0xf000_0000, 0x2000_0000),
        ..bridge
    })];
    assert!(matches!(bad.build(), Err(Error::InvalidConfig { .. })));
}
