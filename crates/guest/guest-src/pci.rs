// SPDX-License-Identifier: Apache-2.0 OR MIT
//! PCI: configuration access (ECAM from the ACPI MCFG table, else the legacy 0xCF8/0xCFC
//! ports), enumeration (bus 0 and the buses behind PCI-PCI bridges), BAR sizing and
//! programming, capability lists and MSI-X.
//!
//! BARs: a memory BAR the firmware/VMM left unassigned (0) is given an address from the MMIO
//! window (default `0xC000_0000..0xE000_0000`, `vmkit.pci_mmio=<start>-<end>`), above every
//! BAR already assigned there. With `vmkit.pci_reassign=1` every memory BAR of every
//! endpoint is reprogrammed, allocating top-down from the end of the window (VMMs allocate
//! bottom-up), so that the device model has to follow a BAR move. I/O BARs are left alone.
//! Bridges' own BARs and windows are not programmed.

use crate::cpu::{inl, mmio_read, mmio_write, outl};

/// Most functions remembered.
pub const MAX_FUNCTIONS: usize = 64;
const MAX_CAPS: usize = 48;

/// Command register: I/O space, memory space, bus master.
const CMD_IO: u32 = 1 << 0;
const CMD_MEM: u32 = 1 << 1;
const CMD_MASTER: u32 = 1 << 2;

/// How configuration space is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Memory-mapped (PCIe ECAM): base address for bus 0, last bus decoded.
    Ecam {
        /// Base address of bus 0's configuration space.
        base: u64,
        /// First bus decoded.
        start_bus: u8,
        /// Last bus decoded.
        end_bus: u8,
    },
    /// I/O ports 0xCF8/0xCFC (buses 0..=255, first 256 bytes only).
    Legacy,
}

/// A bus/device/function address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device (0..32).
    pub dev: u8,
    /// Function (0..8).
    pub func: u8,
}

/// Kind of a BAR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BarKind {
    /// Not implemented (or the upper half of a 64-bit BAR).
    #[default]
    None,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (takes this slot and the next).
    Mem64,
    /// I/O space.
    Io,
}

/// One BAR after sizing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bar {
    /// Kind.
    pub kind: BarKind,
    /// Address (0: unassigned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// One function found by [`Pci::enumerate`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Function {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code, subclass, programming interface (bits 23..0 of dword 2).
    pub class: u32,
    /// Header type (without the multi-function bit).
    pub header: u8,
    /// BARs (header type 0; bridges: first two).
    pub bars: [Bar; 6],
}

/// The MSI-X capability of a function.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    /// Offset of the capability in config space.
    pub cap: u8,
    /// Physical address of the vector table.
    pub table: u64,
    /// Number of table entries.
    pub size: u16,
}

/// Counters of what BAR programming did.
#[derive(Clone, Copy, Debug, Default)]
pub struct BarStats {
    /// Memory BARs given an address by the guest.
    pub assigned: u32,
    /// Of those, BARs that had a different non-zero address before.
    pub relocated: u32,
    /// Memory BARs that did not fit in the window (left disabled).
    pub failed: u32,
}

/// The PCI view: access method and the functions found.
pub struct Pci {
    /// Configuration access method.
    pub access: Access,
    /// Functions found, `count` of them valid.
    pub functions: [Function; MAX_FUNCTIONS],
    /// Number of valid entries in `functions`.
    pub count: usize,
    /// Functions found beyond [`MAX_FUNCTIONS`].
    pub dropped: u32,
    /// Buses scanned.
    pub buses: u32,
}

impl Pci {
    /// An empty view using `access`.
    pub const fn new(access: Access) -> Self {
        Pci {
            access,
            functions: [Function {
                bdf: Bdf {
                    bus: 0,
                    dev: 0,
                    func: 0,
                },
                vendor: 0,
                device: 0,
                class: 0,
                header: 0,
                bars: [Bar {
                    kind: BarKind::None,
                    addr: 0,
                    size: 0,
                }; 6],
            }; MAX_FUNCTIONS],
            count: 0,
            dropped: 0,
            buses: 0,
        }
    }

    /// The functions found.
    pub fn functions(&self) -> &[Function] {
        &self.functions[..self.count]
    }

