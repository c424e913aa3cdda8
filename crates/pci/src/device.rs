// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The [`PciDevice`] trait: what a PCI function implements to sit behind the root complex.

/// A BAR's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PciBarKind {
    /// Port I/O.
    Io,
    /// 32-bit memory.
    Memory32,
    /// 64-bit memory (occupies two BAR registers).
    Memory64,
}

/// A BAR as currently programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciBarRegion {
    /// BAR index (0..=5).
    pub index: u8,
    /// Address space.
    pub kind: PciBarKind,
    /// Base address (guest-physical or port).
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

/// A PCI function (type 0 endpoint or type 1 bridge).
///
/// Called from vCPU threads, hence `&self`; implementations keep state behind their own
/// locks. Nothing the guest writes may make a method panic: unknown registers read as the
/// spec defines (usually zero) and writes to read-only bits are ignored.
pub trait PciDevice: Send + Sync {
    /// Reads `data.len()` (1, 2 or 4) bytes of configuration space at `offset` (0..4096;
    /// accesses never cross a 4-byte boundary).
    fn config_read(&self, offset: u16, data: &mut [u8]);

    /// Writes configuration space. Returns the BARs whose decoded address changed
    /// (old region, new region) so that the root complex moves their bus ranges; a BAR that
    /// memory/IO decoding turned off or on counts as moved from/to nothing.
    fn config_write(&self, offset: u16, data: &[u8]) -> Vec<BarChange>;

    /// Reads from BAR `bar` at `offset` (the root complex routes bus accesses here).
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]);

    /// Writes to BAR `bar` at `offset`.
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]);

    /// The BARs currently decoded (memory or I/O decoding enabled and an address
    /// assigned).
    fn bars(&self) -> Vec<PciBarRegion>;

    /// Called after the root complex moved a BAR's bus range, so that the function can move
    /// what it registered outside the bus (ioeventfds on a virtio notify region).
    ///
    /// [`crate::PciRoot`] reports a move as two calls, leaving (`new: None`) and then taking
    /// (`old: None`), and reports every leaving of one update before any taking, so that an
    /// address one BAR leaves is free before another BAR claims it.
    fn bar_moved(&self, change: &BarChange) {
        let _ = change;
    }

    /// The BARs the function implements (index, kind, size), whether decoded or not. The
    /// root complex allocates addresses for them from the slot plan when the device is
    /// added. The default reports none.
    fn bar_info(&self) -> Vec<PciBarInfo> {
        Vec::new()
    }

    /// Programs BAR `index` to `addr` (what firmware does before the guest runs), without
    /// changing the decode enables. The default refuses: a function that reports BARs in
    /// [`PciDevice::bar_info`] must implement this (usually by forwarding to
    /// [`crate::PciConfigSpace::set_bar_address`]).
    fn set_bar_address(&self, index: u8, addr: u64) -> Result<(), crate::PciError> {
        let _ = addr;
        Err(crate::PciError::InvalidBar(index))
    }
}

/// A BAR a function implements, independent of where it is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciBarInfo {
    /// BAR index (0..=5; a 64-bit BAR also occupies `index + 1`).
    pub index: u8,
    /// Address space.
    pub kind: PciBarKind,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Whether the BAR is marked prefetchable.
    pub prefetchable: bool,
}

/// A BAR that was moved, enabled or disabled by a configuration write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarChange {
    /// Where the BAR decoded before (`None`: it did not).
    pub old: Option<PciBarRegion>,
    /// Where it decodes now (`None`: decoding is off).
    pub new: Option<PciBarRegion>,
}
