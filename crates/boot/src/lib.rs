// SPDX-License-Identifier: Apache-2.0 OR MIT
//! x86_64 boot support for vmkit: everything that puts a kernel and its boot data into guest
//! memory.
//!
//! - [`load_kernel`]: detects the image format from its content (ELF64 or bzImage), checks
//!   that it fits in RAM and copies it with linux-loader. An ELF with a PVH note boots with
//!   PVH, any other ELF with the Linux 64-bit protocol at `e_entry`, a bzImage with the Linux
//!   64-bit protocol at 1 MiB + 0x200.
//! - [`load_initramfs`]: the initramfs at the top of RAM below the MMIO gap.
//! - [`configure_boot`]: GDT/IDT, identity page tables, command line, memory map and the
//!   protocol's boot data (`boot_params` or `hvm_start_info`); returns a [`BootInfo`] with
//!   the initial BSP registers.
//! - [`mptable::write_mptable`]: Intel MPS 1.4 table; [`acpi::write_acpi_tables`]: RSDP,
//!   XSDT, FADT, FACS, DSDT, MADT (with x2APIC entries) and caller tables.
//!
//! Everything is generic over `vm_memory::GuestMemoryBackend` (the region-level memory
//! trait of vm-memory 0.18; every backend is also a `vm_memory::GuestMemory`). The
//! addresses used are fixed in [`layout`].
//!
//! ```no_run
//! use std::path::Path;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_boot::acpi::{write_acpi_tables, AcpiConfig};
//! use vmkit_boot::mptable::write_mptable;
//! use vmkit_boot::{configure_boot, load_initramfs, load_kernel, BootConfig, KernelOptions, MmioGap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 512 << 20)])?;
//! let gap = MmioGap::below_4g(0xc000_0000);
//! let apic_ids: Vec<u32> = (0..4).collect();
//!
//! let kernel = load_kernel(&mem, Path::new("guest.elf"), &KernelOptions::new(gap))?;
//! let initramfs = load_initramfs(&mem, Path::new("initramfs.cpio"), &kernel, gap)?;
//! write_mptable(&mem, &apic_ids, 4)?;
//! let acpi = write_acpi_tables(&mem, &AcpiConfig::new(apic_ids, 4))?;
//!
//! let mut cfg = BootConfig::new("console=ttyS0", gap);
//! cfg.initramfs = Some(initramfs);
//! cfg.rsdp_addr = Some(acpi.rsdp_addr);
//! let boot = configure_boot(&mem, &kernel, &cfg)?;
//! println!("{:?} entry at {:#x}, rip {:#x}", boot.protocol, boot.entry, boot.registers.rip);
//! # Ok(())
//! # }
//! ```

pub mod acpi;
pub mod cmdline;
pub mod e820;
pub mod error;
pub mod gdt;
mod guest;
pub mod kernel;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod paging;
pub mod pvh;
pub mod setup;

pub use e820::{build_memory_map, memory_ranges, E820Entry, E820Type, MmioGap};
pub use error::{Error, Result};
pub use gdt::{BootGdt, Segment};
pub use kernel::{
    inspect_kernel, inspect_kernel_bytes, load_initramfs, load_initramfs_from, load_kernel,
    load_kernel_from, BootProtocol, Initramfs, KernelFormat, KernelInfo, KernelOptions,
    LoadedKernel,
};
pub use setup::{boot_registers, configure_boot, BootConfig, BootInfo, BootRegisters};

/// The acpi_tables crate, re-exported so callers can build AML for [`acpi::AcpiDevice::Aml`]
/// and extra tables.
pub use acpi_tables;
/// The linux-loader crate, re-exported for its `bootparam`/`start_info` types.
pub use linux_loader;
