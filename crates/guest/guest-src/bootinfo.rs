// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Boot information handed over by the VMM: PVH `hvm_start_info` or Linux `boot_params`.
//!
//! Everything the guest needs from it (command line, RSDP address, memory map) is copied into
//! a [`BootInfo`] right at boot, before the guest overwrites any low memory (the SIPI
//! trampoline goes to 0x8000, next to where VMMs put these structures). The guest fills a
//! static `BootInfo` in place ([`BootInfo::read_pvh`], [`BootInfo::read_linux`]): built on the
//! stack and returned, its 2 KiB would be zeroed and copied, which is slow when every guest
//! instruction is emulated.

use super::physmem::PhysMem;

/// Bytes of command line kept (the report prints at most 200 of them).
pub const CMDLINE_MAX: usize = 2048;
/// Memory-map entries kept.
pub const MEMMAP_MAX: usize = 64;
/// Memory-map type of usable RAM (e820 and PVH use the same numbering).
pub const MEM_RAM: u32 = 1;

/// Structures at or above this address are rejected, so adding a small offset cannot overflow.
const ADDR_LIMIT: u64 = 1 << 63;

/// `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;

/// How the guest was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH (32-bit entry from the ELF note).
    Pvh,
    /// Linux 64-bit boot protocol (ELF entry point, `boot_params` in %rsi).
    Linux64,
}

impl BootProtocol {
    /// Name used in the report line.
    pub fn name(self) -> &'static str {
        match self {
            BootProtocol::Pvh => "pvh",
            BootProtocol::Linux64 => "linux64",
        }
    }
}

/// One memory-map entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    /// Physical base address.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type (1 = RAM).
    pub kind: u32,
}

/// Why the boot information could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// The structure at this address is not readable.
    Unreadable(u64),
    /// `hvm_start_info.magic` is wrong (value found).
    BadPvhMagic(u32),
}

/// The boot information, copied out of VMM-provided memory.
#[derive(Clone)]
pub struct BootInfo {
    /// Entry protocol.
    pub protocol: BootProtocol,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    /// ACPI RSDP address given by the VMM (`None` if it gave 0).
    pub rsdp: Option<u64>,
    memmap: [MemRegion; MEMMAP_MAX],
    memmap_len: usize,
}

impl BootInfo {
    /// An empty record (nothing read yet), usable as a `static`'s initial value.
    pub const fn new(protocol: BootProtocol) -> Self {
        BootInfo {
            protocol,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            rsdp: None,
            memmap: [MemRegion {
                base: 0,
                size: 0,
                kind: 0,
            }; MEMMAP_MAX],
            memmap_len: 0,
        }
    }

    /// Reads a PVH `hvm_start_info` at `addr`.
    #[allow(dead_code)] // the guest uses `read_pvh`; tested on the host
    pub fn from_pvh(mem: &impl PhysMem, addr: u64) -> Result<Self, BootInfoError> {
        let mut info = BootInfo::new(BootProtocol::Pvh);
        info.read_pvh(mem, addr)?;
        Ok(info)
    }

    /// Reads a Linux `boot_params` (zero page) at `addr`.
    #[allow(dead_code)] // the guest uses `read_linux`; tested on the host
    pub fn from_linux(mem: &impl PhysMem, addr: u64) -> Result<Self, BootInfoError> {
        let mut info = BootInfo::new(BootProtocol::Linux64);
        info.read_linux(mem, addr)?;
        Ok(info)
    }

    fn reset(&mut self, protocol: BootProtocol) {
        self.protocol = protocol;
        self.cmdline_len = 0;
        self.rsdp = None;
        self.memmap_len = 0;
    }

    /// Fills `self` (in place) from a PVH `hvm_start_info` at `addr`.
    pub fn read_pvh(&mut self, mem: &impl PhysMem, addr: u64) -> Result<(), BootInfoError> {
        self.reset(BootProtocol::Pvh);
        let bad = BootInfoError::Unreadable(addr);
        if addr >= ADDR_LIMIT {
            return Err(bad);
        }
        let magic = mem.read_u32(addr).ok_or(bad)?;
        if magic != PVH_MAGIC {
            return Err(BootInfoError::BadPvhMagic(magic));
        }
        let version = mem.read_u32(addr + 4).ok_or(bad)?;
        let cmdline = mem.read_u64(addr + 0x18).ok_or(bad)?;
        let rsdp = mem.read_u64(addr + 0x20).ok_or(bad)?;
        self.read_cmdline(mem, cmdline, CMDLINE_MAX as u64);
        self.rsdp = (rsdp != 0).then_some(rsdp);
        if version >= 1 {
            let map = mem.read_u64(addr + 0x28).ok_or(bad)?;
            let entries = mem.read_u32(addr + 0x30).ok_or(bad)?;
            if map != 0 && map < ADDR_LIMIT {
                for i in 0..u64::from(entries).min(MEMMAP_MAX as u64) {
                    let e = map + i * 24;
                    let (Some(base), Some(size), Some(kind)) =
                        (mem.read_u64(e), mem.read_u64(e + 8), mem.read_u32(e + 16))
                    else {
                        break;
                    };
                    self.push_region(MemRegion { base, size, kind });
                }
            }
        }
        Ok(())
    }

