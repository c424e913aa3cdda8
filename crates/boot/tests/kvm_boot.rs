// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Boots tiny hand-assembled kernels in KVM with the register state from `BootInfo`, to
//! prove the GDT, segments, page tables and boot data work on a real vCPU. Needs /dev/kvm.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmkit_boot::kernel::bzimage::synthetic_bzimage;
use vmkit_boot::{
    configure_boot, load_kernel_from, BootConfig, BootInfo, BootProtocol, KernelOptions, MmioGap,
    Segment,
};

type Mem = GuestMemoryMmap<()>;
const GAP: MmioGap = MmioGap::below_4g(0xc000_0000);
const PORT: u16 = 0x99;

fn seg(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

/// Runs the BSP from `info` until `hlt`; returns the dwords written to `PORT`.
fn run(mem: &Mem, info: &BootInfo) -> Vec<u32> {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).unwrap();
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped for the life of `mem`, which outlives the VM.
        unsafe { vm.set_user_memory_region(r).unwrap() };
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();

    let r = &info.registers;
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs = seg(&r.cs);
    sregs.ds = seg(&r.ds);
    sregs.es = seg(&r.ds);
    sregs.fs = seg(&r.ds);
    sregs.gs = seg(&r.ds);
    sregs.ss = seg(&r.ds);
    sregs.tr = seg(&r.tr);
    sregs.gdt.base = r.gdt_base;
    sregs.gdt.limit = r.gdt_limit;
    sregs.idt.base = r.idt_base;
    sregs.idt.limit = r.idt_limit;
    sregs.cr0 = r.cr0;
    sregs.cr3 = r.cr3;
    sregs.cr4 = r.cr4;
    sregs.efer = r.efer;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = r.rip;
    regs.rsp = r.rsp;
    regs.rflags = r.rflags;
    regs.rsi = r.rsi;
    regs.rbx = r.rbx;
    vcpu.set_regs(&regs).unwrap();

    let mut out = Vec::new();
    for _ in 0..100 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, PORT);
                out.push(u32::from_le_bytes(data.try_into().unwrap()));
            }
            VcpuExit::Hlt => return out,
            other => panic!("unexpected exit {other:?}; output so far {out:x?}"),
        }
    }
    panic!("guest did not halt; output {out:x?}");
}

/// 64-bit code: out(rsi); out(dword at rsi+0x202 = "HdrS"); out(high half of a 64-bit
/// immediate, which only long mode computes); out(dword at 0xbfff_f000, reached through the
/// identity map above 2 GiB); hlt.
fn code64() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, PORT as u8, 0x00]; // mov dx, PORT
    c.extend([0x89, 0xf0, 0xef]); // mov eax, esi; out dx, eax
    c.extend([0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, 0xef]); // mov eax, [rsi+0x202]; out
    c.extend([0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]); // mov rax, imm64
    c.extend([0x48, 0xc1, 0xe8, 0x20, 0xef]); // shr rax, 32; out
    c.extend([0xa1, 0x00, 0xf0, 0xff, 0xbf, 0, 0, 0, 0, 0xef]); // mov eax, [moffs64 0xbffff000]; out
    c.push(0xf4); // hlt
    c
}

/// 32-bit code: out(ebx); out(dword at ebx = start_info magic); hlt.
fn code32() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, PORT as u8, 0x00]; // mov dx, PORT
    c.extend([0x89, 0xd8, 0xef]); // mov eax, ebx; out
    c.extend([0x8b, 0x03, 0xef]); // mov eax, [ebx]; out
    c.push(0xf4);
    c
}

fn elf(entry: u64, code: &[u8], pvh: bool) -> Vec<u8> {
    // Minimal ELF64: header, PT_LOAD at `entry`, optional PT_NOTE with the PVH entry.
    let mut note = Vec::new();
    if pvh {
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(entry as u32).to_le_bytes());
    }
    let phnum: u16 = if pvh { 2 } else { 1 };
    let data_off = 64 + 56 * u64::from(phnum);
    let code_off = data_off + note.len() as u64;
    let mut f = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    f.extend_from_slice(&2u16.to_le_bytes());
    f.extend_from_slice(&62u16.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&56u16.to_le_bytes());
    f.extend_from_slice(&phnum.to_le_bytes());
    f.extend_from_slice(&[0; 6]);
    let mut ph = |ty: u32, off: u64, addr: u64, size: u64| {
        for v in [u64::from(ty) | (7 << 32), off, addr, addr, size, size, 16] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    ph(1, code_off, entry, code.len() as u64);
    if pvh {
        ph(4, data_off, 0, note.len() as u64);
    }
    f.extend_from_slice(&note);
    f.extend_from_slice(code);
    f
}

