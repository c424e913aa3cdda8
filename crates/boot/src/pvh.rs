// SPDX-License-Identifier: Apache-2.0 OR MIT
//! PVH boot data: `hvm_start_info`, the memory map table and the module list.

pub use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, GuestMemoryBackend};

use crate::e820::E820Entry;
use crate::error::{Error, Result};
use crate::guest::write_bytes;
use crate::kernel::Initramfs;
use crate::layout::{PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START};

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `hvm_start_info.version` written by this crate.
pub const START_INFO_VERSION: u32 = 1;

/// Everything the PVH entry needs, ready to write.
#[derive(Clone, Debug, Default)]
pub struct PvhBootData {
    /// The start info structure (goes to [`PVH_INFO_START`]).
    pub start_info: hvm_start_info,
    /// Memory map table (goes to [`PVH_MEMMAP_START`]).
    pub memmap: Vec<hvm_memmap_table_entry>,
    /// Module list (goes to [`PVH_MODLIST_START`]): the initramfs, if any.
    pub modules: Vec<hvm_modlist_entry>,
}

/// Builds the PVH boot data. Fails if the memory map has more than
/// [`PVH_MEMMAP_MAX_ENTRIES`] entries.
pub fn build_start_info(
    cmdline_addr: u64,
    initramfs: Option<Initramfs>,
    rsdp_addr: Option<u64>,
    memory_map: &[E820Entry],
) -> Result<PvhBootData> {
    if memory_map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(Error::TooManyE820Entries {
            count: memory_map.len(),
            max: PVH_MEMMAP_MAX_ENTRIES,
        });
    }
    let memmap: Vec<hvm_memmap_table_entry> = memory_map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initramfs
        .map(|rd| hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: rsdp_addr.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    Ok(PvhBootData {
        start_info,
        memmap,
        modules,
    })
}

/// Writes the start info, memory map and module list; returns the start info address.
pub fn write_start_info<M: GuestMemoryBackend>(mem: &M, data: &PvhBootData) -> Result<u64> {
    let memmap: Vec<u8> = data
        .memmap
        .iter()
        .flat_map(|e| e.as_slice().to_vec())
        .collect();
    write_bytes(mem, "PVH memory map", PVH_MEMMAP_START, &memmap)?;
    if !data.modules.is_empty() {
        let mods: Vec<u8> = data
            .modules
            .iter()
            .flat_map(|m| m.as_slice().to_vec())
            .collect();
        write_bytes(mem, "PVH module list", PVH_MODLIST_START, &mods)?;
    }
    write_bytes(
        mem,
        "PVH start info",
        PVH_INFO_START,
        data.start_info.as_slice(),
    )?;
    Ok(PVH_INFO_START)
}
