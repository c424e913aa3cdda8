// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Host-side tests of the guest's pure parsers and of the embedded image.

use crate::guest_src::acpi;
use crate::guest_src::bootinfo::{BootInfo, BootInfoError, BootProtocol, MemRegion, PVH_MAGIC};
use crate::guest_src::mptable;
use crate::guest_src::physmem::{ApicIdSet, PhysMem};
use crate::guest_src::report::{self as greport, Sink};
use crate::{abi, elf, inspect_elf, parse_report};
use proptest::prelude::*;

/// Guest physical memory for tests: `size` bytes from address 0.
struct VecMem(Vec<u8>);

impl VecMem {
    fn new(size: usize) -> Self {
        VecMem(vec![0; size])
    }
    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let a = addr as usize;
        self.0[a..a + bytes.len()].copy_from_slice(bytes);
    }
    fn write_u32(&mut self, addr: u64, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }
    fn write_u64(&mut self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }
}

impl PhysMem for VecMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Ok(start) = usize::try_from(addr) else {
            return false;
        };
        let Some(end) = start.checked_add(buf.len()) else {
            return false;
        };
        match self.0.get(start..end) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

impl Sink for String {
    fn put(&mut self, bytes: &[u8]) {
        self.push_str(std::str::from_utf8(bytes).unwrap());
    }
}

fn fix_checksum(mem: &mut VecMem, addr: u64, len: usize, at: u64) {
    mem.0[at as usize] = 0;
    let sum = mem.0[addr as usize..addr as usize + len]
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b));
    mem.0[at as usize] = 0u8.wrapping_sub(sum);
}

fn sdt_header(mem: &mut VecMem, addr: u64, sig: &[u8; 4], len: u32) {
    mem.write(addr, sig);
    mem.write_u32(addr + 4, len);
    mem.0[addr as usize + 8] = 1;
    mem.write(addr + 10, b"VMKIT ");
}

