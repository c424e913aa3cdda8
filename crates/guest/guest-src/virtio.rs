// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio 1.x: the PCI (modern, capabilities per virtio 1.2 4.1.4) and MMIO (version 2)
//! transports, device initialisation, and split virtqueues driven by polling.
//!
//! The drivers never wait for an interrupt to make progress: they poll the used ring (see
//! `irq.rs` for why). Each queue still gets an interrupt (an MSI-X entry, or the device's
//! IOAPIC line for MMIO), which `irq.rs` counts. Buffers are always notified (no
//! `VIRTIO_F_EVENT_IDX`).

use crate::cpu::{mmio_read, mmio_write};
use crate::pci::{BarKind, Bdf, Function, Msix, Pci};
use core::sync::atomic::{compiler_fence, Ordering};

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;

/// Device status bits.
const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const S_FAILED: u8 = 128;

/// Descriptor flags.
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;

/// "No MSI-X vector".
const NO_VECTOR: u16 = 0xFFFF;

/// virtio device types (virtio 1.2 section 5).
pub const TYPE_BLOCK: u32 = 2;
/// Console.
pub const TYPE_CONSOLE: u32 = 3;
/// Entropy source.
pub const TYPE_RNG: u32 = 4;

/// Why a device could not be set up (printed as `reason=` in `VMKIT-VIRTIO-ERROR`).
pub type Error = &'static str;

/// The modern virtio-pci register windows of one function.
#[derive(Clone, Copy, Debug)]
pub struct PciTransport {
    /// Where the function is.
    pub bdf: Bdf,
    common: u64,
    notify: u64,
    notify_mult: u32,
    device: u64,
    /// The function's MSI-X capability.
    pub msix: Option<Msix>,
}

/// A virtio-mmio (version 2) device.
#[derive(Clone, Copy, Debug)]
pub struct MmioTransport {
    /// Base address of its registers.
    pub base: u64,
    /// Its interrupt (IOAPIC GSI).
    pub irq: u32,
}

/// Either transport.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    /// virtio over PCI.
    Pci(PciTransport),
    /// virtio over MMIO.
    Mmio(MmioTransport),
}

/// The virtio device type of a PCI function, if it is a virtio device
/// (modern `0x1040 + type` or transitional `0x1000..0x103F`).
pub fn pci_device_type(f: &Function) -> Option<u32> {
    if f.vendor != 0x1AF4 {
        return None;
    }
    match f.device {
        0x1040..=0x107F => Some(u32::from(f.device - 0x1040)),
        0x1000 => Some(1),
        0x1001 => Some(TYPE_BLOCK),
        0x1002 => Some(5),
        0x1003 => Some(TYPE_CONSOLE),
        0x1004 => Some(8),
        0x1005 => Some(TYPE_RNG),
        0x1009 => Some(9),
        _ => None,
    }
}

impl PciTransport {
    /// Finds the virtio capabilities of `f` (its BARs must be programmed).
    pub fn new(pci: &Pci, f: &Function) -> Result<PciTransport, Error> {
        let (caps, n) = pci.capabilities(f.bdf);
        let (mut common, mut notify, mut device) = (None, None, None);
        let mut notify_mult = 0;
        for &c in &caps[..n] {
            let c = u16::from(c);
            if pci.read8(f.bdf, c) != 0x09 {
                continue;
            }
            let cfg_type = pci.read8(f.bdf, c + 3);
            let bar = usize::from(pci.read8(f.bdf, c + 4));
            let offset = u64::from(pci.read32(f.bdf, c + 8));
            let length = u64::from(pci.read32(f.bdf, c + 12));
            let Some(b) = f.bars.get(bar) else { continue };
            if !matches!(b.kind, BarKind::Mem32 | BarKind::Mem64)
                || b.addr == 0
                || offset + length > b.size
            {
                continue;
            }
            let addr = b.addr + offset;
            match cfg_type {
                1 if common.is_none() && length >= 0x38 => common = Some(addr),
                2 if notify.is_none() => {
                    notify = Some(addr);
                    notify_mult = pci.read32(f.bdf, c + 16);
                }
                4 if device.is_none() => device = Some(addr),
                _ => {}
            }
        }
        Ok(PciTransport {
            bdf: f.bdf,
            common: common.ok_or("no_common_cfg")?,
            notify: notify.ok_or("no_notify_cfg")?,
            notify_mult,
            device: device.unwrap_or(0),
            msix: pci.msix(f),
        })
    }
}

