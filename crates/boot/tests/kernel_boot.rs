// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Kernel loading, initramfs placement and boot data (zero page, PVH start info), checked by
//! reading guest memory back.
#![allow(clippy::unwrap_used)]

use std::io::{Cursor, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_boot::kernel::bzimage::synthetic_bzimage;
use vmkit_boot::layout::{CMDLINE_START, PVH_INFO_START, ZERO_PAGE_START};
use vmkit_boot::linux::boot_params;
use vmkit_boot::pvh::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vmkit_boot::{
    configure_boot, load_initramfs, load_initramfs_from, load_kernel, load_kernel_from, BootConfig,
    BootProtocol, E820Type, Error, KernelFormat, KernelOptions, MmioGap,
};

type Mem = GuestMemoryMmap<()>;

const GAP: MmioGap = MmioGap::below_4g(0xc000_0000);
const MIB: u64 = 1 << 20;

fn mem(size: u64) -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
}

/// Hand-assembled ELF64 x86_64 executable: one PT_LOAD at `paddr` with `code` followed by
/// `bss` zero bytes, and optionally a PT_NOTE (a GNU note, then the PVH note when
/// `pvh_entry` is set).
fn make_elf(paddr: u64, entry: u64, code: &[u8], bss: u64, pvh_entry: Option<u32>) -> Vec<u8> {
    let mut notes = Vec::new();
    let mut note = |name: &[u8], ty: u32, desc: &[u8]| {
        notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
        notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        notes.extend_from_slice(&ty.to_le_bytes());
        notes.extend_from_slice(name);
        notes.resize(notes.len().next_multiple_of(4), 0);
        notes.extend_from_slice(desc);
        notes.resize(notes.len().next_multiple_of(4), 0);
    };
    note(b"GNU\0", 3, &[0xab; 20]);
    if let Some(e) = pvh_entry {
        note(b"Xen\0", 18, &e.to_le_bytes());
    }
    let phnum = 2u16;
    let note_off = 64 + 56 * u64::from(phnum);
    let code_off = (note_off + notes.len() as u64).next_multiple_of(16);

    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&56u16.to_le_bytes());
    f.extend_from_slice(&phnum.to_le_bytes());
    f.extend_from_slice(&[0; 6]);
    assert_eq!(f.len(), 64);
    let mut phdr = |ty: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
        f.extend_from_slice(&ty.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes());
        f.extend_from_slice(&off.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&filesz.to_le_bytes());
        f.extend_from_slice(&memsz.to_le_bytes());
        f.extend_from_slice(&16u64.to_le_bytes());
    };
    phdr(
        1,
        code_off,
        paddr,
        code.len() as u64,
        code.len() as u64 + bss,
    );
    phdr(4, note_off, 0, notes.len() as u64, notes.len() as u64);
    f.extend_from_slice(&notes);
    f.resize(code_off as usize, 0);
    f.extend_from_slice(code);
    f
}

fn read_boot_params(m: &Mem) -> boot_params {
    m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
}

fn read_cstr(m: &Mem, addr: u64) -> String {
    let mut buf = vec![0u8; 256];
    m.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    let end = buf.iter().position(|&b| b == 0).unwrap();
    String::from_utf8(buf[..end].to_vec()).unwrap()
}

