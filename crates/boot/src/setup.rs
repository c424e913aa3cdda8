// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Writing all boot data for a loaded kernel, and the register state the BSP starts with.

use vm_memory::GuestMemoryBackend;

use crate::cmdline::write_cmdline;
use crate::e820::{build_memory_map, memory_ranges, E820Entry, MmioGap};
use crate::error::Result;
use crate::gdt::{BootGdt, Segment};
use crate::kernel::{BootProtocol, Initramfs, LoadedKernel};
use crate::layout::{BOOT_STACK_POINTER, IDT_SIZE, IDT_START};
use crate::linux::{build_boot_params, write_boot_params, ZeroPageConfig};
use crate::paging::write_identity_page_tables;
use crate::pvh::{build_start_info, write_start_info};

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (hard-wired to 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE: native x87 error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1, which is always set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;

/// What to write besides the kernel.
#[derive(Clone, Debug)]
pub struct BootConfig {
    /// Kernel command line (no NUL; at most [`CMDLINE_MAX_SIZE`](crate::layout::CMDLINE_MAX_SIZE)
    /// - 1 bytes and at most the bzImage's `cmdline_size`).
    pub cmdline: String,
    /// Initramfs loaded with [`load_initramfs`](crate::load_initramfs).
    pub initramfs: Option<Initramfs>,
    /// ACPI RSDP address (from [`write_acpi_tables`](crate::acpi::write_acpi_tables)).
    pub rsdp_addr: Option<u64>,
    /// The 32-bit MMIO gap.
    pub mmio_gap: MmioGap,
    /// Extra non-RAM memory map entries (e.g. a PCI ECAM window), carved out of RAM.
    pub extra_e820: Vec<E820Entry>,
}

impl BootConfig {
    /// A configuration with a command line and a gap, and nothing else.
    pub fn new(cmdline: impl Into<String>, mmio_gap: MmioGap) -> Self {
        BootConfig {
            cmdline: cmdline.into(),
            initramfs: None,
            rsdp_addr: None,
            mmio_gap,
            extra_e820: Vec::new(),
        }
    }
}

/// Initial register state of the bootstrap processor, in `kvm_regs`/`kvm_sregs` terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootRegisters {
    /// Instruction pointer (the entry point).
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Flags.
    pub rflags: u64,
    /// `rsi`: `boot_params` address (Linux 64-bit), else 0.
    pub rsi: u64,
    /// `rbx`: `hvm_start_info` address (PVH), else 0.
    pub rbx: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3 (page-table root; 0 for PVH, which starts with paging off).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// Code segment.
    pub cs: Segment,
    /// Data segment, also used for `es`, `fs`, `gs` and `ss`.
    pub ds: Segment,
    /// Task register.
    pub tr: Segment,
    /// GDTR base.
    pub gdt_base: u64,
    /// GDTR limit.
    pub gdt_limit: u16,
    /// IDTR base.
    pub idt_base: u64,
    /// IDTR limit.
    pub idt_limit: u16,
}

/// Where everything went, and how to enter the kernel.
#[derive(Clone, Debug)]
pub struct BootInfo {
    /// Boot protocol.
    pub protocol: BootProtocol,
    /// Entry point.
    pub entry: u64,
    /// `hvm_start_info` (PVH) or `boot_params` (Linux 64-bit) address.
    pub boot_data_addr: u64,
    /// Page-table root (PML4) of the identity map (written for both protocols).
    pub page_table_root: u64,
    /// The boot GDT.
    pub gdt: BootGdt,
    /// Boot IDT address.
    pub idt_addr: u64,
    /// Command line address.
    pub cmdline_addr: u64,
    /// The memory map given to the kernel.
    pub memory_map: Vec<E820Entry>,
    /// Initial BSP registers.
    pub registers: BootRegisters,
}

/// Initial BSP registers for `protocol`.
pub fn boot_registers(
    protocol: BootProtocol,
    entry: u64,
    boot_data_addr: u64,
    page_table_root: u64,
    gdt: &BootGdt,
) -> BootRegisters {
    let common = BootRegisters {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rflags: RFLAGS_RESERVED,
        rsi: 0,
        rbx: 0,
        cr0: 0,
        cr3: 0,
        cr4: 0,
        efer: 0,
        cs: gdt.code64(),
        ds: gdt.data(),
        tr: gdt.tss_segment(),
        gdt_base: gdt.addr,
        gdt_limit: gdt.limit(),
        idt_base: IDT_START,
        idt_limit: (IDT_SIZE - 1) as u16,
    };
    match protocol {
        BootProtocol::Pvh => BootRegisters {
            rbx: boot_data_addr,
            cr0: CR0_PE | CR0_ET,
            cs: gdt.code32(),
            ..common
        },
        BootProtocol::Linux64 => BootRegisters {
            rsi: boot_data_addr,
            cr0: CR0_PE | CR0_ET | CR0_NE | CR0_PG,
            cr3: page_table_root,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            ..common
        },
    }
}

/// Writes the GDT/IDT, the identity page tables, the command line and the protocol's boot
/// data (`boot_params` or `hvm_start_info` + memory map + module list) for `kernel`.
pub fn configure_boot<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &LoadedKernel,
    cfg: &BootConfig,
) -> Result<BootInfo> {
    let memory_map = build_memory_map(&memory_ranges(mem), cfg.mmio_gap, &cfg.extra_e820)?;
    let gdt = BootGdt::new();
    gdt.write(mem)?;
    let page_table_root = write_identity_page_tables(mem)?;
    let cmdline_addr = write_cmdline(mem, &cfg.cmdline, kernel.cmdline_max)?;

    let boot_data_addr = match kernel.protocol {
        BootProtocol::Linux64 => {
            let params = build_boot_params(&ZeroPageConfig {
                header: kernel.setup_header.as_ref(),
                cmdline_addr,
                initramfs: cfg.initramfs,
                rsdp_addr: cfg.rsdp_addr,
                memory_map: &memory_map,
            })?;
            write_boot_params(mem, &params)?
        }
        BootProtocol::Pvh => {
            let data = build_start_info(cmdline_addr, cfg.initramfs, cfg.rsdp_addr, &memory_map)?;
            write_start_info(mem, &data)?
        }
    };
    let registers = boot_registers(
        kernel.protocol,
        kernel.entry,
        boot_data_addr,
        page_table_root,
        &gdt,
    );
    Ok(BootInfo {
        protocol: kernel.protocol,
        entry: kernel.entry,
        boot_data_addr,
        page_table_root,
        gdt,
        idt_addr: IDT_START,
        cmdline_addr,
        memory_map,
        registers,
    })
}