fn big_mem() -> Mem {
    // RAM up to the gap so that 0xbffff000 is reachable through the identity map.
    let m = Mem::from_ranges(&[(GuestAddress(0), 0xc000_0000)]).unwrap();
    vm_memory::Bytes::write_obj(&m, 0xfeed_f00du32, GuestAddress(0xbfff_f000)).unwrap();
    m
}

#[test]
fn kvm_pvh_entry_runs_in_protected_mode_with_start_info_in_rbx() {
    if !vmkit_testkit::kvm_available("kvm_pvh_entry_runs_in_protected_mode_with_start_info_in_rbx")
    {
        return;
    }
    let mem = Mem::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let img = elf(0x20_0000, &code32(), true);
    let k = load_kernel_from(&mem, &mut Cursor::new(img), "pvh", &KernelOptions::new(GAP)).unwrap();
    assert_eq!(k.protocol, BootProtocol::Pvh);
    let info = configure_boot(&mem, &k, &BootConfig::new("", GAP)).unwrap();
    assert_eq!(run(&mem, &info), vec![0x6000, 0x336e_c578]);
}

#[test]
fn kvm_elf_linux64_entry_runs_in_long_mode() {
    if !vmkit_testkit::kvm_available("kvm_elf_linux64_entry_runs_in_long_mode") {
        return;
    }
    let mem = big_mem();
    let img = elf(0x20_0000, &code64(), false);
    let k = load_kernel_from(
        &mem,
        &mut Cursor::new(img),
        "vmlinux",
        &KernelOptions::new(GAP),
    )
    .unwrap();
    assert_eq!(k.protocol, BootProtocol::Linux64);
    let info = configure_boot(&mem, &k, &BootConfig::new("", GAP)).unwrap();
    assert_eq!(
        run(&mem, &info),
        vec![
            0x7000,
            u32::from_le_bytes(*b"HdrS"),
            0x1122_3344,
            0xfeed_f00d
        ]
    );
}

#[test]
fn kvm_bzimage_linux64_entry_at_load_plus_0x200() {
    if !vmkit_testkit::kvm_available("kvm_bzimage_linux64_entry_at_load_plus_0x200") {
        return;
    }
    let mem = big_mem();
    let mut img = synthetic_bzimage(0x1000, 0x10_0000);
    let code = code64();
    let at = 2048 + 0x200;
    img[at..at + code.len()].copy_from_slice(&code);
    let k = load_kernel_from(
        &mem,
        &mut Cursor::new(img),
        "bzImage",
        &KernelOptions::new(GAP),
    )
    .unwrap();
    let info = configure_boot(&mem, &k, &BootConfig::new("console=ttyS0", GAP)).unwrap();
    assert_eq!(info.registers.rip, 0x10_0200);
    assert_eq!(
        run(&mem, &info),
        vec![
            0x7000,
            u32::from_le_bytes(*b"HdrS"),
            0x1122_3344,
            0xfeed_f00d
        ]
    );
}

/// A PVH guest built by the system toolchain (cc + ld): the PVH note follows a GNU build-id
/// note in the same segment, the ELF headers form their own segment and `.bss` needs zeroing.
const TOOLCHAIN_GUEST: &str = r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .text
    .code32
    .globl pvh_start
pvh_start:
    movw $0x99, %dx
    movl %ebx, %eax
    outl %eax, %dx
    movl bss_word, %eax
    outl %eax, %dx
    hlt
    .bss
bss_word:
    .space 8192
"#;

#[test]
fn kvm_toolchain_built_pvh_elf_boots() {
    if !vmkit_testkit::kvm_available("kvm_toolchain_built_pvh_elf_boots") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("start.S");
    let out = dir.path().join("guest.elf");
    std::fs::write(&src, TOOLCHAIN_GUEST).unwrap();
    let status = std::process::Command::new("cc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=sha1"])
        .args(["-Wl,-Ttext=0x200000", "-Wl,-e,pvh_start", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("this test needs the system C compiler `cc` to build its guest");
    assert!(status.success(), "cc failed to build the test guest");

    let mem = Mem::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    // Dirty the whole area where .bss lands: the loader must zero it.
    vm_memory::Bytes::write_slice(&mem, &[0xaa; 0x10000], GuestAddress(0x200000)).unwrap();
    let k = vmkit_boot::load_kernel(&mem, &out, &KernelOptions::new(GAP)).unwrap();
    assert_eq!(k.protocol, BootProtocol::Pvh);
    assert_eq!(k.entry, 0x20_0000);
    let info = configure_boot(&mem, &k, &BootConfig::new("", GAP)).unwrap();
    assert_eq!(run(&mem, &info), vec![0x6000, 0]);
}
