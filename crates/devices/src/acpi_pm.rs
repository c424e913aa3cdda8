// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ACPI fixed-hardware power management: the PM1a event and control blocks.
//!
//! Enough for a guest to power off (S5) and to see the machine in ACPI mode: `PM1_STS`
//! (write-1-to-clear), `PM1_EN`, and `PM1_CNT` with `SCI_EN` set (the FADT has no SMI command
//! port, so the machine starts in ACPI mode). Writing `PM1_CNT` with `SLP_EN` and a sleep type
//! equal to the S5 type from the DSDT's `\_S5_` package calls the power-off callback. Other
//! sleep states are not supported and are ignored (the guest stays running).
//!
//! Layout relative to the device's base (`PM1A_EVT_BLK`, 4 ports; `PM1A_CNT_BLK` follows at
//! base + 4, 2 ports — matching `vmkit-boot`'s FADT defaults of 0x600 and 0x604):
//!
//! | offset | register |
//! | --- | --- |
//! | 0..2 | `PM1_STS` |
//! | 2..4 | `PM1_EN` |
//! | 4..6 | `PM1_CNT` |

use std::sync::{Mutex, PoisonError};

use vmkit_device::{BusDevice, BusRange};

use crate::pio_range;

/// Default base port (the PM1a event block in vmkit-boot's FADT).
pub const ACPI_PM_BASE: u16 = 0x600;
/// Ports covered: the 4-port event block and the 2-port control block.
pub const ACPI_PM_LEN: u16 = 6;
/// `PM1_CNT.SCI_EN`.
pub const SCI_EN: u16 = 1 << 0;
/// `PM1_CNT.SLP_EN`.
pub const SLP_EN: u16 = 1 << 13;
/// Sleep type used for S5 in vmkit-boot's DSDT.
pub const S5_SLEEP_TYPE: u8 = 5;

#[derive(Debug, Default)]
struct Regs {
    status: u16,
    enable: u16,
    control: u16,
}

/// The PM1a event/control register blocks with an S5 power-off callback.
pub struct AcpiPm {
    base: u16,
    s5_type: u8,
    regs: Mutex<Regs>,
    power_off: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPm")
            .field("base", &self.base)
            .field("s5_type", &self.s5_type)
            .finish_non_exhaustive()
    }
}

impl AcpiPm {
    /// A PM block at [`ACPI_PM_BASE`] whose S5 request calls `power_off`.
    ///
    /// The callback runs on the vCPU thread that wrote the register: it should only signal
    /// the VMM (e.g. request a stop), not tear the machine down itself.
    pub fn new(power_off: impl Fn() + Send + Sync + 'static) -> Self {
        Self::with_base(ACPI_PM_BASE, S5_SLEEP_TYPE, power_off)
    }

    /// A PM block at `base` where sleep type `s5_type` means power off.
    pub fn with_base(base: u16, s5_type: u8, power_off: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            base,
            s5_type,
            regs: Mutex::new(Regs {
                control: SCI_EN,
                ..Regs::default()
            }),
            power_off: Box::new(power_off),
        }
    }

    /// The ports this device occupies.
    pub fn range(&self) -> BusRange {
        pio_range(self.base, ACPI_PM_LEN)
    }

    fn reg_byte(regs: &Regs, offset: u64) -> u8 {
        let (word, shift) = match offset {
            0 | 1 => (regs.status, offset * 8),
            2 | 3 => (regs.enable, (offset - 2) * 8),
            4 | 5 => (regs.control, (offset - 4) * 8),
            _ => return 0,
        };
        (word >> shift) as u8
    }
}

impl BusDevice for AcpiPm {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        let regs = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .map_or(0, |o| Self::reg_byte(&regs, o));
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        let mut power_off = false;
        {
            let mut regs = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
            for (i, &b) in data.iter().enumerate() {
                let Some(o) = offset.checked_add(i as u64) else {
                    break;
                };
                let (reg, shift) = match o {
                    0 | 1 => {
                        // Write one to clear.
                        regs.status &= !(u16::from(b) << ((o % 2) * 8));
                        continue;
                    }
                    2 | 3 => (&mut regs.enable, (o - 2) * 8),
                    4 | 5 => (&mut regs.control, (o - 4) * 8),
                    _ => continue,
                };
                *reg = (*reg & !(0xff << shift)) | (u16::from(b) << shift);
            }
            // SCI_EN stays set: there is no legacy (SMM) mode to return to.
            regs.control |= SCI_EN;
            if regs.control & SLP_EN != 0 {
                let typ = ((regs.control >> 10) & 0x7) as u8;
                power_off = typ == self.s5_type;
                // SLP_EN is write-only and reads as zero.
                regs.control &= !SLP_EN;
            }
        }
        if power_off {
            (self.power_off)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn pm() -> (AcpiPm, Arc<AtomicU32>) {
        let n = Arc::new(AtomicU32::new(0));
        let c = n.clone();
        (
            AcpiPm::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
            n,
        )
    }

    #[test]
    fn s5_with_word_write_powers_off() {
        let (pm, n) = pm();
        let v = SLP_EN | (u16::from(S5_SLEEP_TYPE) << 10);
        pm.write(0x600, 4, &v.to_le_bytes());
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let mut r = [0u8; 2];
        pm.read(0x600, 4, &mut r);
        assert_eq!(u16::from_le_bytes(r) & SLP_EN, 0, "SLP_EN reads as zero");
        assert_eq!(u16::from_le_bytes(r) & SCI_EN, SCI_EN);
    }

    #[test]
    fn other_sleep_types_and_registers_do_not_power_off() {
        let (pm, n) = pm();
        for typ in [0u16, 1, 3, 7] {
            pm.write(0x600, 4, &(SLP_EN | (typ << 10)).to_le_bytes());
        }
        pm.write(0x600, 4, &((u16::from(S5_SLEEP_TYPE)) << 10).to_le_bytes());
        for off in 0..8 {
            pm.write(0x600, off, &[0xff]);
        }
        // A byte write of the high half with SLP_EN and S5 does power off.
        assert_eq!(n.load(Ordering::SeqCst), 0);
        pm.write(0x600, 5, &[((SLP_EN | (5 << 10)) >> 8) as u8]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn status_is_write_one_to_clear_and_enable_holds() {
        let (pm, _) = pm();
        pm.regs.lock().unwrap().status = 0x8001;
        pm.write(0x600, 0, &[0x01, 0x00]);
        let mut r = [0u8; 4];
        pm.read(0x600, 0, &mut r);
        assert_eq!(u16::from_le_bytes([r[0], r[1]]), 0x8000);
        pm.write(0x600, 2, &[0x20, 0x01]);
        pm.read(0x600, 0, &mut r);
        assert_eq!(u16::from_le_bytes([r[2], r[3]]), 0x0120);
        let mut odd = [0xaau8; 16];
        pm.read(0x600, u64::MAX - 3, &mut odd);
        assert!(odd.iter().all(|&b| b == 0));
    }
}