impl PciTransport {
    /// A transport that only names `bdf` (for reporting a function whose capabilities are
    /// unusable); it must not be used for I/O.
    pub fn for_report(bdf: Bdf) -> PciTransport {
        PciTransport {
            bdf,
            common: 0,
            notify: 0,
            notify_mult: 0,
            device: 0,
            msix: None,
        }
    }
}

impl MmioTransport {
    /// Checks the magic value and version 2; returns the device type (0: no device).
    pub fn probe(base: u64) -> Result<u32, Error> {
        if base.checked_add(0x200).is_none_or(|e| e > 1 << 32) {
            return Err("mmio_above_4g");
        }
        if mmio_read::<u32>(base) != 0x7472_6976 {
            return Err("bad_magic");
        }
        if mmio_read::<u32>(base + 4) != 2 {
            return Err("not_version_2");
        }
        Ok(mmio_read::<u32>(base + 8))
    }
}

/// A split virtqueue in guest memory.
pub struct Virtqueue {
    /// Queue index.
    pub index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
    notify_addr: u64,
    notify_mmio: bool,
}

impl Transport {
    fn common(&self) -> u64 {
        match self {
            Transport::Pci(p) => p.common,
            Transport::Mmio(_) => 0,
        }
    }

    /// Device status register.
    pub fn status(&self) -> u8 {
        match self {
            Transport::Pci(p) => mmio_read::<u8>(p.common + 0x14),
            Transport::Mmio(m) => mmio_read::<u32>(m.base + 0x70) as u8,
        }
    }

    fn set_status(&self, s: u8) {
        match self {
            Transport::Pci(p) => mmio_write::<u8>(p.common + 0x14, s),
            Transport::Mmio(m) => mmio_write::<u32>(m.base + 0x70, u32::from(s)),
        }
    }

    /// Marks the device failed (the driver gives up on it).
    pub fn fail(&self) {
        self.set_status(self.status() | S_FAILED);
    }

