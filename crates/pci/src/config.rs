// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The configuration space of one PCI function: header registers, BARs, the capability
//! list, MSI and MSI-X control.
//!
//! Register semantics follow the PCI Local Bus Specification 3.0 and the PCI-to-PCI Bridge
//! Architecture Specification 1.2: every byte has a write mask (bits outside it are
//! read-only), BARs are computed registers (writing all ones and reading back yields the
//! size mask), and the MSI / MSI-X capabilities forward their control bits to [`Msi`] /
//! [`Msix`]. Accesses must be 1, 2 or 4 bytes and must not cross a dword boundary; other
//! accesses read all ones and are ignored on write.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmkit_device::MsiVectors;
use vmkit_migration::VersionedState;

use crate::msi::{MsiConfig, MsiRegs, MSI_CAP_SIZE, MSI_CTRL_64BIT, MSI_CTRL_PVM};
use crate::msix::MsixState;
use crate::{BarChange, Msi, Msix, MsixConfig, PciBarInfo, PciBarKind, PciBarRegion, PciError};

/// Size of a function's configuration space (PCI Express extended space included).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Capability ID of MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability ID of a vendor-specific capability (virtio uses these).
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

const REG_COMMAND: usize = 0x04;
const REG_STATUS: usize = 0x06;
const REG_HEADER_TYPE: usize = 0x0e;
const REG_BAR0: usize = 0x10;
const REG_CAP_PTR: usize = 0x34;
const CAP_AREA_START: usize = 0x40;
const CAP_AREA_END: usize = 0x100;
const STATUS_CAP_LIST: u8 = 1 << 4;
const CMD_IO: u16 = 1;
const CMD_MEM: u16 = 1 << 1;
/// Writable command bits: I/O space, memory space, bus master, parity error response,
/// SERR# enable, interrupt disable.
const CMD_WMASK: u16 = 0x0547;

/// The kind of configuration header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HeaderType {
    /// Type 0: an endpoint with six BARs.
    Device,
    /// Type 1: a PCI-to-PCI bridge with two BARs, bus numbers and forwarding windows.
    Bridge,
}

impl HeaderType {
    fn bar_count(self) -> usize {
        match self {
            HeaderType::Device => 6,
            HeaderType::Bridge => 2,
        }
    }
}

/// Identification registers of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Base class code.
    pub class_code: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID (type 0 only; ignored for bridges).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (type 0 only; ignored for bridges).
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bar {
    None,
    Used {
        kind: PciBarKind,
        size: u64,
        prefetchable: bool,
        addr: u64,
    },
    /// The upper half of the 64-bit BAR one index below.
    Upper,
}

/// Saved configuration space of one function, MSI and MSI-X state included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    /// The 4096 register bytes (BAR registers and MSI pending bits are kept separately).
    pub regs: Vec<u8>,
    /// Programmed address of each BAR index (0 for unused indexes and upper halves).
    pub bars: Vec<u64>,
    /// MSI pending bits (0 without MSI).
    #[serde(default)]
    pub msi_pending: u32,
    /// MSI-X table and pending bits, when the function has MSI-X.
    #[serde(default)]
    pub msix: Option<MsixState>,
}

impl VersionedState for PciConfigState {
    const NAME: &'static str = "vmkit-pci/config";
    const VERSION: u16 = 1;
}

/// The configuration space of one PCI function.
///
/// Not internally locked: the device model that owns it keeps it behind its own lock and
/// implements [`crate::PciDevice`] by forwarding to [`PciConfigSpace::read`] /
/// [`PciConfigSpace::write`]. The [`Msix`] / [`Msi`] objects it hands out are shared and
/// locked on their own, so worker threads trigger vectors without touching this lock.
pub struct PciConfigSpace {
    regs: Vec<u8>,
    wmask: Vec<u8>,
    header_type: HeaderType,
    bars: [Bar; 6],
    last_cap: Option<usize>,
    next_cap: usize,
    msi: Option<(usize, Arc<Msi>)>,
    msix: Option<(usize, Arc<Msix>)>,
}

impl std::fmt::Debug for PciConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigSpace")
            .field("header_type", &self.header_type)
            .field("vendor", &format_args!("{:#06x}", self.u16_at(0)))
            .field("device", &format_args!("{:#06x}", self.u16_at(2)))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

fn access_ok(offset: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && usize::from(offset) + len <= CONFIG_SPACE_SIZE
        && usize::from(offset % 4) + len <= 4
}

fn diff(before: &[PciBarRegion], after: &[PciBarRegion]) -> Vec<BarChange> {
    let mut changes = Vec::new();
    for i in 0..6u8 {
        let old = before.iter().find(|r| r.index == i).copied();
        let new = after.iter().find(|r| r.index == i).copied();
        if old != new {
            changes.push(BarChange { old, new });
        }
    }
    changes
}

impl PciConfigSpace {
    /// A type 0 (endpoint) configuration space with the given identification, no BARs and
    /// no capabilities. Interrupt pin is 0 (no INTx).
    pub fn new(header: PciHeader) -> Self {
        Self::with_type(header, HeaderType::Device)
    }

    /// A type 1 (PCI-to-PCI bridge) configuration space: bus number registers, the I/O
    /// (16-bit), memory and prefetchable memory (64-bit) window registers and the bridge
    /// control register are writable.
    pub fn new_bridge(header: PciHeader) -> Self {
        Self::with_type(header, HeaderType::Bridge)
    }

