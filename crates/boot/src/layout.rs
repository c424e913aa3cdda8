// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Guest-physical layout of the boot data written by this crate.
//!
//! These addresses are fixed so that other crates (vCPU set-up, the machine, the test guest) can
//! rely on them:
//!
//! | range                 | contents                                                  |
//! |-----------------------|-----------------------------------------------------------|
//! | `0x500..0x520`        | boot GDT (4 entries)                                      |
//! | `0x520..0x528`        | boot IDT (one empty entry)                                |
//! | `0x6000..0x6038`      | PVH `hvm_start_info`                                      |
//! | `0x6040..0x6c40`      | PVH memory map table (up to 128 entries)                  |
//! | `0x6c40..0x7000`      | PVH module list (the initramfs)                           |
//! | `0x7000..0x8000`      | Linux `boot_params` (zero page)                           |
//! | `0x8000..0x9000`      | free: the test guest copies its SIPI trampoline here      |
//! | `0x9000..0xa000`      | PML4                                                      |
//! | `0xa000..0xb000`      | PDPT                                                      |
//! | `0xb000..0xf000`      | 4 page directories: identity map of 0..4 GiB, 2 MiB pages |
//! | `0xf000..0x10000`     | initial stack (`rsp` = [`BOOT_STACK_POINTER`])            |
//! | `0x20000..0x30000`    | kernel command line                                       |
//! | `0x9fc00..0xe0000`    | MP floating pointer + configuration table (EBDA)          |
//! | `0xe0000..0x100000`   | ACPI RSDP (at `0xe0000`) and tables                       |
//! | `0x100000..`          | kernel (bzImage payload, or the ELF's own addresses)      |

/// Boot GDT address.
pub const GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT (it must end before [`IDT_START`]).
pub const GDT_ENTRIES: usize = 4;
/// Boot IDT address (a single zero entry; interrupts stay disabled during boot).
pub const IDT_START: u64 = 0x520;
/// Size in bytes of the boot IDT written at [`IDT_START`].
pub const IDT_SIZE: u64 = 8;

/// PVH `hvm_start_info` address (passed in `rbx`).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table address (right after `hvm_start_info`, 64-byte aligned).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Maximum number of PVH memory map entries (same limit as the zero page's e820 table).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 128;
/// PVH module list address (after the largest memory map table).
pub const PVH_MODLIST_START: u64 = 0x6c40;

/// Linux `boot_params` (zero page) address (passed in `rsi`).
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Start of the page that stays free for the guest (SIPI trampoline of the test guest).
pub const FREE_TRAMPOLINE_START: u64 = 0x8000;
/// Size of the free trampoline page.
pub const FREE_TRAMPOLINE_SIZE: u64 = 0x1000;

/// PML4 (page-table root, `cr3`).
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_START: u64 = 0xa000;
/// First of the [`PD_COUNT`] page directories.
pub const PD_START: u64 = 0xb000;
/// Number of page directories (each maps 1 GiB with 2 MiB pages).
pub const PD_COUNT: u64 = 4;
/// Size of the identity map built by the boot page tables (4 GiB).
pub const IDENTITY_MAP_SIZE: u64 = PD_COUNT << 30;

/// Initial stack pointer (top of the page `0xf000..0x10000`).
pub const BOOT_STACK_POINTER: u64 = 0xfff0;

/// Kernel command line address.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum size of the kernel command line, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;

/// Start of the EBDA, where the MP table lives; also the end of low RAM in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer address.
pub const MPTABLE_START: u64 = EBDA_START;
/// Upper bound for the MP table (it must end before the ACPI area).
pub const MPTABLE_LIMIT: u64 = ACPI_START;

/// ACPI RSDP address, also the start of the ACPI table area.
pub const ACPI_START: u64 = 0xe0000;
/// ACPI RSDP address.
pub const RSDP_START: u64 = ACPI_START;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = 0x10_0000;

/// Start of high memory: the bzImage payload is loaded here, and ELF segments must lie above.
pub const HIMEM_START: u64 = 0x10_0000;
/// bzImage load address (the "high load" protocol loads the protected-mode kernel at 1 MiB).
pub const BZIMAGE_LOAD_ADDR: u64 = HIMEM_START;
/// Offset of the 64-bit entry point from the bzImage load address.
pub const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;

/// Local APIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Default IOAPIC MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// 4 GiB.
pub const FOUR_GIB: u64 = 1 << 32;
/// Page size used to align the initramfs.
pub const PAGE_SIZE: u64 = 0x1000;

// The fixed areas must not overlap; checked at compile time.
const _: () = assert!(GDT_START + (GDT_ENTRIES as u64) * 8 <= IDT_START);
const _: () = assert!(PVH_MEMMAP_START >= PVH_INFO_START + 56);
const _: () = assert!(PVH_MODLIST_START >= PVH_MEMMAP_START + 24 * PVH_MEMMAP_MAX_ENTRIES as u64);
const _: () = assert!(PVH_MODLIST_START + 32 <= ZERO_PAGE_START);
const _: () = assert!(ZERO_PAGE_START + 0x1000 <= FREE_TRAMPOLINE_START);
const _: () = assert!(FREE_TRAMPOLINE_START + FREE_TRAMPOLINE_SIZE <= PML4_START);
const _: () = assert!(PD_START + PD_COUNT * 0x1000 <= BOOT_STACK_POINTER);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
