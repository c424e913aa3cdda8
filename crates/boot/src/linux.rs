// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The Linux zero page (`boot_params`) for the 64-bit boot protocol.

pub use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{ByteValued, GuestMemoryBackend};

use crate::e820::{E820Entry, E820_MAX_ENTRIES};
use crate::error::{Error, Result};
use crate::guest::write_bytes;
use crate::kernel::Initramfs;
use crate::layout::ZERO_PAGE_START;

/// `boot_flag` value.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS" as the little-endian `header` field.
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned id.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `kernel_alignment` written for ELF kernels, which carry no setup header.
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Inputs of the zero page.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroPageConfig<'a> {
    /// Setup header copied from the bzImage; `None` for an ELF kernel (a minimal header is
    /// synthesised).
    pub header: Option<&'a setup_header>,
    /// Address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Loaded initramfs.
    pub initramfs: Option<Initramfs>,
    /// ACPI RSDP address.
    pub rsdp_addr: Option<u64>,
    /// Memory map.
    pub memory_map: &'a [E820Entry],
}

/// Builds the zero page. Fails if the memory map has more than 128 entries.
pub fn build_boot_params(cfg: &ZeroPageConfig<'_>) -> Result<boot_params> {
    if cfg.memory_map.len() > E820_MAX_ENTRIES {
        return Err(Error::TooManyE820Entries {
            count: cfg.memory_map.len(),
            max: E820_MAX_ENTRIES,
        });
    }
    let mut params = boot_params::default();
    match cfg.header {
        Some(h) => params.hdr = *h,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = cfg.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (cfg.cmdline_addr >> 32) as u32;
    if let Some(rd) = cfg.initramfs {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.ext_ramdisk_image = (rd.addr >> 32) as u32;
        params.hdr.ramdisk_size = rd.size as u32;
        params.ext_ramdisk_size = (rd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = cfg.rsdp_addr.unwrap_or(0);
    let mut table = params.e820_table;
    for (slot, e) in table.iter_mut().zip(cfg.memory_map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_table = table;
    params.e820_entries = cfg.memory_map.len() as u8;
    Ok(params)
}

/// Writes `params` at [`ZERO_PAGE_START`] and returns that address.
pub fn write_boot_params<M: GuestMemoryBackend>(mem: &M, params: &boot_params) -> Result<u64> {
    write_bytes(mem, "Linux boot_params", ZERO_PAGE_START, params.as_slice())?;
    Ok(ZERO_PAGE_START)
}