    fn with_type(header: PciHeader, header_type: HeaderType) -> Self {
        let mut s = Self {
            regs: vec![0; CONFIG_SPACE_SIZE],
            wmask: vec![0; CONFIG_SPACE_SIZE],
            header_type,
            bars: [Bar::None; 6],
            last_cap: None,
            next_cap: CAP_AREA_START,
            msi: None,
            msix: None,
        };
        s.set_u16(0x00, header.vendor_id);
        s.set_u16(0x02, header.device_id);
        s.regs[0x08] = header.revision;
        s.regs[0x09] = header.prog_if;
        s.regs[0x0a] = header.subclass;
        s.regs[0x0b] = header.class_code;
        s.set_wmask16(REG_COMMAND, CMD_WMASK);
        s.wmask[0x0c] = 0xff; // cache line size
        s.wmask[0x3c] = 0xff; // interrupt line (pin stays 0)
        match header_type {
            HeaderType::Device => {
                s.regs[REG_HEADER_TYPE] = 0x00;
                s.set_u16(0x2c, header.subsystem_vendor_id);
                s.set_u16(0x2e, header.subsystem_id);
            }
            HeaderType::Bridge => {
                s.regs[REG_HEADER_TYPE] = 0x01;
                // Primary, secondary, subordinate bus numbers.
                s.wmask[0x18] = 0xff;
                s.wmask[0x19] = 0xff;
                s.wmask[0x1a] = 0xff;
                // I/O base / limit: 16-bit I/O addressing, bits 7:4 writable.
                s.wmask[0x1c] = 0xf0;
                s.wmask[0x1d] = 0xf0;
                // Memory base / limit: bits 15:4.
                s.set_wmask16(0x20, 0xfff0);
                s.set_wmask16(0x22, 0xfff0);
                // Prefetchable base / limit: 64-bit (low nibble 1), upper halves writable.
                s.set_u16(0x24, 0x0001);
                s.set_u16(0x26, 0x0001);
                s.set_wmask16(0x24, 0xfff0);
                s.set_wmask16(0x26, 0xfff0);
                s.set_wmask32(0x28, 0xffff_ffff);
                s.set_wmask32(0x2c, 0xffff_ffff);
                // Bridge control: parity, SERR#, ISA, VGA, secondary bus reset.
                s.set_wmask16(0x3e, 0x004f);
            }
        }
        s
    }

    fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.regs[off], self.regs[off + 1]])
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.regs[off],
            self.regs[off + 1],
            self.regs[off + 2],
            self.regs[off + 3],
        ])
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.regs[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_wmask16(&mut self, off: usize, m: u16) {
        self.wmask[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }

    fn set_wmask32(&mut self, off: usize, m: u32) {
        self.wmask[off..off + 4].copy_from_slice(&m.to_le_bytes());
    }

    /// The header type.
    pub fn header_type(&self) -> HeaderType {
        self.header_type
    }

    /// Sets or clears the multi-function bit of the header type register (set it on
    /// function 0 of a device that has more functions).
    pub fn set_multifunction(&mut self, multifunction: bool) {
        if multifunction {
            self.regs[REG_HEADER_TYPE] |= 0x80;
        } else {
            self.regs[REG_HEADER_TYPE] &= 0x7f;
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(REG_COMMAND)
    }

    /// Whether the guest enabled bus mastering (DMA).
    pub fn bus_master(&self) -> bool {
        self.command() & (1 << 2) != 0
    }

    /// Adds BAR `index` of `kind` and `size` bytes (a power of two; memory BARs at least
    /// 16 bytes, I/O BARs 4..=256 bytes, 32-bit memory BARs at most 2 GiB). A 64-bit BAR
    /// also takes register `index + 1`. The BAR starts unassigned (address 0).
    pub fn add_bar(
        &mut self,
        index: u8,
        kind: PciBarKind,
        size: u64,
        prefetchable: bool,
    ) -> Result<(), PciError> {
        let i = usize::from(index);
        let count = self.header_type.bar_count();
        let regs_needed = if kind == PciBarKind::Memory64 { 2 } else { 1 };
        if i + regs_needed > count {
            return Err(PciError::InvalidBar(index));
        }
        let size_ok = size.is_power_of_two()
            && match kind {
                PciBarKind::Io => (4..=256).contains(&size),
                PciBarKind::Memory32 => (16..=1 << 31).contains(&size),
                PciBarKind::Memory64 => size >= 16,
            };
        if !size_ok {
            return Err(PciError::InvalidBarSize { size, kind });
        }
        for j in i..i + regs_needed {
            if self.bars[j] != Bar::None {
                return Err(PciError::BarInUse(j as u8));
            }
        }
        self.bars[i] = Bar::Used {
            kind,
            size,
            prefetchable: prefetchable && kind != PciBarKind::Io,
            addr: 0,
        };
        if kind == PciBarKind::Memory64 {
            self.bars[i + 1] = Bar::Upper;
        }
        Ok(())
    }

    /// The BARs this function implements.
    pub fn bar_info(&self) -> Vec<PciBarInfo> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match *b {
                Bar::Used {
                    kind,
                    size,
                    prefetchable,
                    ..
                } => Some(PciBarInfo {
                    index: i as u8,
                    kind,
                    size,
                    prefetchable,
                }),
                _ => None,
            })
            .collect()
    }

    /// The programmed address of BAR `index`, decoded or not (`None`: no such BAR).
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        match self.bars.get(usize::from(index)) {
            Some(Bar::Used { addr, .. }) => Some(*addr),
            _ => None,
        }
    }

    /// Programs BAR `index` to `addr`, as firmware does before the guest runs. The address
    /// must be aligned to the BAR size and representable by the BAR kind. Decode enables
    /// are not touched.
    pub fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), PciError> {
        let Some(Bar::Used {
            kind,
            size,
            addr: a,
            ..
        }) = self.bars.get_mut(usize::from(index))
        else {
            return Err(PciError::InvalidBar(index));
        };
        let limit = match kind {
            PciBarKind::Io | PciBarKind::Memory32 => 1u64 << 32,
            PciBarKind::Memory64 => u64::MAX,
        };
        let fits = addr % *size == 0 && addr.checked_add(*size).is_some_and(|e| e <= limit);
        if !fits {
            return Err(PciError::InvalidBarAddress {
                index,
                addr,
                size: *size,
            });
        }
        *a = addr;
        Ok(())
    }

    /// The BARs currently decoded: the command register enables their space and an address
    /// (other than 0) is programmed.
    pub fn bars(&self) -> Vec<PciBarRegion> {
        let cmd = self.command();
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match *b {
                Bar::Used {
                    kind, size, addr, ..
                } => {
                    let enabled = match kind {
                        PciBarKind::Io => cmd & CMD_IO != 0,
                        _ => cmd & CMD_MEM != 0,
                    };
                    (enabled && addr != 0 && addr.checked_add(size).is_some()).then_some(
                        PciBarRegion {
                            index: i as u8,
                            kind,
                            addr,
                            size,
                        },
                    )
                }
                _ => None,
            })
            .collect()
    }

    fn bar_reg_index(&self, reg: usize) -> Option<usize> {
        let end = REG_BAR0 + 4 * self.header_type.bar_count();
        (REG_BAR0..end).contains(&reg).then(|| (reg - REG_BAR0) / 4)
    }

    fn bar_reg(&self, i: usize) -> u32 {
        match self.bars[i] {
            Bar::None => 0,
            Bar::Upper => match i.checked_sub(1).map(|j| self.bars[j]) {
                Some(Bar::Used { addr, .. }) => (addr >> 32) as u32,
                _ => 0,
            },
            Bar::Used {
                kind,
                prefetchable,
                addr,
                ..
            } => {
                let low = addr as u32;
                match kind {
                    PciBarKind::Io => low | 1,
                    PciBarKind::Memory32 => low | (u32::from(prefetchable) << 3),
                    PciBarKind::Memory64 => low | 0b100 | (u32::from(prefetchable) << 3),
                }
            }
        }
    }

    fn write_bar_reg(&mut self, i: usize, val: u32) {
        match self.bars[i] {
            Bar::None => {}
            Bar::Upper => {
                if let Some(Bar::Used { size, addr, .. }) =
                    i.checked_sub(1).and_then(|j| self.bars.get_mut(j))
                {
                    let high = (u64::from(val) << 32) & !(*size - 1);
                    *addr = (*addr & 0xffff_ffff) | high;
                }
            }
            Bar::Used {
                kind,
                size,
                ref mut addr,
                ..
            } => {
                let mask = !(size - 1) as u32;
                match kind {
                    PciBarKind::Io => *addr = u64::from(val & mask & !0x3),
                    PciBarKind::Memory32 => *addr = u64::from(val & mask & !0xf),
                    PciBarKind::Memory64 => {
                        *addr = (*addr & !0xffff_ffff) | u64::from(val & mask & !0xf)
                    }
                }
            }
        }
    }

    fn read_dword(&self, reg: usize) -> u32 {
        if let Some(i) = self.bar_reg_index(reg) {
            return self.bar_reg(i);
        }
        if let Some((off, msi)) = &self.msi {
            if reg == off + 0x14 {
                return msi.pending_bits();
            }
        }
        self.u32_at(reg)
    }

    /// Reads `data.len()` bytes at `offset`. Accesses of other than 1, 2 or 4 bytes, or
    /// crossing a dword boundary or the end of the space, read all ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        if !access_ok(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let reg = usize::from(offset & !3);
        let shift = usize::from(offset & 3);
        let bytes = self.read_dword(reg).to_le_bytes();
        data.copy_from_slice(&bytes[shift..shift + data.len()]);
    }

    /// Writes `data` at `offset` with the register semantics (read-only bits kept, BARs
    /// masked to their size, MSI / MSI-X control applied). Returns the BARs whose decoded
    /// region changed. Invalid accesses (see [`PciConfigSpace::read`]) are ignored.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Vec<BarChange> {
        if !access_ok(offset, data.len()) {
            log::debug!(
                "PCI config: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return Vec::new();
        }
        let off = usize::from(offset);
        let reg = off & !3;
        let touches_decode = reg == REG_COMMAND || self.bar_reg_index(reg).is_some();
        let before = if touches_decode {
            self.bars()
        } else {
            Vec::new()
        };
        if let Some(i) = self.bar_reg_index(reg) {
            let mut bytes = self.bar_reg(i).to_le_bytes();
            let shift = off - reg;
            bytes[shift..shift + data.len()].copy_from_slice(data);
            self.write_bar_reg(i, u32::from_le_bytes(bytes));
        } else {
            for (k, &b) in data.iter().enumerate() {
                let m = self.wmask[off + k];
                self.regs[off + k] = (self.regs[off + k] & !m) | (b & m);
            }
            self.after_cap_write(off, data.len());
        }
        if touches_decode {
            diff(&before, &self.bars())
        } else {
            Vec::new()
        }
    }

    fn after_cap_write(&mut self, off: usize, len: usize) {
        let end = off + len;
        if let Some((cap, msix)) = &self.msix {
            let ctrl = cap + 2;
            if off < ctrl + 2 && ctrl < end {
                let c = self.u16_at(ctrl);
                msix.set_control(c & 0x8000 != 0, c & 0x4000 != 0);
            }
        }
        if let Some((cap, msi)) = &self.msi {
            if off < cap + MSI_CAP_SIZE && *cap < end {
                msi.update(self.msi_regs(*cap));
            }
        }
    }

    fn msi_regs(&self, cap: usize) -> MsiRegs {
        MsiRegs {
            control: self.u16_at(cap + 2),
            address: u64::from(self.u32_at(cap + 4)) | (u64::from(self.u32_at(cap + 8)) << 32),
            data: self.u16_at(cap + 0xc),
            mask: self.u32_at(cap + 0x10),
        }
    }

    /// Appends a capability with id `cap_id` and `body` (the bytes after the id and next
    /// pointer) to the capability list; returns its offset. The capability is read-only to
    /// the guest.
    pub fn add_capability(&mut self, cap_id: u8, body: &[u8]) -> Result<u16, PciError> {
        self.add_capability_rw(cap_id, body, &[])
    }

    /// Like [`PciConfigSpace::add_capability`], with `writable` giving per-byte write masks
    /// for the body (missing bytes are read-only). The owner reads guest writes back with
    /// [`PciConfigSpace::read`] (e.g. virtio's PCI configuration access capability).
    pub fn add_capability_rw(
        &mut self,
        cap_id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u16, PciError> {
        let len = 2 + body.len();
        let start = self.next_cap;
        let end = start
            .checked_add(len.next_multiple_of(4))
            .filter(|&e| e <= CAP_AREA_END)
            .ok_or(PciError::NoCapabilitySpace(len))?;
        self.regs[start] = cap_id;
        self.regs[start + 1] = 0;
        self.regs[start + 2..start + len].copy_from_slice(body);
        for (k, &m) in writable.iter().take(body.len()).enumerate() {
            self.wmask[start + 2 + k] = m;
        }
        match self.last_cap {
            Some(prev) => self.regs[prev + 1] = start as u8,
            None => {
                self.regs[REG_CAP_PTR] = start as u8;
                self.regs[REG_STATUS] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(start);
        self.next_cap = end;
        Ok(start as u16)
    }

    /// Offsets of the capabilities with id `cap_id`, in list order.
    pub fn find_capabilities(&self, cap_id: u8) -> Vec<u16> {
        let mut out = Vec::new();
        let mut p = usize::from(self.regs[REG_CAP_PTR]);
        let mut guard = 0;
        while (CAP_AREA_START..CAP_AREA_END).contains(&p) && guard < 64 {
            if self.regs[p] == cap_id {
                out.push(p as u16);
            }
            p = usize::from(self.regs[p + 1]);
            guard += 1;
        }
        out
    }

    fn check_bar_region(&self, bar: u8, offset: u32, len: u64) -> Result<(), PciError> {
        match self.bars.get(usize::from(bar)) {
            Some(Bar::Used { size, .. }) if u64::from(offset) + len <= *size => Ok(()),
            Some(Bar::Used { size, .. }) => Err(PciError::InvalidInterruptConfig(format!(
                "MSI-X structure at {offset:#x}+{len:#x} does not fit BAR {bar} ({size:#x} bytes)"
            ))),
            _ => Err(PciError::InvalidInterruptConfig(format!(
                "MSI-X structure in BAR {bar}, which is not implemented (add the BAR first)"
            ))),
        }
    }

    /// Adds an MSI-X capability whose table and PBA live in BARs already added, delivering
    /// vector `i` through vector `i` of `vectors`. Message Control (enable, function mask)
    /// is written through [`PciConfigSpace::write`]; the device routes its BAR accesses to
    /// the returned [`Msix`] ([`Msix::bar_read`] / [`Msix::bar_write`]) and triggers
    /// vectors on it.
    pub fn add_msix(
        &mut self,
        cfg: MsixConfig,
        vectors: Arc<dyn MsiVectors>,
    ) -> Result<Arc<Msix>, PciError> {
        if self.msix.is_some() {
            return Err(PciError::DuplicateCapability(crate::CAP_ID_MSIX));
        }
        let msix = Arc::new(Msix::new(cfg, vectors)?);
        self.check_bar_region(cfg.table_bar, cfg.table_offset, cfg.table_size())?;
        self.check_bar_region(cfg.pba_bar, cfg.pba_offset, cfg.pba_size())?;
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(cfg.vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(cfg.table_offset | u32::from(cfg.table_bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(cfg.pba_offset | u32::from(cfg.pba_bar)).to_le_bytes());
        // Writable: Function Mask (bit 14) and MSI-X Enable (bit 15).
        let off = self.add_capability_rw(CAP_ID_MSIX, &body, &[0x00, 0xc0])?;
        self.msix = Some((usize::from(off), Arc::clone(&msix)));
        Ok(msix)
    }

    /// The MSI-X capability, if added.
    pub fn msix(&self) -> Option<&Arc<Msix>> {
        self.msix.as_ref().map(|(_, m)| m)
    }

    /// Adds an MSI capability (64-bit addresses, per-vector masking) with `cfg.vectors`
    /// vectors delivered through `vectors`.
    pub fn add_msi(
        &mut self,
        cfg: MsiConfig,
        vectors: Arc<dyn MsiVectors>,
    ) -> Result<Arc<Msi>, PciError> {
        if self.msi.is_some() {
            return Err(PciError::DuplicateCapability(CAP_ID_MSI));
        }
        let msi = Arc::new(Msi::new(cfg, vectors)?);
        let mut body = [0u8; MSI_CAP_SIZE - 2];
        let ctrl = MSI_CTRL_64BIT | MSI_CTRL_PVM | (msi.mmc() << 1);
        body[0..2].copy_from_slice(&ctrl.to_le_bytes());
        let mask_bits = if cfg.vectors >= 32 {
            u32::MAX
        } else {
            (1u32 << cfg.vectors) - 1
        };
        let mut w = [0u8; MSI_CAP_SIZE - 2];
        // Control: enable (bit 0) and Multiple Message Enable (6:4).
        w[0] = 0x71;
        // Address low (dword aligned), address high, data.
        w[2..6].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        w[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        w[10..12].copy_from_slice(&u16::MAX.to_le_bytes());
        // Mask bits, one per vector. Pending bits are computed on read.
        w[14..18].copy_from_slice(&mask_bits.to_le_bytes());
        let off = self.add_capability_rw(CAP_ID_MSI, &body, &w)?;
        self.msi = Some((usize::from(off), Arc::clone(&msi)));
        Ok(msi)
    }

    /// The MSI capability, if added.
    pub fn msi(&self) -> Option<&Arc<Msi>> {
        self.msi.as_ref().map(|(_, m)| m)
    }

    /// Saves the registers, BAR addresses, MSI pending bits and MSI-X state.
    pub fn save(&self) -> PciConfigState {
        let mut regs = self.regs.clone();
        // BAR registers are computed; keep the stored bytes neutral.
        for b in &mut regs[REG_BAR0..REG_BAR0 + 4 * self.header_type.bar_count()] {
            *b = 0;
        }
        PciConfigState {
            regs,
            bars: self
                .bars
                .iter()
                .map(|b| match b {
                    Bar::Used { addr, .. } => *addr,
                    _ => 0,
                })
                .collect(),
            msi_pending: self.msi.as_ref().map_or(0, |(_, m)| m.pending_bits()),
            msix: self.msix.as_ref().map(|(_, m)| m.save()),
        }
    }

    /// Loads a saved state into this space, which must have been built with the same
    /// layout (identification, BARs, capabilities) as the one saved: read-only bits that
    /// differ, BAR addresses that do not fit, or a missing/extra MSI-X state are errors and
    /// leave the space unchanged. MSI and MSI-X vectors are reprogrammed to match.
    pub fn restore_state(&mut self, state: &PciConfigState) -> Result<(), PciError> {
        let bad = |m: String| Err(PciError::InvalidState(m));
        if state.regs.len() != CONFIG_SPACE_SIZE || state.bars.len() != 6 {
            return bad(format!(
                "expected {CONFIG_SPACE_SIZE} register bytes and 6 BARs, got {} and {}",
                state.regs.len(),
                state.bars.len()
            ));
        }
        let bar_end = REG_BAR0 + 4 * self.header_type.bar_count();
        let mut msi_pending_reg = None;
        if let Some((off, _)) = &self.msi {
            msi_pending_reg = Some(off + 0x14..off + 0x18);
        }
        for i in 0..CONFIG_SPACE_SIZE {
            if (REG_BAR0..bar_end).contains(&i)
                || msi_pending_reg.as_ref().is_some_and(|r| r.contains(&i))
            {
                continue;
            }
            if (state.regs[i] ^ self.regs[i]) & !self.wmask[i] != 0 {
                return bad(format!(
                    "read-only register byte {i:#x} is {:#04x}, this function has {:#04x}",
                    state.regs[i], self.regs[i]
                ));
            }
        }
        let mut bars = self.bars;
        for (i, b) in bars.iter_mut().enumerate() {
            let want = state.bars[i];
            match b {
                Bar::Used {
                    kind, size, addr, ..
                } => {
                    let limit = if *kind == PciBarKind::Memory64 {
                        u64::MAX
                    } else {
                        u64::from(u32::MAX)
                    };
                    let granule = if *kind == PciBarKind::Io { 4 } else { 16 };
                    if want % granule != 0 || want & (*size - 1) != 0 || want > limit {
                        return bad(format!("BAR {i} address {want:#x} does not fit the BAR"));
                    }
                    *addr = want;
                }
                _ if want != 0 => return bad(format!("BAR {i} is not implemented")),
                _ => {}
            }
        }
        match (&self.msix, &state.msix) {
            (Some(_), None) => return bad("MSI-X state missing".into()),
            (None, Some(_)) => return bad("MSI-X state for a function without MSI-X".into()),
            (Some((off, msix)), Some(ms)) => {
                let c = u16::from_le_bytes([state.regs[off + 2], state.regs[off + 3]]);
                if (c & 0x8000 != 0) != ms.enabled || (c & 0x4000 != 0) != ms.function_masked {
                    return bad("MSI-X control bits disagree with the MSI-X state".into());
                }
                msix.restore(ms)?;
            }
            (None, None) => {}
        }
        self.regs.copy_from_slice(&state.regs);
        for b in &mut self.regs[REG_BAR0..bar_end] {
            *b = 0;
        }
        self.bars = bars;
        if let Some((off, msi)) = &self.msi {
            let off = *off;
            for b in &mut self.regs[off + 0x14..off + 0x18] {
                *b = 0;
            }
            msi.update(self.msi_regs(off));
            msi.set_pending_bits(state.msi_pending);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmkit_device::testing::RecordingMsi;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision: 1,
            class_code: 0x02,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 1,
        }
    }

    fn r32(c: &PciConfigSpace, off: u16) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(c: &mut PciConfigSpace, off: u16, v: u32) -> Vec<BarChange> {
        c.write(off, &v.to_le_bytes())
    }

    #[test]
    fn identification_and_read_only_bits() {
        let mut c = PciConfigSpace::new(header());
        assert_eq!(r32(&c, 0), 0x1041_1af4);
        assert_eq!(r32(&c, 8), 0x0200_0001);
        assert_eq!(r32(&c, 0x2c), 0x0001_1af4);
        w32(&mut c, 0, 0);
        w32(&mut c, 8, 0);
        assert_eq!(r32(&c, 0), 0x1041_1af4);
        assert_eq!(r32(&c, 8), 0x0200_0001);
        // Command: only the defined bits stick; status is read-only.
        w32(&mut c, 4, 0xffff_ffff);
        assert_eq!(r32(&c, 4), u32::from(CMD_WMASK));
        // Interrupt line writable, pin 0.
        w32(&mut c, 0x3c, 0xffff_ffff);
        assert_eq!(r32(&c, 0x3c), 0xff);
        // Expansion ROM not implemented.
        w32(&mut c, 0x30, 0xffff_ffff);
        assert_eq!(r32(&c, 0x30), 0);
    }

    #[test]
    fn bad_accesses_read_ones_and_are_ignored() {
        let mut c = PciConfigSpace::new(header());
        for (off, len) in [
            (0u16, 3usize),
            (0, 8),
            (2, 4),
            (3, 2),
            (4095, 2),
            (4096, 1),
            (0, 0),
        ] {
            let mut d = vec![0u8; len];
            c.read(off, &mut d);
            assert!(d.iter().all(|&b| b == 0xff), "{off:#x}+{len}");
            assert!(c.write(off, &vec![0xffu8; len]).is_empty());
        }
        assert_eq!(c.command(), 0);
        // Sub-dword accesses within a dword work.
        let mut b = [0u8; 2];
        c.read(2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x1041);
        let mut b = [0u8; 1];
        c.read(0xb, &mut b);
        assert_eq!(b[0], 0x02);
        // Extended space reads zero (end of the extended capability list).
        assert_eq!(r32(&c, 0x100), 0);
    }

    #[test]
    fn bar_sizing_and_flags() {
        let mut c = PciConfigSpace::new(header());
        c.add_bar(0, PciBarKind::Memory32, 0x1000, false).unwrap();
        c.add_bar(1, PciBarKind::Io, 0x20, false).unwrap();
        c.add_bar(2, PciBarKind::Memory64, 0x10_0000_0000, true)
            .unwrap();
        assert!(matches!(
            c.add_bar(3, PciBarKind::Memory32, 0x1000, false),
            Err(PciError::BarInUse(3))
        ));
        assert!(c.add_bar(5, PciBarKind::Memory64, 0x1000, false).is_err());
        assert!(c.add_bar(4, PciBarKind::Memory32, 0x1800, false).is_err());
        assert!(c.add_bar(4, PciBarKind::Io, 0x200, false).is_err());
        for off in (0x10..0x28).step_by(4) {
            w32(&mut c, off, 0xffff_ffff);
        }
        assert_eq!(r32(&c, 0x10), 0xffff_f000);
        assert_eq!(r32(&c, 0x14), 0xffff_ffe1);
        assert_eq!(r32(&c, 0x18), 0x0000_000c);
        assert_eq!(r32(&c, 0x1c), 0xffff_fff0);
        assert_eq!(r32(&c, 0x20), 0);
        // Byte-wise programming.
        w32(&mut c, 0x10, 0);
        c.write(0x13, &[0xc0]);
        c.write(0x11, &[0x12]);
        assert_eq!(r32(&c, 0x10), 0xc000_1000);
        assert_eq!(c.bar_address(0), Some(0xc000_1000));
        assert_eq!(c.bar_info().len(), 3);
        assert!(c.set_bar_address(0, 0x1001).is_err());
        assert!(c.set_bar_address(3, 0x1000).is_err());
        assert!(c.set_bar_address(0, 0xffff_f000).is_ok());
        assert!(c.set_bar_address(2, 0x10_0000_0000).is_ok());
        assert_eq!(r32(&c, 0x1c), 0x10);
    }

    #[test]
    fn decode_changes_are_reported() {
        let mut c = PciConfigSpace::new(header());
        c.add_bar(0, PciBarKind::Memory64, 0x4000, false).unwrap();
        c.add_bar(2, PciBarKind::Io, 0x40, false).unwrap();
        c.set_bar_address(0, 0xc000_0000).unwrap();
        c.set_bar_address(2, 0xc040).unwrap();
        assert!(c.bars().is_empty(), "decoding off at reset");
        let ch = c.write(4, &CMD_MEM.to_le_bytes());
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].old, None);
        assert_eq!(ch[0].new.unwrap().addr, 0xc000_0000);
        let ch = w32(&mut c, 0x10, 0xc100_0000);
        assert_eq!(ch[0].old.unwrap().addr, 0xc000_0000);
        assert_eq!(ch[0].new.unwrap().addr, 0xc100_0000);
        let ch = w32(&mut c, 0x14, 1);
        assert_eq!(ch[0].new.unwrap().addr, 0x1_c100_0000);
        // Same value: no change.
        assert!(w32(&mut c, 0x14, 1).is_empty());
        let ch = c.write(4, &(CMD_IO).to_le_bytes());
        assert_eq!(ch.len(), 2);
        assert_eq!(c.bars().len(), 1);
        assert_eq!(c.bars()[0].kind, PciBarKind::Io);
        // Unrelated writes produce nothing.
        assert!(w32(&mut c, 0x3c, 5).is_empty());
    }

    #[test]
    fn capability_list() {
        let mut c = PciConfigSpace::new(header());
        assert_eq!(r32(&c, 4) >> 16 & 0x10, 0);
        let a = c
            .add_capability(CAP_ID_VENDOR, &[14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
            .unwrap();
        let b = c
            .add_capability_rw(CAP_ID_VENDOR, &[6, 0xaa, 0xbb, 0xcc], &[0, 0, 0xff])
            .unwrap();
        assert_eq!((a, b), (0x40, 0x50));
        assert_eq!(r32(&c, 4) >> 16 & 0x10, 0x10);
        assert_eq!(r32(&c, 0x34) & 0xff, 0x40);
        assert_eq!(r32(&c, 0x40) & 0xffff, 0x5009);
        assert_eq!(r32(&c, 0x50) & 0xffff, 0x0009);
        w32(&mut c, 0x50, 0);
        w32(&mut c, 0x40, 0);
        assert_eq!(r32(&c, 0x40), 0x010e_5009, "read-only capability");
        assert_eq!(r32(&c, 0x50), 0xaa06_0009);
        w32(&mut c, 0x54, 0x1234_5678);
        assert_eq!(r32(&c, 0x54), 0x0000_cc78, "only the writable byte changed");
        assert_eq!(c.find_capabilities(CAP_ID_VENDOR), vec![0x40, 0x50]);
        assert!(c.add_capability(CAP_ID_VENDOR, &[0; 200]).is_err());
        while c.add_capability(CAP_ID_VENDOR, &[0; 2]).is_ok() {}
        assert!(c.find_capabilities(CAP_ID_VENDOR).len() > 2);
    }

    #[test]
    fn msix_capability_and_control() {
        let mut c = PciConfigSpace::new(header());
        let g = Arc::new(RecordingMsi::new(4));
        let cfg = MsixConfig {
            vectors: 4,
            table_bar: 1,
            table_offset: 0x1000,
            pba_bar: 1,
            pba_offset: 0x1800,
        };
        assert!(c.add_msix(cfg, g.clone()).is_err(), "BAR 1 missing");
        c.add_bar(1, PciBarKind::Memory32, 0x1000, false).unwrap();
        assert!(c.add_msix(cfg, g.clone()).is_err(), "does not fit");
        let cfg = MsixConfig {
            table_offset: 0,
            pba_offset: 0x800,
            ..cfg
        };
        let m = c.add_msix(cfg, g.clone()).unwrap();
        assert!(c.add_msix(cfg, g.clone()).is_err());
        let off = c.find_capabilities(CAP_ID_MSIX)[0];
        assert_eq!(r32(&c, off) & 0xffff_00ff, 0x0003_0011);
        assert_eq!(r32(&c, off + 4), 1);
        assert_eq!(r32(&c, off + 8), 0x801);
        w32(&mut c, off, 0xffff_ffff);
        assert_eq!(r32(&c, off) >> 16, 0xc003);
        assert!(m.enabled() && m.function_masked());
        c.write(off + 3, &[0x80]);
        assert!(m.enabled() && !m.function_masked());
        // Table through the BAR helper.
        assert!(m.bar_write(1, 0x10, &0xfee0_0000u32.to_le_bytes()));
        assert!(m.bar_write(1, 0x18, &0x45u32.to_le_bytes()));
        assert!(m.bar_write(1, 0x1c, &0u32.to_le_bytes()));
        assert!(!m.bar_write(0, 0x10, &[0; 4]));
        assert!(!m.bar_write(1, 0x900, &[0; 4]));
        m.trigger(1).unwrap();
        assert_eq!(g.delivered(1), 1);
        assert_eq!(g.message(1).unwrap().data, 0x45);
    }

    #[test]
    fn msi_capability_through_config_writes() {
        let mut c = PciConfigSpace::new(header());
        let g = Arc::new(RecordingMsi::new(2));
        let m = c.add_msi(MsiConfig { vectors: 2 }, g.clone()).unwrap();
        let off = c.find_capabilities(CAP_ID_MSI)[0];
        assert_eq!(r32(&c, off) >> 16, 0x0182);
        m.trigger(0).unwrap();
        assert_eq!(r32(&c, off + 0x14), 1, "pending bit visible");
        w32(&mut c, off + 4, 0xfee0_0003);
        assert_eq!(r32(&c, off + 4), 0xfee0_0000);
        w32(&mut c, off + 0xc, 0xffff_0050);
        assert_eq!(r32(&c, off + 0xc), 0x50);
        w32(&mut c, off + 0x10, 0xffff_ffff);
        assert_eq!(r32(&c, off + 0x10), 3);
        w32(&mut c, off + 0x10, 0);
        c.write(off + 2, &[0x11]);
        assert!(m.enabled());
        assert_eq!(g.delivered(0), 1);
        assert_eq!(r32(&c, off + 0x14), 0);
        m.trigger(1).unwrap();
        assert_eq!(g.message(1).unwrap().data, 0x51);
        assert_eq!(g.delivered(1), 1);
    }

    #[test]
    fn bridge_header_registers() {
        let mut c = PciConfigSpace::new_bridge(PciHeader {
            class_code: 0x06,
            subclass: 0x04,
            ..header()
        });
        assert_eq!(r32(&c, 0x0c) >> 16 & 0x7f, 1);
        w32(&mut c, 0x18, 0xffff_ffff);
        assert_eq!(r32(&c, 0x18), 0x00ff_ffff);
        w32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(r32(&c, 0x1c) & 0xffff, 0xf0f0);
        w32(&mut c, 0x20, 0xffff_ffff);
        assert_eq!(r32(&c, 0x20), 0xfff0_fff0);
        w32(&mut c, 0x24, 0);
        assert_eq!(r32(&c, 0x24), 0x0001_0001);
        w32(&mut c, 0x28, 0x12);
        assert_eq!(r32(&c, 0x28), 0x12);
        assert!(c.add_bar(2, PciBarKind::Memory32, 0x1000, false).is_err());
        c.add_bar(0, PciBarKind::Memory32, 0x1000, false).unwrap();
        w32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(r32(&c, 0x10), 0xffff_f000);
    }

    #[test]
    fn state_round_trip_and_validation() {
        let build = || {
            let mut c = PciConfigSpace::new(header());
            c.add_bar(0, PciBarKind::Memory64, 0x4000, false).unwrap();
            let g = Arc::new(RecordingMsi::new(2));
            c.add_msi(MsiConfig { vectors: 1 }, g.clone()).unwrap();
            let m = c
                .add_msix(
                    MsixConfig {
                        vectors: 2,
                        table_bar: 0,
                        table_offset: 0,
                        pba_bar: 0,
                        pba_offset: 0x1000,
                    },
                    g.clone(),
                )
                .unwrap();
            (c, m, g)
        };
        let (mut c, m, _) = build();
        w32(&mut c, 0x10, 0xc000_0004);
        w32(&mut c, 4, 6);
        let msix_off = c.find_capabilities(CAP_ID_MSIX)[0];
        c.write(msix_off + 3, &[0x80]);
        m.table_write(0, &0xfee0_0000u64.to_le_bytes());
        m.table_write(8, &0x33u32.to_le_bytes());
        m.table_write(12, &0u32.to_le_bytes());
        c.msi().unwrap().trigger(0).unwrap();
        let s = c.save();
        let bytes = vmkit_migration::encode(&s).unwrap();
        let s2: PciConfigState = vmkit_migration::decode(&bytes).unwrap();
        let (mut d, m2, g2) = build();
        d.restore_state(&s2).unwrap();
        assert_eq!(d.save(), s);
        assert_eq!(d.bars(), c.bars());
        assert!(m2.enabled());
        assert_eq!(g2.masked(0), Some(false));
        assert_eq!(g2.message(0).unwrap().data, 0x33);
        assert_eq!(d.msi().unwrap().pending_bits(), 1);

        // Another layout is refused and leaves the space untouched.
        let mut other = PciConfigSpace::new(PciHeader {
            device_id: 0x1042,
            ..header()
        });
        assert!(other.restore_state(&s).is_err());
        let (mut e, _, _) = build();
        let mut bad = s.clone();
        bad.bars[0] = 0xc000_0100;
        assert!(e.restore_state(&bad).is_err());
        let mut bad = s.clone();
        bad.msix = None;
        assert!(e.restore_state(&bad).is_err());
        let mut bad = s.clone();
        bad.regs.truncate(10);
        assert!(e.restore_state(&bad).is_err());
        assert_eq!(e.bar_address(0), Some(0));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_writes_keep_register_invariants(
            ops in proptest::collection::vec((0u16..0x1002, proptest::num::u32::ANY, 0usize..5), 0..300)
        ) {
            let mut c = PciConfigSpace::new(header());
            c.add_bar(0, PciBarKind::Memory32, 0x1000, true).unwrap();
            c.add_bar(1, PciBarKind::Io, 0x40, false).unwrap();
            c.add_bar(2, PciBarKind::Memory64, 0x2_0000_0000, false).unwrap();
            let g = Arc::new(RecordingMsi::new(8));
            let msix = c
                .add_msix(
                    MsixConfig { vectors: 8, table_bar: 0, table_offset: 0, pba_bar: 0, pba_offset: 0x800 },
                    g.clone(),
                )
                .unwrap();
            c.add_msi(MsiConfig { vectors: 4 }, g.clone()).unwrap();
            let msix_cap = c.find_capabilities(CAP_ID_MSIX)[0];
            for (off, val, size) in ops {
                let len = [1usize, 2, 4, 3, 8][size];
                let bytes = u64::from(val).to_le_bytes();
                let _ = c.write(off, &bytes[..len]);
                proptest::prop_assert_eq!(r32(&c, 0), 0x1041_1af4);
                proptest::prop_assert_eq!(r32(&c, 8), 0x0200_0001);
                let b0 = r32(&c, 0x10);
                proptest::prop_assert_eq!(b0 & 0xfff, 0x8);
                let b1 = r32(&c, 0x14);
                proptest::prop_assert_eq!(b1 & 0x3f, 0x1);
                proptest::prop_assert_eq!(r32(&c, 0x18) & 0xf, 0x4);
                proptest::prop_assert_eq!(r32(&c, 0x1c) & 1, 0, "upper half aligned to 8 GiB");
                for r in c.bars() {
                    proptest::prop_assert_eq!(r.addr % r.size, 0);
                }
                let ctrl = r32(&c, msix_cap) >> 16;
                proptest::prop_assert_eq!(ctrl & 0x7ff, 7);
                proptest::prop_assert_eq!(ctrl & 0x8000 != 0, msix.enabled());
                proptest::prop_assert_eq!(ctrl & 0x4000 != 0, msix.function_masked());
                proptest::prop_assert_eq!(c.find_capabilities(CAP_ID_MSI).len(), 1);
            }
        }
    }
}