/// LAPIC entry: (id, enabled); x2APIC entry: (id, enabled).
fn build_madt(mem: &mut VecMem, addr: u64, lapics: &[(u8, bool)], x2apics: &[(u32, bool)]) -> u32 {
    let mut at = addr + 44;
    for (uid, (id, en)) in lapics.iter().enumerate() {
        mem.write(at, &[0, 8, uid as u8, *id]);
        mem.write_u32(at + 4, u32::from(*en));
        at += 8;
    }
    // An I/O APIC and an interrupt source override in between.
    mem.write(at, &[1, 12, 5, 0]);
    mem.write_u32(at + 4, 0xFEC0_0000);
    mem.write_u32(at + 8, 0);
    at += 12;
    mem.write(at, &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    at += 10;
    for (uid, (id, en)) in x2apics.iter().enumerate() {
        mem.write(at, &[9, 16, 0, 0]);
        mem.write_u32(at + 4, *id);
        mem.write_u32(at + 8, u32::from(*en));
        mem.write_u32(at + 12, uid as u32 + 100);
        at += 16;
    }
    let len = (at - addr) as u32;
    sdt_header(mem, addr, b"APIC", len);
    mem.write_u32(addr + 36, 0xFEE0_0000);
    mem.write_u32(addr + 40, 1);
    fix_checksum(mem, addr, len as usize, addr + 9);
    len
}

/// RSDP at `rsdp` -> XSDT (rev 2) or RSDT (rev 0) at 0x2000 -> [FACP dummy, MADT at 0x3000].
fn build_acpi(mem: &mut VecMem, rsdp: u64, xsdt: bool, lapics: &[(u8, bool)], x2: &[(u32, bool)]) {
    let root = 0x2000u64;
    let facp = 0x2800u64;
    let madt = 0x3000u64;
    sdt_header(mem, facp, b"FACP", 36);
    fix_checksum(mem, facp, 36, facp + 9);
    build_madt(mem, madt, lapics, x2);
    mem.write(rsdp, b"RSD PTR ");
    mem.write(rsdp + 9, b"VMKIT ");
    if xsdt {
        sdt_header(mem, root, b"XSDT", 36 + 16);
        mem.write_u64(root + 36, facp);
        mem.write_u64(root + 44, madt);
        fix_checksum(mem, root, 52, root + 9);
        mem.0[rsdp as usize + 15] = 2;
        mem.write_u32(rsdp + 20, 36);
        mem.write_u64(rsdp + 24, root);
        fix_checksum(mem, rsdp, 20, rsdp + 8);
        fix_checksum(mem, rsdp, 36, rsdp + 32);
    } else {
        sdt_header(mem, root, b"RSDT", 36 + 8);
        mem.write_u32(root + 36, facp as u32);
        mem.write_u32(root + 40, madt as u32);
        fix_checksum(mem, root, 44, root + 9);
        mem.write_u32(rsdp + 16, root as u32);
        fix_checksum(mem, rsdp, 20, rsdp + 8);
    }
}

type Ids = ApicIdSet<1024>;

#[test]
fn madt_via_scanned_rsdp_and_xsdt() {
    let mut mem = VecMem::new(0x10_0000);
    build_acpi(
        &mut mem,
        0xF_0010,
        true,
        &[(0, true), (1, true), (2, false), (3, true)],
        &[(300, true), (301, false), (1, true)],
    );
    let mut ids = Ids::new();
    let info = acpi::discover_cpus(&mem, None, &mut ids).expect("MADT found");
    assert_eq!(ids.as_slice(), &[0, 1, 3, 300]);
    assert_eq!(info.lapic_entries, 3);
    assert_eq!(info.x2apic_entries, 2);
    assert_eq!(info.ioapic_count, 1);
    assert_eq!(info.ioapics[0].address, 0xFEC0_0000);
    assert_eq!(info.lapic_address, 0xFEE0_0000);
}

#[test]
fn madt_via_hint_and_rsdt() {
    let mut mem = VecMem::new(0x10_0000);
    build_acpi(&mut mem, 0x5000, false, &[(0, true), (2, true)], &[]);
    let mut ids = Ids::new();
    assert!(acpi::discover_cpus(&mem, Some(0x5000), &mut ids).is_some());
    assert_eq!(ids.as_slice(), &[0, 2]);
    // 0x5000 is not in a scanned area: without the hint nothing is found.
    assert!(acpi::discover_cpus(&mem, None, &mut Ids::new()).is_none());
    // A bad hint falls back to scanning (nothing there either).
    assert!(acpi::discover_cpus(&mem, Some(0x5010), &mut Ids::new()).is_none());
}

#[test]
fn rsdp_in_ebda_is_found() {
    let mut mem = VecMem::new(0x10_0000);
    mem.write(0x40E, &(0x9FC0u16).to_le_bytes());
    build_acpi(&mut mem, 0x9_FC00 + 0x40, true, &[(5, true)], &[]);
    let mut ids = Ids::new();
    assert!(acpi::discover_cpus(&mem, None, &mut ids).is_some());
    assert_eq!(ids.as_slice(), &[5]);
}

#[test]
fn corrupted_tables_are_rejected() {
    let mut mem = VecMem::new(0x10_0000);
    build_acpi(&mut mem, 0xE_0000, true, &[(0, true), (1, true)], &[]);
    let mut bad_madt = VecMem(mem.0.clone());
    bad_madt.0[0x3000 + 50] ^= 0xFF;
    assert!(acpi::discover_cpus(&bad_madt, None, &mut Ids::new()).is_none());
    let mut bad_rsdp = VecMem(mem.0.clone());
    bad_rsdp.0[0xE_0000 + 3] ^= 0x01;
    assert!(acpi::discover_cpus(&bad_rsdp, None, &mut Ids::new()).is_none());
    let mut huge = VecMem(mem.0.clone());
    huge.write_u32(0x3004, 0xFFFF_FFF0);
    assert!(acpi::discover_cpus(&huge, None, &mut Ids::new()).is_none());
    // No enabled CPU in the MADT counts as "no MADT".
    let mut none = VecMem::new(0x10_0000);
    build_acpi(&mut none, 0xE_0000, true, &[(0, false)], &[]);
    assert!(acpi::discover_cpus(&none, None, &mut Ids::new()).is_none());
}

#[test]
fn madt_entry_with_zero_length_stops_the_walk() {
    let mut mem = VecMem::new(0x10_0000);
    build_acpi(&mut mem, 0xE_0000, true, &[(0, true), (1, true)], &[]);
    // Second LAPIC entry gets length 0: the walk must stop, not loop.
    mem.0[0x3000 + 44 + 8 + 1] = 0;
    let len = mem.0[0x3004] as usize;
    fix_checksum(&mut mem, 0x3000, len, 0x3009);
    let mut ids = Ids::new();
    acpi::parse_madt(&mem, 0x3000, &mut ids).expect("valid header");
    assert_eq!(ids.as_slice(), &[0]);
}

fn build_mptable(mem: &mut VecMem, fp: u64, cpus: &[(u8, bool)]) {
    let cfg = 0x9_0000u64;
    let mut at = cfg + 44;
    for (id, en) in cpus {
        mem.write(
            at,
            &[0, *id, 0x14, u8::from(*en) | if *id == 0 { 2 } else { 0 }],
        );
        at += 20;
    }
    mem.write(at, &[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    at += 8;
    mem.write(at, &[2, 9, 0x11, 1]);
    mem.write_u32(at + 4, 0xFEC0_0000);
    at += 8;
    let len = (at - cfg) as u16;
    mem.write(cfg, b"PCMP");
    mem.write(cfg + 4, &len.to_le_bytes());
    mem.0[cfg as usize + 6] = 4;
    mem.write(cfg + 34, &((cpus.len() + 2) as u16).to_le_bytes());
    mem.write_u32(cfg + 36, 0xFEE0_0000);
    fix_checksum(mem, cfg, len as usize, cfg + 7);
    mem.write(fp, b"_MP_");
    mem.write_u32(fp + 4, cfg as u32);
    mem.0[fp as usize + 8] = 1;
    mem.0[fp as usize + 9] = 4;
    fix_checksum(mem, fp, 16, fp + 10);
}

#[test]
fn mptable_fallback() {
    let mut mem = VecMem::new(0x10_0000);
    build_mptable(
        &mut mem,
        0xF_5000,
        &[(0, true), (1, true), (2, false), (6, true)],
    );
    let mut ids = Ids::new();
    assert!(mptable::discover_cpus(&mem, &mut ids));
    assert_eq!(ids.as_slice(), &[0, 1, 6]);
    // Found in the last KiB of base memory as well.
    let mut mem = VecMem::new(0x10_0000);
    mem.write(0x413, &639u16.to_le_bytes());
    build_mptable(&mut mem, 638 * 1024 + 16, &[(0, true), (1, true)]);
    assert!(mptable::discover_cpus(&mem, &mut Ids::new()));
    // Broken checksum: not found.
    mem.0[0x9_0000 + 50] ^= 1;
    assert!(!mptable::discover_cpus(&mem, &mut Ids::new()));
}

#[test]
fn pvh_start_info() {
    let mut mem = VecMem::new(0x1_0000);
    let si = 0x6000u64;
    mem.write_u32(si, PVH_MAGIC);
    mem.write_u32(si + 4, 1);
    mem.write_u64(si + 0x18, 0x7000);
    mem.write_u64(si + 0x20, 0xE_0000);
    mem.write_u64(si + 0x28, 0x6100);
    mem.write_u32(si + 0x30, 2);
    mem.write(0x7000, b"console=ttyS0 vmkit.debug=1\0garbage");
    for (i, (base, size, kind)) in [(0u64, 0x9_FC00u64, 1u32), (0x10_0000, 0x3FF0_0000, 1)]
        .iter()
        .enumerate()
    {
        let e = 0x6100 + 24 * i as u64;
        mem.write_u64(e, *base);
        mem.write_u64(e + 8, *size);
        mem.write_u32(e + 16, *kind);
    }
    let b = BootInfo::from_pvh(&mem, si).unwrap();
    assert_eq!(b.protocol, BootProtocol::Pvh);
    assert_eq!(b.cmdline(), b"console=ttyS0 vmkit.debug=1");
    assert_eq!(b.option("vmkit.debug"), Some(&b"1"[..]));
    assert_eq!(b.option("vmkit.fault"), None);
    assert_eq!(b.rsdp, Some(0xE_0000));
    assert_eq!(b.memmap().len(), 2);
    assert_eq!(
        b.memmap()[1],
        MemRegion {
            base: 0x10_0000,
            size: 0x3FF0_0000,
            kind: 1
        }
    );
    assert_eq!(b.ram_at(0x20_0000), Some(0x4000_0000 - 0x20_0000));
    assert_eq!(b.ram_at(0xA_0000), Some(0));

    mem.write_u32(si, 0x1234);
    assert_eq!(
        BootInfo::from_pvh(&mem, si).err(),
        Some(BootInfoError::BadPvhMagic(0x1234))
    );
    assert_eq!(
        BootInfo::from_pvh(&mem, 0xFFFF).err(),
        Some(BootInfoError::Unreadable(0xFFFF))
    );
}

#[test]
fn linux_boot_params() {
    let mut mem = VecMem::new(0x1_0000);
    let bp = 0x7000u64;
    mem.write_u64(bp + 0x70, 0xF_0000);
    mem.write_u32(bp + 0x228, 0x6000);
    mem.write_u32(bp + 0x238, 5);
    mem.write(0x6000, b"abcdefgh\0");
    mem.0[bp as usize + 0x1E8] = 2;
    for (i, (base, size)) in [(0u64, 0x9_F000u64), (0x10_0000, 0x700_0000)]
        .iter()
        .enumerate()
    {
        let e = bp + 0x2D0 + 20 * i as u64;
        mem.write_u64(e, *base);
        mem.write_u64(e + 8, *size);
        mem.write_u32(e + 16, 1);
    }
    let b = BootInfo::from_linux(&mem, bp).unwrap();
    assert_eq!(b.protocol, BootProtocol::Linux64);
    assert_eq!(b.cmdline(), b"abcde");
    assert_eq!(b.rsdp, Some(0xF_0000));
    assert_eq!(b.memmap().len(), 2);
    assert_eq!(b.ram_at(0x13_8000), Some(0x710_0000 - 0x13_8000));
    // Without a memory map, ram_at cannot tell.
    mem.0[bp as usize + 0x1E8] = 0;
    assert_eq!(
        BootInfo::from_linux(&mem, bp).unwrap().ram_at(0x10_0000),
        None
    );
}

#[test]
fn report_lines_round_trip_through_the_host_parser() {
    let mut out = String::from("noise before\n");
    greport::write_boot_line(&mut out, "pvh", b"root=/dev/vda \"x\"\x01");
    greport::write_cpus_line(&mut out, 5, 6, &[0, 1, 2, 7, 9], true);
    greport::write_topo_line(&mut out, 1, 4, false);
    greport::write_exit_line(&mut out, 1);
    let r = parse_report(&out).unwrap();
    assert_eq!(r.cmdline, "root=/dev/vda ?x??");
    assert_eq!((r.cpus, r.expected), (5, 6));
    assert_eq!(r.apic_ids, vec![0, 1, 2, 7, 9]);
    assert!(r.x2apic);
    assert_eq!(
        (r.smt_bits, r.core_bits, r.consistent, r.exit_code),
        (1, 4, false, 1)
    );

    let mut s = String::new();
    greport::write_ranges(&mut s, &[0, 1, 2, 3, 8, 9, 10, 11]);
    assert_eq!(s, "0-3,8-11");
    s.clear();
    greport::write_ranges(&mut s, &[]);
    assert_eq!(s, "-");
    s.clear();
    greport::write_exception_line(&mut s, 13, 0x10_2345, 0);
    assert_eq!(s, "VMKIT-GUEST panic exception=13 rip=0x102345 err=0x0\n");
    s.clear();
    s.put_dec(u64::MAX);
    assert_eq!(s, u64::MAX.to_string());
}

#[test]
fn long_cmdline_is_truncated_to_200() {
    let mut out = String::new();
    greport::write_boot_line(&mut out, "linux64", &[b'a'; 500]);
    greport::write_cpus_line(&mut out, 1, 1, &[0], false);
    greport::write_topo_line(&mut out, 0, 0, true);
    greport::write_exit_line(&mut out, 0);
    assert_eq!(parse_report(&out).unwrap().cmdline.len(), 200);
}

#[test]
fn image_is_a_loadable_x86_64_elf() {
    let image = elf();
    let info = inspect_elf(image).unwrap();
    assert!(!info.segments.is_empty());
    for s in &info.segments {
        assert!(s.paddr >= abi::LOAD_ADDRESS, "segment below 1 MiB: {s:?}");
        assert_eq!(s.paddr, s.vaddr, "identity-linked");
    }
    let end = info
        .segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap();
    assert!(end < 64 << 20, "image unexpectedly large: ends at {end:#x}");

    // Both entry points start with `mov $0x10, %al; out %al, $0x80` (POST 0x10).
    let post = [0xB0, abi::PostCode::Entry as u8, 0xE6, abi::POST_PORT as u8];
    let pvh = info.pvh_entry.expect("PVH note present");
    let text = info.segments.iter().find(|s| s.flags & 1 != 0).unwrap();
    assert!(u64::from(pvh) >= text.paddr && u64::from(pvh) < text.paddr + text.filesz);
    assert_eq!(&info.bytes_at(image, u64::from(pvh)).unwrap()[..4], &post);
    assert_eq!(&info.bytes_at(image, info.entry).unwrap()[..4], &post);
    assert_ne!(u64::from(pvh), info.entry);
}

#[test]
fn elf_errors_are_reported() {
    use crate::ElfError;
    assert!(matches!(inspect_elf(&[]), Err(ElfError::Truncated { .. })));
    assert_eq!(inspect_elf(&[0u8; 64]), Err(ElfError::BadMagic));
    let mut img = elf().to_vec();
    img[18] = 3; // EM_386
    assert_eq!(inspect_elf(&img), Err(ElfError::NotX86_64(3)));
    let mut img = elf().to_vec();
    img[4] = 1;
    assert!(matches!(inspect_elf(&img), Err(ElfError::NotElf64 { .. })));
    let img = &elf()[..200];
    assert!(inspect_elf(img).is_err());
}

/// What [`reference_madt_walk`] finds.
#[derive(Default)]
struct MadtWalk {
    /// APIC IDs of enabled CPU entries, in table order.
    ids: Vec<u32>,
    /// Enabled type-0 entries.
    lapics: u32,
    /// Enabled type-9 entries.
    x2apics: u32,
    /// I/O APICs: (ID, address, GSI base).
    ioapics: Vec<(u8, u32, u32)>,
}

/// The MADT walk as a plain byte-by-byte reference (the guest's reads entries by word).
fn reference_madt_walk(table: &[u8]) -> MadtWalk {
    let mut w = MadtWalk::default();
    let (ids, lapics, x2apics, ioapics) =
        (&mut w.ids, &mut w.lapics, &mut w.x2apics, &mut w.ioapics);
    let u32_at = |i: usize| u32::from_le_bytes(table[i..i + 4].try_into().unwrap());
    let mut at = 44;
    while at + 2 <= table.len() {
        let (kind, len) = (table[at], usize::from(table[at + 1]));
        if len < 2 || at + len > table.len() {
            break;
        }
        match kind {
            0 if len >= 8 && u32_at(at + 4) & 1 != 0 => {
                ids.push(u32::from(table[at + 3]));
                *lapics += 1;
            }
            1 if len >= 12 && ioapics.len() < acpi::MAX_IOAPICS => {
                ioapics.push((table[at + 2], u32_at(at + 4), u32_at(at + 8)));
            }
            9 if len >= 16 && u32_at(at + 8) & 1 != 0 => {
                ids.push(u32_at(at + 4));
                *x2apics += 1;
            }
            _ => {}
        }
        at += len;
    }
    w
}

/// One MADT entry for the generated tables: mostly well-formed, sometimes odd.
fn madt_entry() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (any::<u8>(), any::<bool>()).prop_map(|(id, en)| vec![0, 8, id, id, u8::from(en), 0, 0, 0]),
        1 => (any::<u8>(), any::<u32>()).prop_map(|(id, flags)| {
            let mut e = vec![0, 9, 0, id];
            e.extend_from_slice(&flags.to_le_bytes());
            e.push(0xAA);
            e
        }),
        1 => (any::<u8>(), any::<u32>(), any::<u32>()).prop_map(|(id, addr, gsi)| {
            let mut e = vec![1, 12, id, 0];
            e.extend_from_slice(&addr.to_le_bytes());
            e.extend_from_slice(&gsi.to_le_bytes());
            e
        }),
        1 => Just(vec![2, 10, 0, 0, 2, 0, 0, 0, 0, 0]),
        1 => (any::<u32>(), any::<bool>()).prop_map(|(id, en)| {
            let mut e = vec![9, 16, 0, 0];
            e.extend_from_slice(&id.to_le_bytes());
            e.extend_from_slice(&u32::from(en).to_le_bytes());
            e.extend_from_slice(&7u32.to_le_bytes());
            e
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

#[test]
fn boot_options_match_whole_keys() {
    let mut mem = VecMem::new(0x1_0000);
    let si = 0x6000u64;
    mem.write_u32(si, PVH_MAGIC);
    mem.write_u64(si + 0x18, 0x7000);
    mem.write(
        0x7000,
        b"vmkit.debugx=1  vmkit.debug vmkit.debug=2 a=b vmkit.debug=3 vmkit.fault=\0",
    );
    let b = BootInfo::from_pvh(&mem, si).unwrap();
    assert_eq!(b.option("vmkit.debug"), Some(&b"2"[..]));
    assert_eq!(b.option("a"), Some(&b"b"[..]));
    assert_eq!(b.option("vmkit.fault"), Some(&b""[..]));
    assert_eq!(b.option("vmkit"), None);
    assert_eq!(b.option("b"), None);
}

proptest! {
    #[test]
    fn acpi_and_mptable_never_panic_on_garbage(
        low in proptest::collection::vec(any::<u8>(), 0x2000),
        bios in proptest::collection::vec(any::<u8>(), 0x400),
        hint in any::<u64>(),
        plant_rsdp in any::<bool>(),
    ) {
        let mut mem = VecMem::new(0x10_0000);
        mem.write(0, &low);
        mem.write(0xE_0000, &bios);
        if plant_rsdp {
            // A valid RSDP pointing at garbage tables.
            mem.write(0xE_0100, b"RSD PTR ");
            mem.0[0xE_0100 + 15] = 2;
            mem.write_u32(0xE_0100 + 20, 36);
            mem.write_u64(0xE_0100 + 24, hint & 0x1FFF);
            mem.write_u32(0xE_0100 + 16, (hint >> 32) as u32 & 0x1FFF);
            fix_checksum(&mut mem, 0xE_0100, 20, 0xE_0100 + 8);
            fix_checksum(&mut mem, 0xE_0100, 36, 0xE_0100 + 32);
        }
        let mut ids = Ids::new();
        let _ = acpi::discover_cpus(&mem, Some(hint), &mut ids);
        let _ = acpi::parse_madt(&mem, hint & 0x1FFF, &mut ids);
        let _ = acpi::parse_madt(&mem, hint, &mut ids);
        let _ = mptable::discover_cpus(&mem, &mut ids);
        let _ = mptable::parse_config_table(&mem, hint & 0x1FFF, &mut ids);
        let _ = BootInfo::from_pvh(&mem, hint & 0x1FFF);
        let _ = BootInfo::from_linux(&mem, hint & 0x1FFF);
        let _ = BootInfo::from_linux(&mem, hint);
    }

    #[test]
    fn madt_with_random_entries_never_panics(entries in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut mem = VecMem::new(0x1_0000);
        let len = 44 + entries.len() as u32;
        mem.write(0x1000 + 44, &entries);
        sdt_header(&mut mem, 0x1000, b"APIC", len);
        fix_checksum(&mut mem, 0x1000, len as usize, 0x1009);
        let mut ids = ApicIdSet::<8>::new();
        prop_assert!(acpi::parse_madt(&mem, 0x1000, &mut ids).is_some());
        prop_assert!(ids.len() <= 8);
    }

    #[test]
    fn ranges_round_trip(mut ids in proptest::collection::vec(any::<u32>(), 0..50)) {
        ids.sort_unstable();
        ids.dedup();
        let mut s = String::new();
        greport::write_ranges(&mut s, &ids);
        prop_assert_eq!(crate::parse_apic_ids(&s).unwrap(), ids);
    }

    #[test]
    fn elf_reader_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..512), keep_header in any::<bool>()) {
        if keep_header && bytes.len() >= 64 {
            bytes[..64].copy_from_slice(&elf()[..64]);
        }
        let _ = inspect_elf(&bytes);
    }
    #[test]
    fn madt_walk_matches_the_bytewise_reference(
        entries in proptest::collection::vec(madt_entry(), 0..80),
        tail in proptest::collection::vec(any::<u8>(), 0..3),
    ) {
        let mut table = vec![0u8; 44];
        for e in &entries {
            table.extend_from_slice(e);
        }
        table.extend_from_slice(&tail);
        let mut mem = VecMem::new(0x1_0000);
        mem.write(0x1000, &table);
        let len = table.len() as u32;
        sdt_header(&mut mem, 0x1000, b"APIC", len);
        fix_checksum(&mut mem, 0x1000, len as usize, 0x1009);
        let n = table.len();
        table.copy_from_slice(&mem.0[0x1000..0x1000 + n]);

        let walk = reference_madt_walk(&table);
        let mut got = Ids::new();
        let info = acpi::parse_madt(&mem, 0x1000, &mut got).expect("valid MADT");
        let mut want = Ids::new();
        for id in &walk.ids {
            want.insert(*id);
        }
        prop_assert_eq!(got.as_slice(), want.as_slice());
        prop_assert_eq!(
            (info.lapic_entries, info.x2apic_entries),
            (walk.lapics, walk.x2apics)
        );
        let got_ioapics: Vec<_> = info.ioapics[..info.ioapic_count]
            .iter()
            .map(|i| (i.id, i.address, i.gsi_base))
            .collect();
        prop_assert_eq!(got_ioapics, walk.ioapics);
    }

    #[test]
    fn insert_all_matches_one_by_one_inserts(
        start in proptest::collection::vec(0u32..40, 0..10),
        more in proptest::collection::vec(0u32..40, 0..20),
    ) {
        let (mut a, mut b) = (ApicIdSet::<8>::new(), ApicIdSet::<8>::new());
        for id in &start {
            a.insert(*id);
            b.insert(*id);
        }
        for id in &more {
            a.insert(*id);
        }
        b.insert_all(more.iter().copied());
        prop_assert_eq!(a.as_slice(), b.as_slice());
        prop_assert_eq!(a.overflowed(), b.overflowed());
    }

    #[test]
    fn cmdline_is_read_up_to_the_nul_or_the_limit(
        text in proptest::collection::vec(1u8..=255, 0..2200),
        nul in any::<bool>(),
        misalign in 0u64..8,
        size in 0u32..2600,
    ) {
        let mut mem = VecMem::new(0x1_0000);
        let at = 0x2000 + misalign;
        mem.write(at, &text);
        if nul {
            mem.0[(at as usize) + text.len()] = 0;
        } else {
            // No NUL where the text ends: the next bytes are more text.
            mem.write(at + text.len() as u64, &[b'x'; 16]);
        }
        let bp = 0x7000u64;
        mem.write_u32(bp + 0x228, at as u32);
        mem.write_u32(bp + 0x238, size);
        let b = BootInfo::from_linux(&mem, bp).unwrap();
        let max = crate::guest_src::bootinfo::CMDLINE_MAX;
        let limit = if size == 0 { max } else { (size as usize).min(max) };
        let mut want: Vec<u8> = text.clone();
        if !nul {
            want.extend_from_slice(&[b'x'; 16]);
        }
        want.truncate(limit);
        prop_assert_eq!(b.cmdline(), &want[..]);
    }
}

#[test]
fn device_lines_round_trip_through_the_host_parser() {
    use crate::devices::{Echo, Flush, Hundredths, Transport, Verify};
    let mut out = String::new();
    greport::write_boot_line(&mut out, "pvh", b"");
    greport::write_cpus_line(&mut out, 2, 2, &[0, 1], true);
    greport::write_topo_line(&mut out, 0, 1, true);
    greport::begin(&mut out, greport::PCI_PREFIX);
    greport::field_str(&mut out, "access", b"ecam");
    greport::field_hex(&mut out, "ecam", 0xE000_0000);
    for (k, v) in [
        ("buses", 1),
        ("devices", 3),
        ("assigned", 4),
        ("relocated", 2),
        ("failed", 0),
    ] {
        greport::field_dec(&mut out, k, v);
    }
    greport::end(&mut out);
    out.push_str("VMKIT-PCI-DEV bdf=00:01.0 id=1af4:1042 class=0x10000 bar_bytes=16384\n");
    greport::begin(&mut out, greport::BLK_PREFIX);
    greport::field_str(&mut out, "transport", b"pci");
    greport::field_bdf(&mut out, "addr", 0, 0x1f, 3);
    for (k, v) in [("queues", 4), ("capacity", 8 << 20)] {
        greport::field_dec(&mut out, k, v);
    }
    greport::field_str(&mut out, "verify", b"ok");
    for (k, v) in [("bytes", 1 << 20), ("bad_sectors", 0), ("io_errors", 0)] {
        greport::field_dec(&mut out, k, v);
    }
    greport::field_str(&mut out, "flush", b"unsupported");
    greport::field_dec(&mut out, "irqs", 7);
    greport::field_dec(&mut out, "us", 1234);
    greport::end(&mut out);
    greport::begin(&mut out, greport::BLK_BENCH_PREFIX);
    greport::field_str(&mut out, "transport", b"mmio");
    greport::field_hex(&mut out, "addr", 0xFEB0_0E00);
    for (k, v) in [("queues", 1), ("qd", 16), ("bs", 65536), ("ms", 500)] {
        greport::field_dec(&mut out, k, v);
    }
    greport::field_centi(&mut out, "seq_write_mibps", 34_803);
    greport::field_centi(&mut out, "seq_read_mibps", 7);
    greport::field_dec(&mut out, "rand_read_iops", 5251);
    greport::field_dec(&mut out, "rand_bs", 4096);
    greport::field_dec(&mut out, "io_errors", 0);
    greport::end(&mut out);
    out.push_str("VMKIT-VIRTIO-CONSOLE transport=pci addr=00:03.0 port=1 name=vmkit.echo sent=30 received=30 echo=ok irqs=6\n");
    out.push_str("VMKIT-VIRTIO-RNG transport=pci addr=00:02.0 bytes=64 ok=1 irqs=1\n");
    out.push_str(
        "VMKIT-VIRTIO-ERROR transport=mmio addr=0xfeb00e00 device=0 reason=not_version_2\n",
    );
    out.push_str("VMKIT-MSIX vectors=11 cpus=64 cpus_targeted=11 cpus_hit=64 interrupts=87 wrong_cpu=0 rotation_cpus=64 rotation_hit=64\n");
    greport::write_exit_line(&mut out, 0);
    let r = parse_report(&out).unwrap();
    let d = &r.devices;
    let pci = d.pci.as_ref().unwrap();
    assert!(pci.ecam);
    assert_eq!(pci.ecam_base, Some(0xE000_0000));
    assert_eq!((pci.devices, pci.assigned, pci.relocated), (3, 4, 2));
    assert_eq!(d.pci_functions[0].vendor, 0x1af4);
    assert_eq!(d.pci_functions[0].device, 0x1042);
    assert_eq!(d.pci_functions[0].class, 0x10000);
    assert_eq!(d.blk[0].transport, Transport::Pci("00:1f.3".into()));
    assert_eq!(d.blk[0].verify, Verify::Ok);
    assert_eq!(d.blk[0].flush, Flush::Unsupported);
    assert_eq!(
        (d.blk[0].queues, d.blk[0].bytes, d.blk[0].irqs),
        (4, 1 << 20, 7)
    );
    let b = &d.blk_bench[0];
    assert_eq!(b.transport, Transport::Mmio(0xFEB0_0E00));
    assert_eq!(b.seq_write_mibps, Hundredths(34_803));
    assert_eq!(b.seq_read_mibps, Hundredths(7));
    assert!((b.seq_write_mibps.as_f64() - 348.03).abs() < 1e-9);
    assert_eq!((b.qd, b.rand_read_iops), (16, 5251));
    assert_eq!(d.console[0].echo, Echo::Ok);
    assert_eq!(d.console[0].name, "vmkit.echo");
    assert!(d.rng[0].ok);
    assert_eq!(d.errors[0].reason, "not_version_2");
    let m = d.msix.unwrap();
    assert_eq!((m.cpus, m.cpus_hit, m.rotation_hit), (64, 64, 64));
    assert!(!d.no_virtio());
    assert!(r.other_lines.is_empty());

    // Without devices: no virtio lines, and the report is what it always was.
    let mut plain = String::new();
    greport::write_boot_line(&mut plain, "pvh", b"");
    greport::write_cpus_line(&mut plain, 1, 1, &[0], true);
    greport::write_topo_line(&mut plain, 0, 0, true);
    plain.push_str(
        "VMKIT-PCI access=legacy ecam=- buses=1 devices=0 assigned=0 relocated=0 failed=0\n",
    );
    greport::write_exit_line(&mut plain, 0);
    let r = parse_report(&plain).unwrap();
    assert!(r.devices.no_virtio());
    assert_eq!(r.devices.pci.as_ref().map(|p| p.ecam), Some(false));
}

#[test]
fn malformed_device_lines_are_errors() {
    let head = "VMKIT-GUEST boot=pvh cmdline=\"\"\nVMKIT-GUEST cpus=1 expected=1 apic_ids=0 x2apic=0\nVMKIT-GUEST topo smt_bits=0 core_bits=0 consistent=1\nVMKIT-GUEST exit=0\n";
    for bad in [
        "VMKIT-PCI access=pcie ecam=- buses=1 devices=0 assigned=0 relocated=0 failed=0",
        "VMKIT-PCI access=ecam ecam=e0000000 buses=1 devices=0 assigned=0 relocated=0 failed=0",
        "VMKIT-PCI-DEV bdf=00:01.0 id=1af41042 class=0x0 bar_bytes=0",
        "VMKIT-VIRTIO-BLK transport=usb addr=x queues=1 capacity=0 verify=ok bytes=0 bad_sectors=0 io_errors=0 flush=ok irqs=0 us=0",
        "VMKIT-VIRTIO-BLK transport=pci addr=00:01.0 queues=1 capacity=0 verify=maybe bytes=0 bad_sectors=0 io_errors=0 flush=ok irqs=0 us=0",
        "VMKIT-VIRTIO-BLK-BENCH transport=pci addr=00:01.0 queues=1 qd=1 bs=512 ms=1 seq_write_mibps=1.5 seq_read_mibps=1.00 rand_read_iops=1 io_errors=0",
        "VMKIT-VIRTIO-CONSOLE transport=pci addr=00:03.0 port=1 name=x sent=1 received=1 echo=yes irqs=0",
        "VMKIT-VIRTIO-RNG transport=mmio addr=feb00000 bytes=1 ok=1 irqs=0",
        "VMKIT-MSIX vectors=1",
    ] {
        let out = format!("{head}{bad}\n");
        assert!(
            matches!(parse_report(&out), Err(crate::ReportError::Malformed { .. })),
            "{bad:?} gave {:?}",
            parse_report(&out)
        );
    }
}

#[test]
fn option_values() {
    use crate::guest_src::options::*;
    assert_eq!(parse_u64(b"42"), Some(42));
    assert_eq!(parse_u64(b"0xfeb00e00"), Some(0xFEB0_0E00));
    assert_eq!(parse_u64(b"0x"), None);
    assert_eq!(parse_u64(b""), None);
    assert_eq!(parse_u64(b"99999999999999999999"), None);
    assert_eq!(parse_size(b"4K"), Some(4096));
    assert_eq!(parse_size(b"512"), Some(512));
    assert_eq!(parse_size(b"2m"), Some(2 << 20));
    assert_eq!(parse_size(b"K"), None);
    assert_eq!(
        parse_virtio_mmio(b"4K@0xf0000000:16"),
        Some(MmioDevice {
            size: 4096,
            base: 0xF000_0000,
            irq: 16
        })
    );
    assert_eq!(
        parse_virtio_mmio(b"512@0xfeb00e00:12:3").map(|d| d.irq),
        Some(12)
    );
    for bad in [
        &b"4K@0xf0000000"[..],
        b"@0x1:2",
        b"4K0xf0000000:16",
        b"0@0x1:2",
        b"1@0x1:2:3:4",
        b"4K@0xffffffffffffffff:1",
    ] {
        assert_eq!(
            parse_virtio_mmio(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        parse_range(b"0xc0000000-0xe0000000"),
        Some((0xC000_0000, 0xE000_0000))
    );
    assert_eq!(parse_range(b"5-5"), None);
}

#[test]
fn mcfg_is_found() {
    let mut mem = VecMem::new(0x10_0000);
    build_acpi(&mut mem, 0xF_0010, true, &[(0, true)], &[]);
    assert_eq!(acpi::find_ecam(&mem, Some(0xF_0010)), None);
    // Add an MCFG to the XSDT at 0x2000 (36 + 2 entries, see build_acpi).
    let mcfg = 0x4000u64;
    sdt_header(&mut mem, mcfg, b"MCFG", 44 + 32);
    mem.write_u64(mcfg + 44, 0xB000_0000);
    mem.write(mcfg + 52, &[1, 0, 0, 0xFF]); // segment 1: skipped
    mem.write_u64(mcfg + 60, 0xE000_0000);
    mem.write(mcfg + 68, &[0, 0, 0, 0x3F]);
    fix_checksum(&mut mem, mcfg, 76, mcfg + 9);
    let root = 0x2000u64;
    sdt_header(&mut mem, root, b"XSDT", 36 + 24);
    mem.write_u64(root + 36, 0x2800);
    mem.write_u64(root + 44, 0x3000);
    mem.write_u64(root + 52, mcfg);
    fix_checksum(&mut mem, root, 60, root + 9);
    assert_eq!(
        acpi::find_ecam(&mem, Some(0xF_0010)),
        Some(acpi::Ecam {
            base: 0xE000_0000,
            start_bus: 0,
            end_bus: 0x3F
        })
    );
}

proptest! {
    #[test]
    fn option_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        use crate::guest_src::options::*;
        let _ = parse_virtio_mmio(&bytes);
        let _ = parse_range(&bytes);
        let _ = parse_size(&bytes);
    }

    #[test]
    fn device_lines_never_panic(
        lines in proptest::collection::vec(
            "VMKIT-(PCI|PCI-DEV|VIRTIO-BLK|VIRTIO-BLK-BENCH|VIRTIO-CONSOLE|VIRTIO-RNG|VIRTIO-ERROR|MSIX) [ -~]{0,80}", 0..6)
    ) {
        let _ = parse_report(&lines.join("\n"));
    }
}
