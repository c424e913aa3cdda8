// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Initramfs placement: the top of RAM below the MMIO gap, below the kernel's
//! `initrd_addr_max`, above the kernel, page aligned.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::LoadedKernel;
use crate::e820::{build_memory_map, memory_ranges, ram_of, MmioGap};
use crate::error::{Error, Result};
use crate::layout::{HIMEM_START, PAGE_SIZE};

/// Where the initramfs was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initramfs {
    /// Guest-physical address (page aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Picks the highest page-aligned address for `size` bytes inside one of the sorted RAM
/// ranges `ram` (`(start, end_exclusive)`), within `low..high`.
///
/// Returns `Err(largest)` with the largest usable free range if nothing fits.
pub fn place_initramfs(
    ram: &[(u64, u64)],
    size: u64,
    low: u64,
    high: u64,
) -> std::result::Result<u64, u64> {
    let mut largest = 0u64;
    for &(s, e) in ram.iter().rev() {
        let start = s.max(low);
        let end = e.min(high);
        if end <= start {
            continue;
        }
        largest = largest.max(end - start);
        if let Some(top) = end.checked_sub(size) {
            let addr = top & !(PAGE_SIZE - 1);
            if addr >= start && size > 0 {
                return Ok(addr);
            }
        }
    }
    Err(largest)
}

/// Opens `path` and loads it with [`load_initramfs_from`].
pub fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel: &LoadedKernel,
    gap: MmioGap,
) -> Result<Initramfs> {
    let mut file = File::open(path).map_err(|source| Error::InitramfsFile {
        path: path.to_path_buf(),
        source,
    })?;
    load_initramfs_from(mem, &mut file, &path.display().to_string(), kernel, gap)
}

/// Copies the initramfs read from `image` to the top of usable RAM (see the module docs).
pub fn load_initramfs_from<M: GuestMemoryBackend, R: ReadVolatile + Seek>(
    mem: &M,
    image: &mut R,
    name: &str,
    kernel: &LoadedKernel,
    gap: MmioGap,
) -> Result<Initramfs> {
    let read_err = |source| Error::Read {
        name: name.to_string(),
        source,
    };
    let size = image.seek(SeekFrom::End(0)).map_err(read_err)?;
    image.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if size == 0 {
        return Err(Error::InvalidConfig {
            what: "initramfs",
            reason: format!("{name} is empty"),
        });
    }
    let map = build_memory_map(&memory_ranges(mem), gap, &[])?;
    let low = kernel
        .kernel_end
        .max(HIMEM_START)
        .checked_next_multiple_of(PAGE_SIZE)
        .unwrap_or(u64::MAX);
    let high = kernel
        .initrd_addr_max
        .saturating_add(1)
        .min(gap.low_ram_limit());
    let addr = place_initramfs(&ram_of(&map), size, low, high).map_err(|largest| {
        Error::InitramfsTooBig {
            name: name.to_string(),
            size,
            low,
            high,
            largest,
        }
    })?;
    let len = usize::try_from(size).map_err(|_| Error::InitramfsTooBig {
        name: name.to_string(),
        size,
        low,
        high,
        largest: 0,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), image, len)
        .map_err(|source| Error::GuestMemory {
            what: "initramfs",
            addr,
            source,
        })?;
    Ok(Initramfs { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_prefers_the_top_and_aligns() {
        let ram = [(0, 0x9fc00), (0x10_0000, 0x4000_0000)];
        assert_eq!(
            place_initramfs(&ram, 0x1800, 0x20_0000, u64::MAX),
            Ok(0x4000_0000 - 0x2000)
        );
        // initrd_addr_max below the top of RAM.
        assert_eq!(
            place_initramfs(&ram, 0x1000, 0x20_0000, 0x3000_0000),
            Ok(0x3000_0000 - 0x1000)
        );
    }

    #[test]
    fn placement_fails_with_the_largest_range() {
        let ram = [(0x10_0000, 0x20_0000)];
        assert_eq!(
            place_initramfs(&ram, 0x20_0000, 0x18_0000, u64::MAX),
            Err(0x8_0000)
        );
        assert_eq!(place_initramfs(&ram, 0x1000, 0x30_0000, u64::MAX), Err(0));
    }
}