    fn ecam_addr(&self, bdf: Bdf, off: u16) -> Option<u64> {
        match self.access {
            Access::Ecam {
                base,
                start_bus,
                end_bus,
            } => {
                if bdf.bus < start_bus || bdf.bus > end_bus {
                    return None;
                }
                let a = base
                    + ((u64::from(bdf.bus) << 20)
                        | (u64::from(bdf.dev & 31) << 15)
                        | (u64::from(bdf.func & 7) << 12)
                        | u64::from(off & 0xFFC));
                (a + 4 <= 1 << 32).then_some(a)
            }
            Access::Legacy => None,
        }
    }

    fn legacy_addr(bdf: Bdf, off: u16) -> u32 {
        0x8000_0000
            | (u32::from(bdf.bus) << 16)
            | (u32::from(bdf.dev & 31) << 11)
            | (u32::from(bdf.func & 7) << 8)
            | u32::from(off & 0xFC)
    }

    /// Reads the config dword at `off` (rounded down to 4). All ones where nothing answers.
    pub fn read32(&self, bdf: Bdf, off: u16) -> u32 {
        match self.access {
            Access::Ecam { .. } => match self.ecam_addr(bdf, off) {
                Some(a) => mmio_read::<u32>(a),
                None => u32::MAX,
            },
            Access::Legacy => {
                if off >= 256 {
                    return u32::MAX;
                }
                outl(0xCF8, Self::legacy_addr(bdf, off));
                inl(0xCFC)
            }
        }
    }

    /// Writes the config dword at `off` (rounded down to 4).
    pub fn write32(&self, bdf: Bdf, off: u16, v: u32) {
        match self.access {
            Access::Ecam { .. } => {
                if let Some(a) = self.ecam_addr(bdf, off) {
                    mmio_write::<u32>(a, v);
                }
            }
            Access::Legacy => {
                if off < 256 {
                    outl(0xCF8, Self::legacy_addr(bdf, off));
                    outl(0xCFC, v);
                }
            }
        }
    }

    /// Reads a byte of config space.
    pub fn read8(&self, bdf: Bdf, off: u16) -> u8 {
        (self.read32(bdf, off) >> (8 * (off & 3))) as u8
    }

    /// Reads a 16-bit word of config space (`off` even).
    pub fn read16(&self, bdf: Bdf, off: u16) -> u16 {
        (self.read32(bdf, off) >> (8 * (off & 2))) as u16
    }

    /// Writes the upper 16 bits of the dword at `off & !3` (keeping the lower half).
    fn write_hi16(&self, bdf: Bdf, off: u16, v: u16) {
        let old = self.read32(bdf, off) & 0xFFFF;
        self.write32(bdf, off, old | (u32::from(v) << 16));
    }

    /// Sets bits of the command register (the status half is written as zero: its bits are
    /// write-one-to-clear).
    fn command_set(&self, bdf: Bdf, set: u32, clear: u32) {
        let cmd = self.read32(bdf, 4) & 0xFFFF;
        self.write32(bdf, 4, (cmd | set) & !clear);
    }

    /// Scans bus 0 and, recursively, the secondary buses of PCI-PCI bridges (each bus once).
    pub fn enumerate(&mut self) {
        let mut seen = [0u64; 4];
        let mut stack = [0u8; 32];
        let mut depth = 1;
        while depth > 0 {
            depth -= 1;
            let bus = stack[depth];
            let (word, bit) = (usize::from(bus / 64), bus % 64);
            if seen[word] & (1 << bit) != 0 {
                continue;
            }
            seen[word] |= 1 << bit;
            self.buses += 1;
            for dev in 0..32u8 {
                let functions = {
                    let f0 = Bdf { bus, dev, func: 0 };
                    let id = self.read32(f0, 0);
                    if id & 0xFFFF == 0xFFFF || id & 0xFFFF == 0 {
                        continue;
                    }
                    if self.read8(f0, 0x0E) & 0x80 != 0 {
                        8
                    } else {
                        1
                    }
                };
                for func in 0..functions {
                    let bdf = Bdf { bus, dev, func };
                    let id = self.read32(bdf, 0);
                    if id & 0xFFFF == 0xFFFF || id & 0xFFFF == 0 {
                        continue;
                    }
                    let header = self.read8(bdf, 0x0E) & 0x7F;
                    if header == 1 {
                        let secondary = self.read8(bdf, 0x19);
                        if secondary > bus && depth < stack.len() {
                            stack[depth] = secondary;
                            depth += 1;
                        }
                    }
                    if self.count == MAX_FUNCTIONS {
                        self.dropped += 1;
                        continue;
                    }
                    let mut f = Function {
                        bdf,
                        vendor: id as u16,
                        device: (id >> 16) as u16,
                        class: self.read32(bdf, 8) >> 8,
                        header,
                        ..Function::default()
                    };
                    self.size_bars(&mut f);
                    self.functions[self.count] = f;
                    self.count += 1;
                }
            }
        }
    }