#[test]
fn elf_with_pvh_note_boots_pvh() {
    let m = mem(64 * MIB);
    // Dirty the bss first: the loader must zero it.
    m.write_slice(&[0xcc; 0x100], GuestAddress(0x20_0000 + 4))
        .unwrap();
    let elf = make_elf(
        0x20_0000,
        0x20_0000,
        &[0x90, 0x90, 0xf4, 0xeb],
        0x1000,
        Some(0x20_0001),
    );
    let k = load_kernel_from(
        &m,
        &mut Cursor::new(elf),
        "pvh.elf",
        &KernelOptions::new(GAP),
    )
    .unwrap();
    assert_eq!(k.format, KernelFormat::Elf);
    assert_eq!(k.protocol, BootProtocol::Pvh);
    assert_eq!(k.entry, 0x20_0001);
    assert_eq!(k.entry64, 0x20_0000);
    assert_eq!((k.load_addr, k.kernel_end), (0x20_0000, 0x20_1004));
    let mut code = [0u8; 8];
    m.read_slice(&mut code, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(code, [0x90, 0x90, 0xf4, 0xeb, 0, 0, 0, 0]);

    let mut cfg = BootConfig::new("console=ttyS0 quiet", GAP);
    cfg.rsdp_addr = Some(0xe0000);
    let info = configure_boot(&m, &k, &cfg).unwrap();
    assert_eq!(info.boot_data_addr, PVH_INFO_START);
    let r = info.registers;
    assert_eq!((r.rip, r.rbx, r.rsi), (0x20_0001, PVH_INFO_START, 0));
    assert_eq!((r.cr0 & 1, r.cr0 >> 31, r.cr4, r.efer), (1, 0, 0, 0));
    assert_eq!((r.cs.selector, r.cs.db, r.cs.l), (0x08, 1, 0));
    assert_eq!(r.ds.selector, 0x18);
    assert_eq!((r.gdt_base, r.gdt_limit, r.idt_base), (0x500, 31, 0x520));

    let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!(si.magic, 0x336e_c578);
    assert_eq!(si.version, 1);
    assert_eq!(si.cmdline_paddr, CMDLINE_START);
    assert_eq!(si.rsdp_paddr, 0xe0000);
    assert_eq!(si.nr_modules, 0);
    assert_eq!(si.memmap_entries, 3);
    assert_eq!(read_cstr(&m, si.cmdline_paddr), "console=ttyS0 quiet");
    let e: Vec<hvm_memmap_table_entry> = (0..si.memmap_entries as u64)
        .map(|i| m.read_obj(GuestAddress(si.memmap_paddr + i * 24)).unwrap())
        .collect();
    assert_eq!((e[0].addr, e[0].size, e[0].type_), (0, 0x9fc00, 1));
    assert_eq!((e[1].addr, e[1].size, e[1].type_), (0x9fc00, 0x60400, 2));
    assert_eq!((e[2].addr, e[2].size, e[2].type_), (MIB, 63 * MIB, 1));

    // GDT in memory matches the reported entries.
    for (i, want) in info.gdt.entries.iter().enumerate() {
        let got: u64 = m.read_obj(GuestAddress(0x500 + 8 * i as u64)).unwrap();
        assert_eq!(got, *want);
    }
}

#[test]
fn elf_with_pvh_note_can_be_forced_to_linux64() {
    let m = mem(64 * MIB);
    let elf = make_elf(0x20_0000, 0x20_0000, &[0xf4], 0, Some(0x20_0001));
    let opts = KernelOptions {
        mmio_gap: GAP,
        force_linux64: true,
    };
    let k = load_kernel_from(&m, &mut Cursor::new(elf), "pvh.elf", &opts).unwrap();
    assert_eq!(k.protocol, BootProtocol::Linux64);
    assert_eq!(k.entry, 0x20_0000);
    assert_eq!(k.pvh_entry, Some(0x20_0001));
}

#[test]
fn elf_without_pvh_note_boots_linux64_with_zero_page() {
    let m = mem(64 * MIB);
    let elf = make_elf(0x100_0000, 0x100_0000, &[0xf4; 32], 0x10_0000, None);
    let k = load_kernel_from(
        &m,
        &mut Cursor::new(elf),
        "vmlinux",
        &KernelOptions::new(GAP),
    )
    .unwrap();
    assert_eq!(k.protocol, BootProtocol::Linux64);
    assert_eq!(k.pvh_entry, None);
    assert_eq!(k.entry, 0x100_0000);
    let info = configure_boot(&m, &k, &BootConfig::new("root=/dev/vda", GAP)).unwrap();
    let r = info.registers;
    assert_eq!((r.rip, r.rsi, r.cr3), (0x100_0000, ZERO_PAGE_START, 0x9000));
    assert_eq!((r.cs.selector, r.cs.l, r.ds.selector), (0x10, 1, 0x18));
    assert_ne!(r.cr0 & (1 << 31), 0);
    assert_eq!(r.efer, 0x500);
    let bp = read_boot_params(&m);
    let hdr = bp.hdr;
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
    assert_eq!({ hdr.kernel_alignment }, 0x100_0000);
    assert_eq!(read_cstr(&m, CMDLINE_START), "root=/dev/vda");
    assert_eq!({ bp.acpi_rsdp_addr }, 0);
}

#[test]
fn bzimage_is_detected_from_content_and_loaded_at_1mib() {
    let m = mem(128 * MIB);
    let img = synthetic_bzimage(0x4000, 0x200_0000);
    // The name says ELF; the content decides.
    let k = load_kernel_from(
        &m,
        &mut Cursor::new(img.clone()),
        "kernel.elf",
        &KernelOptions::new(GAP),
    )
    .unwrap();
    assert_eq!(k.format, KernelFormat::BzImage);
    assert_eq!(k.protocol, BootProtocol::Linux64);
    assert_eq!(k.entry, MIB + 0x200);
    assert_eq!(k.kernel_end, 0x100_0000 + 0x200_0000);
    let mut payload = vec![0u8; 0x4000];
    m.read_slice(&mut payload, GuestAddress(MIB)).unwrap();
    assert_eq!(payload, img[2048..]);

    // Initramfs at the top of RAM, page aligned, and in the zero page.
    let rd = vec![0x5a; 10_000];
    let initrd = load_initramfs_from(&m, &mut Cursor::new(rd.clone()), "initrd", &k, GAP).unwrap();
    assert_eq!(initrd.addr, (128 * MIB - 10_000) & !0xfff);
    assert_eq!(initrd.size, 10_000);
    let mut back = vec![0u8; 10_000];
    m.read_slice(&mut back, GuestAddress(initrd.addr)).unwrap();
    assert_eq!(back, rd);

    let mut cfg = BootConfig::new("console=ttyS0", GAP);
    cfg.initramfs = Some(initrd);
    cfg.rsdp_addr = Some(0xe0000);
    let info = configure_boot(&m, &k, &cfg).unwrap();
    assert_eq!(info.registers.rip, MIB + 0x200);
    let bp = read_boot_params(&m);
    let hdr = bp.hdr;
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!({ hdr.version }, 0x020f, "copied from the image");
    assert_eq!({ hdr.cmdline_size }, 2048, "copied from the image");
    assert_eq!({ hdr.code32_start }, MIB as u32);
    assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
    assert_eq!({ hdr.ramdisk_image }, initrd.addr as u32);
    assert_eq!({ hdr.ramdisk_size }, 10_000);
    assert_eq!({ bp.acpi_rsdp_addr }, 0xe0000);
    assert_eq!(bp.e820_entries, 3);
    let e = bp.e820_table;
    assert_eq!(
        ({ e[2].addr }, { e[2].size }, { e[2].r#type }),
        (MIB, 127 * MIB, 1)
    );

    // The kernel's cmdline_size applies.
    let long = "x".repeat(2049);
    let err = configure_boot(&m, &k, &BootConfig::new(long, GAP)).unwrap_err();
    assert!(
        matches!(err, Error::CmdlineTooLong { max: 2048, .. }),
        "{err}"
    );
}

#[test]
fn memory_map_across_the_gap_in_zero_page() {
    let gap = MmioGap::below_4g(0xc000_0000);
    let m = Mem::from_ranges(&[
        (GuestAddress(0), 0xc000_0000),
        (GuestAddress(1 << 32), 1 << 30),
    ])
    .unwrap();
    let elf = make_elf(0x20_0000, 0x20_0000, &[0xf4], 0, None);
    let k = load_kernel_from(&m, &mut Cursor::new(elf), "k", &KernelOptions::new(gap)).unwrap();
    let mut cfg = BootConfig::new("", gap);
    cfg.extra_e820.push(vmkit_boot::E820Entry {
        addr: 0xb000_0000,
        size: 0x1000_0000,
        kind: E820Type::Reserved,
    });
    let info = configure_boot(&m, &k, &cfg).unwrap();
    let bp = read_boot_params(&m);
    let e = bp.e820_table;
    let got: Vec<(u64, u64, u32)> = (0..bp.e820_entries as usize)
        .map(|i| (e[i].addr, e[i].size, e[i].r#type))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 0x9fc00, 1),
            (0x9fc00, 0x60400, 2),
            (MIB, 0xb000_0000 - MIB, 1),
            (0xb000_0000, 0x1000_0000, 2),
            (1 << 32, 1 << 30, 1),
        ]
    );
    assert_eq!(info.memory_map.len(), 5);

    // Initramfs stays below the gap (and below the reserved range's end it cannot cross).
    let rd = vec![1u8; 4096 * 3];
    let initrd = load_initramfs_from(&m, &mut Cursor::new(rd), "rd", &k, gap).unwrap();
    assert_eq!(initrd.addr, 0xc000_0000 - 3 * 4096);
}

#[test]
fn pvh_start_info_lists_the_initramfs_module() {
    let m = mem(64 * MIB);
    let elf = make_elf(0x20_0000, 0x20_0000, &[0xf4], 0, Some(0x20_0000));
    let k = load_kernel_from(&m, &mut Cursor::new(elf), "k", &KernelOptions::new(GAP)).unwrap();
    let initrd = load_initramfs_from(&m, &mut Cursor::new(vec![7u8; 5000]), "rd", &k, GAP).unwrap();
    let mut cfg = BootConfig::new("x", GAP);
    cfg.initramfs = Some(initrd);
    configure_boot(&m, &k, &cfg).unwrap();
    let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!(si.nr_modules, 1);
    assert_eq!(si.rsdp_paddr, 0);
    let module: hvm_modlist_entry = m.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
    assert_eq!((module.paddr, module.size), (initrd.addr, 5000));
}

#[test]
fn files_are_loaded_and_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let kpath = dir.path().join("guest.bin");
    std::fs::File::create(&kpath)
        .unwrap()
        .write_all(&make_elf(
            0x20_0000,
            0x20_0000,
            &[0xf4],
            0x10,
            Some(0x20_0000),
        ))
        .unwrap();
    let rpath = dir.path().join("initrd.img");
    std::fs::write(&rpath, [3u8; 100]).unwrap();
    let m = mem(32 * MIB);
    let k = load_kernel(&m, &kpath, &KernelOptions::new(GAP)).unwrap();
    assert_eq!(k.protocol, BootProtocol::Pvh);
    assert!(k.name.ends_with("guest.bin"));
    let rd = load_initramfs(&m, &rpath, &k, GAP).unwrap();
    assert_eq!(rd.size, 100);

    let missing = dir.path().join("nope");
    let err = load_kernel(&m, &missing, &KernelOptions::new(GAP)).unwrap_err();
    assert!(matches!(err, Error::KernelFile { .. }));
    assert!(err.to_string().contains("nope"), "{err}");
    let err = load_initramfs(&m, &missing, &k, GAP).unwrap_err();
    assert!(matches!(err, Error::InitramfsFile { .. }));
    let err = load_kernel(&m, dir.path(), &KernelOptions::new(GAP)).unwrap_err();
    assert!(matches!(err, Error::KernelFile { .. }), "{err}");
}

#[test]
fn loading_errors() {
    let m = mem(16 * MIB);
    let opts = KernelOptions::new(GAP);
    let load = |bytes: Vec<u8>| load_kernel_from(&m, &mut Cursor::new(bytes), "img", &opts);

    assert!(matches!(
        load(b"#!/bin/sh\necho hi\n".to_vec()),
        Err(Error::NotAKernel { .. })
    ));
    assert!(matches!(load(vec![]), Err(Error::NotAKernel { .. })));

    let mut elf32 = make_elf(0x20_0000, 0x20_0000, &[0xf4], 0, None);
    elf32[4] = 1;
    let err = load(elf32).unwrap_err();
    assert!(err.to_string().contains("32-bit"), "{err}");

    let mut arm = make_elf(0x20_0000, 0x20_0000, &[0xf4], 0, None);
    arm[18] = 183;
    assert!(matches!(load(arm), Err(Error::BadElf { .. })));

    let truncated = make_elf(0x20_0000, 0x20_0000, &[0xf4; 64], 0, None);
    let err = load(truncated[..truncated.len() - 10].to_vec()).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");

    // 32 MiB of bss in a 16 MiB guest.
    let err = load(make_elf(0x20_0000, 0x20_0000, &[0xf4], 32 * MIB, None)).unwrap_err();
    assert!(matches!(err, Error::KernelTooBig { .. }), "{err}");
    assert!(
        err.to_string().contains("RAM there ends at 0x1000000"),
        "{err}"
    );

    // Below 1 MiB is boot data.
    let err = load(make_elf(0x8000, 0x8000, &[0xf4], 0, None)).unwrap_err();
    assert!(matches!(err, Error::KernelTooBig { .. }), "{err}");

    // In the MMIO gap.
    let big = mem(16 * MIB);
    let gap = MmioGap::below_4g(0xc0_0000);
    let err = load_kernel_from(
        &big,
        &mut Cursor::new(make_elf(0xd0_0000, 0xd0_0000, &[0xf4], 0, None)),
        "img",
        &KernelOptions::new(gap),
    )
    .unwrap_err();
    assert!(err.to_string().contains("MMIO gap"), "{err}");

    // bzImage whose init_size does not fit.
    let err = load(synthetic_bzimage(0x1000, 0x100_0000)).unwrap_err();
    assert!(matches!(err, Error::KernelTooBig { .. }), "{err}");

    // Initramfs bigger than the free RAM.
    let k = load(make_elf(0x20_0000, 0x20_0000, &[0xf4], 0, None)).unwrap();
    let err = load_initramfs_from(
        &m,
        &mut Cursor::new(vec![0u8; 15 * MIB as usize]),
        "big.cpio",
        &k,
        GAP,
    )
    .unwrap_err();
    assert!(matches!(err, Error::InitramfsTooBig { .. }), "{err}");
    assert!(err.to_string().contains("big.cpio"), "{err}");
    let err = load_initramfs_from(&m, &mut Cursor::new(vec![]), "empty", &k, GAP).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");

    // Command line longer than the 64 KiB area.
    let err = configure_boot(&m, &k, &BootConfig::new("a".repeat(70_000), GAP)).unwrap_err();
    assert!(matches!(err, Error::CmdlineTooLong { .. }), "{err}");

    // Boot data needs low memory.
    let high_only = Mem::from_ranges(&[(GuestAddress(MIB), 16 * MIB as usize)]).unwrap();
    let k = load_kernel_from(
        &high_only,
        &mut Cursor::new(make_elf(0x20_0000, 0x20_0000, &[0xf4], 0, None)),
        "k",
        &opts,
    )
    .unwrap();
    let err = configure_boot(&high_only, &k, &BootConfig::new("", GAP)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MissingMemory {
                what: "boot GDT",
                ..
            }
        ),
        "{err}"
    );
}
