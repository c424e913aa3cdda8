// SPDX-License-Identifier: Apache-2.0 OR MIT
//! MSI (PCI Local Bus 3.0 §6.8.1) with 64-bit addresses and per-vector masking.
//!
//! Capability layout used here (24 bytes): `+0` id 0x05, `+1` next, `+2` Message Control
//! (bit 0 enable, bits 3:1 Multiple Message Capable, bits 6:4 Multiple Message Enable,
//! bit 7 64-bit capable, bit 8 per-vector masking capable), `+4` Message Address,
//! `+8` Message Upper Address, `+0xC` Message Data, `+0xE` reserved, `+0x10` Mask Bits,
//! `+0x14` Pending Bits. With `2^k` vectors enabled, vector `i` is sent with the low `k`
//! bits of the data replaced by `i`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmkit_device::{MsiMessage, MsiVectors};

use crate::PciError;

/// Size of the MSI capability, id and next pointer included.
pub(crate) const MSI_CAP_SIZE: usize = 0x18;
pub(crate) const MSI_CTRL_ENABLE: u16 = 1;
pub(crate) const MSI_CTRL_64BIT: u16 = 1 << 7;
pub(crate) const MSI_CTRL_PVM: u16 = 1 << 8;

/// How many MSI vectors a function asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MsiConfig {
    /// Vectors (1, 2, 4, 8, 16 or 32).
    pub vectors: u8,
}

/// The guest-programmed registers of an MSI capability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MsiRegs {
    pub control: u16,
    pub address: u64,
    pub data: u16,
    pub mask: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Backend {
    message: Option<MsiMessage>,
    unmasked: bool,
}

#[derive(Debug)]
struct Inner {
    regs: MsiRegs,
    pending: u32,
    backend: Vec<Backend>,
}

/// An MSI capability's vector state, shared between the configuration space and the
/// device's worker threads.
pub struct Msi {
    count: u8,
    vectors: Arc<dyn MsiVectors>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Msi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msi")
            .field("count", &self.count)
            .field("state", &*self.lock())
            .finish()
    }
}