    /// Fills `self` (in place) from a Linux `boot_params` (zero page) at `addr`.
    pub fn read_linux(&mut self, mem: &impl PhysMem, addr: u64) -> Result<(), BootInfoError> {
        self.reset(BootProtocol::Linux64);
        let bad = BootInfoError::Unreadable(addr);
        if addr >= ADDR_LIMIT {
            return Err(bad);
        }
        let rsdp = mem.read_u64(addr + 0x070).ok_or(bad)?;
        self.rsdp = (rsdp != 0).then_some(rsdp);
        let ext_cmdline = mem.read_u32(addr + 0x0C8).ok_or(bad)?;
        let cmdline = mem.read_u32(addr + 0x228).ok_or(bad)?;
        let cmdline_size = mem.read_u32(addr + 0x238).ok_or(bad)?;
        let cmdline = (u64::from(ext_cmdline) << 32) | u64::from(cmdline);
        let limit = if cmdline_size == 0 {
            CMDLINE_MAX as u64
        } else {
            u64::from(cmdline_size).min(CMDLINE_MAX as u64)
        };
        self.read_cmdline(mem, cmdline, limit);
        let entries = mem.read_u8(addr + 0x1E8).ok_or(bad)?;
        for i in 0..u64::from(entries).min(128).min(MEMMAP_MAX as u64) {
            let e = addr + 0x2D0 + i * 20;
            let (Some(base), Some(size), Some(kind)) =
                (mem.read_u64(e), mem.read_u64(e + 8), mem.read_u32(e + 16))
            else {
                break;
            };
            self.push_region(MemRegion { base, size, kind });
        }
        Ok(())
    }

    fn read_cmdline(&mut self, mem: &impl PhysMem, addr: u64, limit: u64) {
        if addr == 0 {
            return;
        }
        let limit = limit.min(CMDLINE_MAX as u64) as usize;
        let mut n = self.cmdline_len;
        while n < limit {
            let Some(at) = addr.checked_add(n as u64) else {
                break;
            };
            // Eight bytes per load while they hold no NUL. Only aligned words: they never
            // cross into the next page, so nothing is read beyond the page of the NUL.
            if at % 8 == 0 && n + 8 <= limit {
                if let Some(w) = mem.read_u64(at) {
                    if w.wrapping_sub(0x0101_0101_0101_0101) & !w & 0x8080_8080_8080_8080 == 0 {
                        self.cmdline[n..n + 8].copy_from_slice(&w.to_le_bytes());
                        n += 8;
                        continue;
                    }
                }
            }
            match mem.read_u8(at) {
                Some(0) | None => break,
                Some(b) => {
                    self.cmdline[n] = b;
                    n += 1;
                }
            }
        }
        self.cmdline_len = n;
    }

    fn push_region(&mut self, r: MemRegion) {
        if self.memmap_len < MEMMAP_MAX {
            self.memmap[self.memmap_len] = r;
            self.memmap_len += 1;
        }
    }

    /// The command line (without the terminating NUL, at most [`CMDLINE_MAX`] bytes).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// The memory map as given by the VMM.
    pub fn memmap(&self) -> &[MemRegion] {
        &self.memmap[..self.memmap_len]
    }

    /// How many bytes starting at `base` are RAM according to the memory map (contiguous RAM
    /// entries are merged), or `None` when the VMM gave no memory map at all.
    pub fn ram_at(&self, base: u64) -> Option<u64> {
        if self.memmap_len == 0 {
            return None;
        }
        let mut end = base;
        // Walk forward through adjacent/overlapping RAM entries (the map may be unsorted).
        loop {
            let next = self
                .memmap()
                .iter()
                .filter(|r| r.kind == MEM_RAM && r.base <= end)
                .filter_map(|r| r.base.checked_add(r.size))
                .filter(|e| *e > end)
                .max();
            match next {
                Some(e) => end = e,
                None => break,
            }
        }
        Some(end - base)
    }

    /// Values of every `key=value` option on the command line, in order.
    pub fn options<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let key = key.as_bytes();
        self.cmdline()
            .split(|&b| b == b' ')
            .filter_map(move |word| {
                if word.get(key.len()) == Some(&b'=') && word.starts_with(key) {
                    word.get(key.len() + 1..)
                } else {
                    None
                }
            })
    }

    /// Value of a `key=value` option on the command line (first match).
    pub fn option(&self, key: &str) -> Option<&[u8]> {
        let key = key.as_bytes();
        let mut rest = self.cmdline();
        while !rest.is_empty() {
            let len = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            let (word, tail) = rest.split_at(len);
            if word.get(key.len()) == Some(&b'=') && word.starts_with(key) {
                return word.get(key.len() + 1..);
            }
            rest = tail.get(1..).unwrap_or(&[]);
        }
        None
    }
}