    /// Sizes every BAR of `f` (decoding off while the all-ones pattern is in place).
    fn size_bars(&self, f: &mut Function) {
        let n = match f.header {
            0 => 6,
            1 => 2,
            _ => 0,
        };
        let bdf = f.bdf;
        let cmd = self.read32(bdf, 4) & 0xFFFF;
        self.write32(bdf, 4, cmd & !(CMD_IO | CMD_MEM));
        let mut i = 0;
        while i < n {
            let off = 0x10 + 4 * i as u16;
            let orig = self.read32(bdf, off);
            self.write32(bdf, off, u32::MAX);
            let mask = self.read32(bdf, off);
            self.write32(bdf, off, orig);
            if mask == 0 || mask == u32::MAX && orig == u32::MAX {
                i += 1;
                continue;
            }
            if orig & 1 != 0 {
                let m = mask & !3 & 0xFFFF;
                f.bars[i] = Bar {
                    kind: BarKind::Io,
                    addr: u64::from(orig & !3),
                    size: u64::from((!m).wrapping_add(1) & 0xFFFF),
                };
                i += 1;
                continue;
            }
            let is64 = (orig >> 1) & 3 == 2 && i + 1 < n;
            let (mut addr, mut m) = (u64::from(orig & !0xF), u64::from(mask & !0xF));
            if is64 {
                let hi_off = off + 4;
                let orig_hi = self.read32(bdf, hi_off);
                self.write32(bdf, hi_off, u32::MAX);
                let mask_hi = self.read32(bdf, hi_off);
                self.write32(bdf, hi_off, orig_hi);
                addr |= u64::from(orig_hi) << 32;
                m |= u64::from(mask_hi) << 32;
            } else {
                m |= 0xFFFF_FFFF_0000_0000;
            }
            let size = (!m).wrapping_add(1);
            if size != 0 {
                f.bars[i] = Bar {
                    kind: if is64 { BarKind::Mem64 } else { BarKind::Mem32 },
                    addr,
                    size,
                };
            }
            i += if is64 { 2 } else { 1 };
        }
        self.write32(bdf, 4, cmd);
    }