impl Msi {
    pub(crate) fn new(config: MsiConfig, vectors: Arc<dyn MsiVectors>) -> Result<Self, PciError> {
        if !config.vectors.is_power_of_two() || config.vectors > 32 {
            return Err(PciError::InvalidInterruptConfig(format!(
                "MSI vector count {} is not 1, 2, 4, 8, 16 or 32",
                config.vectors
            )));
        }
        if vectors.len() < usize::from(config.vectors) {
            return Err(PciError::InvalidInterruptConfig(format!(
                "MSI needs {} vectors, the interrupt group has {}",
                config.vectors,
                vectors.len()
            )));
        }
        Ok(Self {
            count: config.vectors,
            vectors,
            inner: Mutex::new(Inner {
                regs: MsiRegs::default(),
                pending: 0,
                backend: vec![Backend::default(); usize::from(config.vectors)],
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Multiple Message Capable field value (log2 of the vector count).
    pub(crate) fn mmc(&self) -> u16 {
        self.count.trailing_zeros() as u16
    }

    /// Number of vectors the function supports.
    pub fn vector_count(&self) -> u8 {
        self.count
    }

    /// Whether the guest enabled MSI.
    pub fn enabled(&self) -> bool {
        self.lock().regs.control & MSI_CTRL_ENABLE != 0
    }

    /// Number of vectors the guest enabled (Multiple Message Enable, capped at the count).
    fn enabled_count(regs: &MsiRegs, count: u8) -> u32 {
        let mme = u32::from((regs.control >> 4) & 7);
        (1u32 << mme.min(5)).min(u32::from(count))
    }

    fn masked(regs: &MsiRegs, count: u8, v: usize) -> bool {
        regs.control & MSI_CTRL_ENABLE == 0
            || v as u32 >= Self::enabled_count(regs, count)
            || regs.mask & (1u32 << v) != 0
    }

    fn message(regs: &MsiRegs, count: u8, v: usize) -> MsiMessage {
        let n = Self::enabled_count(regs, count);
        let data = (u32::from(regs.data) & !(n - 1)) | (v as u32 & (n - 1));
        MsiMessage {
            address: regs.address,
            data,
        }
    }

    /// Current pending bits.
    pub fn pending_bits(&self) -> u32 {
        self.lock().pending
    }

    pub(crate) fn set_pending_bits(&self, bits: u32) {
        let mut inner = self.lock();
        inner.pending = bits & self.all_bits();
        for v in 0..usize::from(self.count) {
            self.sync(&mut inner, v);
        }
    }

    fn all_bits(&self) -> u32 {
        if self.count >= 32 {
            u32::MAX
        } else {
            (1u32 << self.count) - 1
        }
    }

    /// Applies the registers the guest programmed (called by the configuration space).
    pub(crate) fn update(&self, regs: MsiRegs) {
        let mut inner = self.lock();
        if inner.regs == regs {
            return;
        }
        inner.regs = regs;
        for v in 0..usize::from(self.count) {
            self.sync(&mut inner, v);
        }
    }

    fn sync(&self, inner: &mut Inner, v: usize) {
        let regs = inner.regs;
        let Some(backend) = inner.backend.get(v).copied() else {
            return;
        };
        if Self::masked(&regs, self.count, v) {
            if backend.unmasked {
                match self.vectors.set_masked(v, true) {
                    Ok(()) => {
                        if let Some(b) = inner.backend.get_mut(v) {
                            b.unmasked = false;
                        }
                    }
                    Err(e) => log::warn!("MSI vector {v}: cannot mask: {e}"),
                }
            }
            return;
        }
        let message = Self::message(&regs, self.count, v);
        if backend.message != Some(message) {
            if let Err(e) = self.vectors.configure(v, message) {
                log::warn!("MSI vector {v}: cannot route {message:?}: {e}");
                return;
            }
            if let Some(b) = inner.backend.get_mut(v) {
                b.message = Some(message);
            }
        }
        if !backend.unmasked {
            if let Err(e) = self.vectors.set_masked(v, false) {
                log::warn!("MSI vector {v}: cannot unmask: {e}");
                return;
            }
            if let Some(b) = inner.backend.get_mut(v) {
                b.unmasked = true;
            }
        }
        if inner.pending & (1u32 << v) != 0 {
            inner.pending &= !(1u32 << v);
            if let Err(e) = self.vectors.trigger(v) {
                log::warn!("MSI vector {v}: cannot deliver pending interrupt: {e}");
            }
        }
    }

    /// Raises `vector`: delivers it, or sets its pending bit when masked or not enabled.
    pub fn trigger(&self, vector: u8) -> Result<(), PciError> {
        let v = usize::from(vector);
        if vector >= self.count {
            return Err(PciError::InvalidVector {
                vector: u16::from(vector),
                count: u16::from(self.count),
            });
        }
        let mut inner = self.lock();
        if Self::masked(&inner.regs, self.count, v) {
            inner.pending |= 1u32 << v;
            return Ok(());
        }
        self.vectors.trigger(v)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmkit_device::testing::RecordingMsi;

    #[test]
    fn multiple_messages_and_masking() {
        let g = Arc::new(RecordingMsi::new(4));
        assert!(Msi::new(MsiConfig { vectors: 3 }, g.clone()).is_err());
        assert!(Msi::new(MsiConfig { vectors: 8 }, g.clone()).is_err());
        let m = Msi::new(MsiConfig { vectors: 4 }, g.clone()).unwrap();
        assert_eq!(m.mmc(), 2);
        m.trigger(1).unwrap();
        assert_eq!(m.pending_bits(), 0b10);
        // Enable with 2 vectors (MME = 1), vector 1 delivered from pending.
        m.update(MsiRegs {
            control: MSI_CTRL_ENABLE | (1 << 4),
            address: 0xfee0_0000,
            data: 0x43,
            mask: 0,
        });
        assert_eq!(g.delivered(1), 1);
        assert_eq!(g.message(1).unwrap().data, 0x43);
        assert_eq!(g.message(0).unwrap().data, 0x42);
        m.trigger(3).unwrap();
        assert_eq!(m.pending_bits(), 0b1000, "vector beyond MME pends");
        m.update(MsiRegs {
            control: MSI_CTRL_ENABLE | (1 << 4),
            address: 0xfee0_0000,
            data: 0x43,
            mask: 1,
        });
        assert_eq!(g.masked(0), Some(true));
        assert!(m.trigger(4).is_err());
    }
}