    /// Resets the device and negotiates features: offers `wanted & device features`
    /// (VERSION_1 required). Returns the negotiated features.
    pub fn init(&self, wanted: u64) -> Result<u64, Error> {
        self.set_status(0);
        let mut spins = 0u32;
        while self.status() != 0 {
            spins += 1;
            if spins > 1_000_000 {
                return Err("reset_timeout");
            }
            crate::cpu::pause();
        }
        self.set_status(S_ACKNOWLEDGE);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER);
        let features = self.device_features();
        if features & F_VERSION_1 == 0 {
            return Err("no_version_1");
        }
        let chosen = features & (wanted | F_VERSION_1);
        self.set_driver_features(chosen);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            self.fail();
            return Err("features_not_accepted");
        }
        Ok(chosen)
    }

    fn device_features(&self) -> u64 {
        let (sel, val) = match self {
            Transport::Pci(p) => (p.common, p.common + 4),
            Transport::Mmio(m) => (m.base + 0x14, m.base + 0x10),
        };
        mmio_write::<u32>(sel, 0);
        let lo = mmio_read::<u32>(val);
        mmio_write::<u32>(sel, 1);
        let hi = mmio_read::<u32>(val);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    fn set_driver_features(&self, f: u64) {
        let (sel, val) = match self {
            Transport::Pci(p) => (p.common + 8, p.common + 0xC),
            Transport::Mmio(m) => (m.base + 0x24, m.base + 0x20),
        };
        mmio_write::<u32>(sel, 0);
        mmio_write::<u32>(val, f as u32);
        mmio_write::<u32>(sel, 1);
        mmio_write::<u32>(val, (f >> 32) as u32);
    }

    /// Sets DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    }

    /// Number of queues the transport reports (PCI); `None` for MMIO (ask the device).
    pub fn num_queues(&self) -> Option<u16> {
        match self {
            Transport::Pci(p) => Some(mmio_read::<u16>(p.common + 0x12)),
            Transport::Mmio(_) => None,
        }
    }

    /// Largest size of queue `q` (0: the queue does not exist).
    pub fn queue_max(&self, q: u16) -> u16 {
        match self {
            Transport::Pci(p) => {
                mmio_write::<u16>(p.common + 0x16, q);
                mmio_read::<u16>(p.common + 0x18)
            }
            Transport::Mmio(m) => {
                mmio_write::<u32>(m.base + 0x30, u32::from(q));
                mmio_read::<u32>(m.base + 0x34).min(0x8000) as u16
            }
        }
    }

    /// Creates queue `q` with at most `want` entries (rounded down to a power of two),
    /// attached to MSI-X table entry `msix_entry` (PCI; ignored for MMIO).
    pub fn setup_queue(
        &self,
        q: u16,
        want: u16,
        msix_entry: Option<u16>,
    ) -> Result<Virtqueue, Error> {
        let max = self.queue_max(q);
        if max == 0 {
            return Err("queue_missing");
        }
        let mut size = want.min(max).max(1);
        // Power of two (split rings require it).
        size = 1 << (15 - size.leading_zeros());
        let n = u64::from(size);
        let avail_off = 16 * n;
        let used_off = (avail_off + 6 + 2 * n + 63) & !63;
        let total = used_off + 6 + 8 * n;
        let base = crate::dma::alloc_zeroed(total, 4096).ok_or("out_of_memory")?;
        let (desc, avail, used) = (base, base + avail_off, base + used_off);
        // Free list through the `next` fields.
        for i in 0..size {
            mmio_write::<u16>(desc + 16 * u64::from(i) + 14, i.wrapping_add(1));
        }
        let (notify_addr, notify_mmio) = match self {
            Transport::Pci(p) => {
                let c = self.common();
                mmio_write::<u16>(c + 0x16, q);
                mmio_write::<u16>(c + 0x18, size);
                if let Some(e) = msix_entry {
                    mmio_write::<u16>(c + 0x1A, e);
                    if mmio_read::<u16>(c + 0x1A) == NO_VECTOR {
                        return Err("msix_vector_refused");
                    }
                } else {
                    mmio_write::<u16>(c + 0x1A, NO_VECTOR);
                }
                write64(c + 0x20, desc);
                write64(c + 0x28, avail);
                write64(c + 0x30, used);
                let off = u64::from(mmio_read::<u16>(c + 0x1E));
                mmio_write::<u16>(c + 0x1C, 1);
                (p.notify + off * u64::from(p.notify_mult), false)
            }
            Transport::Mmio(m) => {
                let b = m.base;
                mmio_write::<u32>(b + 0x30, u32::from(q));
                if mmio_read::<u32>(b + 0x44) != 0 {
                    return Err("queue_already_ready");
                }
                mmio_write::<u32>(b + 0x38, u32::from(size));
                write64(b + 0x80, desc);
                write64(b + 0x90, avail);
                write64(b + 0xA0, used);
                mmio_write::<u32>(b + 0x44, 1);
                (b + 0x50, true)
            }
        };
        Ok(Virtqueue {
            index: q,
            size,
            desc,
            avail,
            used,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
            notify_addr,
            notify_mmio,
        })
    }

    /// Turns off the config-change interrupt (PCI).
    pub fn no_config_vector(&self) {
        if let Transport::Pci(p) = self {
            mmio_write::<u16>(p.common + 0x10, NO_VECTOR);
        }
    }

    /// Address of device-configuration byte `off` (`None`: the PCI function has no
    /// device-configuration capability).
    fn cfg_addr(&self, off: u64) -> Option<u64> {
        match self {
            Transport::Pci(p) => (p.device != 0).then(|| p.device + off),
            Transport::Mmio(m) => Some(m.base + 0x100 + off),
        }
    }

    /// Reads a 16-bit field of the device configuration (0 without one).
    pub fn cfg16(&self, off: u64) -> u16 {
        self.cfg_addr(off).map_or(0, mmio_read::<u16>)
    }
    /// Reads a 32-bit field of the device configuration (0 without one).
    pub fn cfg32(&self, off: u64) -> u32 {
        self.cfg_addr(off).map_or(0, mmio_read::<u32>)
    }
    /// Reads a 64-bit field of the device configuration (two 32-bit reads).
    pub fn cfg64(&self, off: u64) -> u64 {
        let lo = self.cfg32(off);
        let hi = self.cfg32(off + 4);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Acknowledges a virtio-mmio device's pending interrupt status (no-op for PCI).
    pub fn ack(&self) {
        if let Transport::Mmio(m) = self {
            let s = mmio_read::<u32>(m.base + 0x60);
            if s != 0 {
                mmio_write::<u32>(m.base + 0x64, s);
            }
        }
    }
}

fn write64(addr: u64, v: u64) {
    mmio_write::<u32>(addr, v as u32);
    mmio_write::<u32>(addr + 4, (v >> 32) as u32);
}

/// One buffer of a chain: guest-physical address, length, device-writable.
pub type Buf = (u64, u32, bool);

impl Virtqueue {
    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Makes `bufs` one descriptor chain and offers it; returns its head (the id the used
    /// ring will name), or `None` when there are not enough free descriptors.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        let n = bufs.len();
        if n == 0 || n > usize::from(self.num_free) {
            return None;
        }
        let head = self.free_head;
        let mut idx = head;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = self.desc + 16 * u64::from(idx);
            let next: u16 = mmio_read(d + 14);
            mmio_write::<u64>(d, addr);
            mmio_write::<u32>(d + 8, len);
            let last = k + 1 == n;
            let flags = if write { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            mmio_write::<u16>(d + 12, flags);
            if last {
                self.free_head = next;
            } else {
                idx = next;
            }
        }
        self.num_free -= n as u16;
        let slot = u64::from(self.avail_idx % self.size);
        mmio_write::<u16>(self.avail + 4 + 2 * slot, head);
        compiler_fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mmio_write::<u16>(self.avail + 2, self.avail_idx);
        Some(head)
    }

    /// Tells the device there are new buffers.
    pub fn kick(&self) {
        compiler_fence(Ordering::SeqCst);
        if self.notify_mmio {
            mmio_write::<u32>(self.notify_addr, u32::from(self.index));
        } else {
            mmio_write::<u16>(self.notify_addr, self.index);
        }
    }

    /// Takes one used buffer: `(head, bytes written by the device)`. A used element naming
    /// a descriptor out of range is dropped (`None`).
    pub fn poll(&mut self) -> Option<(u16, u32)> {
        let used_idx: u16 = mmio_read(self.used + 2);
        if used_idx == self.last_used {
            return None;
        }
        compiler_fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = mmio_read(e);
        let len: u32 = mmio_read(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        if id >= u32::from(self.size) {
            return None;
        }
        let head = id as u16;
        let mut idx = head;
        let mut freed = 1u16;
        loop {
            let d = self.desc + 16 * u64::from(idx);
            let flags: u16 = mmio_read(d + 12);
            if flags & DESC_NEXT == 0 || freed > self.size {
                mmio_write::<u16>(d + 14, self.free_head);
                break;
            }
            idx = mmio_read(d + 14);
            freed += 1;
        }
        self.free_head = head;
        self.num_free = (self.num_free + freed).min(self.size);
        Some((head, len))
    }
}
