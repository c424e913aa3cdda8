// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Identity-mapped page tables for the 64-bit entry: 0..4 GiB with 2 MiB pages.

use vm_memory::GuestMemoryBackend;

use crate::error::Result;
use crate::guest::write_bytes;
use crate::layout::{PDPT_START, PD_COUNT, PD_START, PML4_START};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Contents of the PML4 page.
pub fn pml4_page() -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    page[..8].copy_from_slice(&(PDPT_START | PRESENT_RW).to_le_bytes());
    page
}

/// Contents of the PDPT page.
pub fn pdpt_page() -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    for (i, slot) in page.chunks_exact_mut(8).take(PD_COUNT as usize).enumerate() {
        let pd = PD_START + (i as u64) * 0x1000;
        slot.copy_from_slice(&(pd | PRESENT_RW).to_le_bytes());
    }
    page
}

/// Contents of page directory `index` (maps `index` GiB .. `index + 1` GiB).
pub fn pd_page(index: u64) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    for (i, slot) in page.chunks_exact_mut(8).enumerate() {
        let addr = (index << 30) | ((i as u64) << 21);
        slot.copy_from_slice(&(addr | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes());
    }
    page
}

/// Writes the identity map and returns the page-table root (the value for `cr3`).
pub fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<u64> {
    write_bytes(mem, "PML4", PML4_START, &pml4_page())?;
    write_bytes(mem, "PDPT", PDPT_START, &pdpt_page())?;
    for i in 0..PD_COUNT {
        write_bytes(mem, "page directory", PD_START + i * 0x1000, &pd_page(i))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn read_u64(mem: &GuestMemoryMmap<()>, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Walks the tables like the MMU does for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap<()>, root: u64, va: u64) -> Option<u64> {
        let pml4e = read_u64(mem, root + ((va >> 39) & 0x1ff) * 8);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = read_u64(mem, (pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = read_u64(mem, (pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
        if pde & 1 == 0 || pde & 0x80 == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn identity_map_covers_4gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let root = write_identity_page_tables(&mem).unwrap();
        assert_eq!(root, 0x9000);
        for va in [
            0u64,
            0x1234,
            0x20_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, root, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, root, 1 << 32), None);
    }

    #[test]
    fn missing_memory_is_reported() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        let err = write_identity_page_tables(&mem).unwrap_err();
        assert!(err.to_string().contains("PML4"), "{err}");
    }
}