    /// Programs memory BARs of endpoints (see the module docs) in `[start, end)`, then
    /// enables memory decoding and bus mastering on every endpoint with a memory BAR.
    pub fn program_bars(&mut self, start: u64, end: u64, reassign: bool) -> BarStats {
        let mut stats = BarStats::default();
        // Bottom-up cursor above every BAR already inside the window.
        let mut cursor = start;
        for f in self.functions() {
            for b in f.bars.iter() {
                if matches!(b.kind, BarKind::Mem32 | BarKind::Mem64)
                    && b.addr >= start
                    && b.addr < end
                {
                    cursor = cursor.max(b.addr.saturating_add(b.size));
                }
            }
        }
        let mut top = end;
        for k in 0..self.count {
            let mut f = self.functions[k];
            if f.header != 0 {
                continue;
            }
            let mut any_mem = false;
            for i in 0..6 {
                let b = f.bars[i];
                if !matches!(b.kind, BarKind::Mem32 | BarKind::Mem64) || b.size == 0 {
                    continue;
                }
                any_mem = true;
                if !reassign && b.addr != 0 {
                    continue;
                }
                let size = b.size.max(4096);
                let addr = if reassign {
                    top.checked_sub(size)
                        .map(|a| a & !(size - 1))
                        .filter(|a| *a >= start)
                } else {
                    cursor
                        .checked_add(size - 1)
                        .map(|a| a & !(size - 1))
                        .filter(|a| a.checked_add(size).is_some_and(|e| e <= end))
                };
                let Some(addr) = addr else {
                    stats.failed += 1;
                    continue;
                };
                if reassign {
                    top = addr;
                } else {
                    cursor = addr + size;
                }
                let off = 0x10 + 4 * i as u16;
                let low_flags = self.read32(f.bdf, off) & 0xF;
                self.command_set(f.bdf, 0, CMD_MEM);
                self.write32(f.bdf, off, (addr as u32 & !0xF) | low_flags);
                if b.kind == BarKind::Mem64 {
                    self.write32(f.bdf, off + 4, (addr >> 32) as u32);
                }
                stats.assigned += 1;
                if b.addr != 0 && b.addr != addr {
                    stats.relocated += 1;
                }
                f.bars[i].addr = addr;
            }
            self.functions[k] = f;
            if any_mem {
                self.command_set(f.bdf, CMD_MEM | CMD_MASTER, 0);
            }
        }
        stats
    }

    /// Config-space offsets of the capabilities of `bdf` (standard list), in order.
    pub fn capabilities(&self, bdf: Bdf) -> ([u8; MAX_CAPS], usize) {
        let mut caps = [0u8; MAX_CAPS];
        let mut n = 0;
        // Status bit 4: capability list present.
        if self.read16(bdf, 6) & 0x10 == 0 {
            return (caps, 0);
        }
        let mut at = self.read8(bdf, 0x34) & 0xFC;
        while at >= 0x40 && n < MAX_CAPS {
            caps[n] = at;
            n += 1;
            at = self.read8(bdf, u16::from(at) + 1) & 0xFC;
        }
        (caps, n)
    }

    /// The MSI-X capability of `f`, with its table located in a programmed memory BAR.
    pub fn msix(&self, f: &Function) -> Option<Msix> {
        let (caps, n) = self.capabilities(f.bdf);
        let cap = *caps[..n]
            .iter()
            .find(|&&c| self.read8(f.bdf, u16::from(c)) == 0x11)?;
        let ctrl = self.read16(f.bdf, u16::from(cap) + 2);
        let table = self.read32(f.bdf, u16::from(cap) + 4);
        let bar = f.bars.get((table & 7) as usize)?;
        if !matches!(bar.kind, BarKind::Mem32 | BarKind::Mem64) || bar.addr == 0 {
            return None;
        }
        let size = (ctrl & 0x7FF) + 1;
        let offset = u64::from(table & !7);
        if offset + 16 * u64::from(size) > bar.size {
            return None;
        }
        Some(Msix {
            cap,
            table: bar.addr + offset,
            size,
        })
    }

    /// Enables MSI-X on `f` (function mask cleared; entries keep their own masks).
    pub fn msix_enable(&self, bdf: Bdf, m: &Msix) {
        let ctrl = self.read16(bdf, u16::from(m.cap) + 2);
        self.write_hi16(bdf, u16::from(m.cap), (ctrl | 0x8000) & !0x4000);
        // MSI-X replaces INTx: disable the latter.
        self.command_set(bdf, 1 << 10, 0);
    }
}

impl Msix {
    /// Programs table entry `entry` to deliver `vector` to the CPU with APIC ID `dest`
    /// (physical destination mode, fixed, edge) and unmasks it. Returns `false` if `entry`
    /// is out of range or `dest` does not fit an MSI address (8 bits without remapping).
    pub fn program(&self, entry: u16, dest: u32, vector: u8) -> bool {
        if entry >= self.size || dest > 0xFF {
            return false;
        }
        let e = self.table + 16 * u64::from(entry);
        mmio_write::<u32>(e + 12, 1);
        mmio_write::<u32>(e, 0xFEE0_0000 | (dest << 12));
        mmio_write::<u32>(e + 4, 0);
        mmio_write::<u32>(e + 8, u32::from(vector));
        mmio_write::<u32>(e + 12, 0);
        true
    }
}
