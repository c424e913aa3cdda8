// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Saving and restoring the in-kernel PIC pair, IOAPIC and PIT.
//!
//! [`IrqChipState`] is a versioned, typed copy of what `KVM_GET_IRQCHIP` and `KVM_GET_PIT2`
//! report. The per-vCPU local APICs are not part of it (they belong to the vCPU state), nor
//! are the MSI routes: those belong to the devices' MSI groups, which are re-created and
//! re-configured by their transports when the devices are restored.
//!
//! Save while the VM is paused (no vCPU in `KVM_RUN`). Restore ([`KvmIrqChip::restore_state`]
//! or [`Restore::restore`]) after [`crate::setup_vm`] on the new VM and before its vCPUs run.

use std::sync::Arc;

use kvm_bindings::{
    kvm_irqchip, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmkit_migration::{MigrationError, Restore, Snapshot, VersionedState};

use crate::error::{kvm_op, IrqError};
use crate::routing::IOAPIC_PINS;
use crate::setup::IrqChipInfo;
use crate::KvmIrqChip;

/// State of one 8259 PIC (the fields of `kvm_pic_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// IRR as of the last edge detection (edge-triggered inputs).
    pub last_irr: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// Rotation offset of the priority order.
    pub priority_add: u8,
    /// Vector of input 0 (set by ICW2).
    pub irq_base: u8,
    /// Whether OCW3 selected the ISR (1) or IRR (0) for reads.
    pub read_reg_select: u8,
    /// Poll command pending.
    pub poll: u8,
    /// Special mask mode.
    pub special_mask: u8,
    /// Position in the ICW initialisation sequence.
    pub init_state: u8,
    /// Automatic end-of-interrupt mode.
    pub auto_eoi: u8,
    /// Rotate priorities on automatic EOI.
    pub rotate_on_auto_eoi: u8,
    /// Special fully nested mode.
    pub special_fully_nested_mode: u8,
    /// Whether ICW4 is expected.
    pub init4: u8,
    /// Edge/level control register (1 = level).
    pub elcr: u8,
    /// Which ELCR bits are writable.
    pub elcr_mask: u8,
}

impl From<&kvm_pic_state> for PicState {
    fn from(s: &kvm_pic_state) -> Self {
        PicState {
            last_irr: s.last_irr,
            irr: s.irr,
            imr: s.imr,
            isr: s.isr,
            priority_add: s.priority_add,
            irq_base: s.irq_base,
            read_reg_select: s.read_reg_select,
            poll: s.poll,
            special_mask: s.special_mask,
            init_state: s.init_state,
            auto_eoi: s.auto_eoi,
            rotate_on_auto_eoi: s.rotate_on_auto_eoi,
            special_fully_nested_mode: s.special_fully_nested_mode,
            init4: s.init4,
            elcr: s.elcr,
            elcr_mask: s.elcr_mask,
        }
    }
}

impl From<&PicState> for kvm_pic_state {
    fn from(s: &PicState) -> Self {
        kvm_pic_state {
            last_irr: s.last_irr,
            irr: s.irr,
            imr: s.imr,
            isr: s.isr,
            priority_add: s.priority_add,
            irq_base: s.irq_base,
            read_reg_select: s.read_reg_select,
            poll: s.poll,
            special_mask: s.special_mask,
            init_state: s.init_state,
            auto_eoi: s.auto_eoi,
            rotate_on_auto_eoi: s.rotate_on_auto_eoi,
            special_fully_nested_mode: s.special_fully_nested_mode,
            init4: s.init4,
            elcr: s.elcr,
            elcr_mask: s.elcr_mask,
        }
    }
}

/// State of the IOAPIC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// MMIO base address.
    pub base_address: u64,
    /// The register-select register.
    pub ioregsel: u32,
    /// IOAPIC ID register.
    pub id: u32,
    /// Interrupt request register (one bit per pin).
    pub irr: u32,
    /// The 24 redirection table entries, as 64-bit values.
    pub redirection: Vec<u64>,
}

/// State of one PIT channel (the fields of `kvm_pit_channel_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelState {
    /// Reload value.
    pub count: u32,
    /// Count latched by a latch command.
    pub latched_count: u16,
    /// Latch state of the count.
    pub count_latched: u8,
    /// Whether the status byte is latched.
    pub status_latched: u8,
    /// The latched status byte.
    pub status: u8,
    /// Byte sequence state of reads.
    pub read_state: u8,
    /// Byte sequence state of writes.
    pub write_state: u8,
    /// First byte of a two-byte write.
    pub write_latch: u8,
    /// Access mode (LSB, MSB, LSB then MSB).
    pub rw_mode: u8,
    /// Counter mode (0–5).
    pub mode: u8,
    /// BCD counting.
    pub bcd: u8,
    /// Gate input level.
    pub gate: u8,
    /// Host time of the last count load; KVM recomputes it on restore.
    pub count_load_time: i64,
}

impl From<&kvm_pit_channel_state> for PitChannelState {
    fn from(c: &kvm_pit_channel_state) -> Self {
        PitChannelState {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        }
    }
}

impl From<&PitChannelState> for kvm_pit_channel_state {
    fn from(c: &PitChannelState) -> Self {
        kvm_pit_channel_state {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        }
    }
}

/// State of the in-kernel PIT.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// The three channels.
    pub channels: Vec<PitChannelState>,
    /// `kvm_pit_state2::flags` (e.g. `KVM_PIT_FLAGS_HPET_LEGACY`).
    pub flags: u32,
}

/// Saved state of the in-kernel interrupt controllers; see the [module docs](self).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqChipState {
    /// The master PIC.
    pub pic_master: PicState,
    /// The slave PIC.
    pub pic_slave: PicState,
    /// The IOAPIC.
    pub ioapic: IoapicState,
    /// The PIT, if the VM has one.
    pub pit: Option<PitState>,
}

impl VersionedState for IrqChipState {
    const NAME: &'static str = "vmkit-irq/kvm-irqchip";
    const VERSION: u16 = 1;
}

impl IrqChipState {
    /// Checks the shape of a decoded state (24 redirection entries, 3 PIT channels) and
    /// that it has a PIT exactly when `info` says the VM has one.
    pub fn validate(&self, info: &IrqChipInfo) -> Result<(), IrqError> {
        if self.ioapic.redirection.len() != IOAPIC_PINS as usize {
            return Err(IrqError::InvalidState(format!(
                "IOAPIC state has {} redirection entries, expected {IOAPIC_PINS}",
                self.ioapic.redirection.len()
            )));
        }
        match (&self.pit, info.pit) {
            (Some(pit), true) if pit.channels.len() != 3 => Err(IrqError::InvalidState(format!(
                "PIT state has {} channels, expected 3",
                pit.channels.len()
            ))),
            (Some(_), false) => Err(IrqError::InvalidState(
                "state has a PIT but the VM was set up without one".into(),
            )),
            (None, true) => Err(IrqError::InvalidState(
                "state has no PIT but the VM was set up with one".into(),
            )),
            _ => Ok(()),
        }
    }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, IrqError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_op("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl KvmIrqChip {
    /// Reads the PIC, IOAPIC and (if present) PIT state from KVM. Pause the vCPUs first.
    pub fn save_state(&self) -> Result<IrqChipState, IrqError> {
        let vm = self.vm();
        let master = get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?;
        let slave = get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?;
        let ioapic = get_chip(vm, KVM_IRQCHIP_IOAPIC)?;
        // SAFETY: KVM_GET_IRQCHIP fills the member named by chip_id (`pic` for the PICs,
        // `ioapic` for the IOAPIC); both are plain integers, valid for any bit pattern.
        let (master, slave, ioapic) =
            unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
        let pit = if self.info().pit {
            let pit = vm.get_pit2().map_err(kvm_op("KVM_GET_PIT2"))?;
            Some(PitState {
                channels: pit.channels.iter().map(PitChannelState::from).collect(),
                flags: pit.flags,
            })
        } else {
            None
        };
        Ok(IrqChipState {
            pic_master: PicState::from(&master),
            pic_slave: PicState::from(&slave),
            ioapic: IoapicState {
                base_address: ioapic.base_address,
                ioregsel: ioapic.ioregsel,
                id: ioapic.id,
                irr: ioapic.irr,
                // SAFETY: `bits` spans the whole 8-byte entry; any value is a valid u64.
                redirection: ioapic.redirtbl.iter().map(|e| unsafe { e.bits }).collect(),
            },
            pit,
        })
    }

    /// Writes a saved state back into KVM (after [`IrqChipState::validate`]). Call before
    /// the vCPUs run.
    pub fn restore_state(&self, state: &IrqChipState) -> Result<(), IrqError> {
        state.validate(&self.info())?;
        let vm = self.vm();
        for (chip_id, pic) in [
            (KVM_IRQCHIP_PIC_MASTER, &state.pic_master),
            (KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave),
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            chip.chip.pic = kvm_pic_state::from(pic);
            vm.set_irqchip(&chip)
                .map_err(kvm_op("KVM_SET_IRQCHIP(PIC)"))?;
        }
        let mut chip = get_chip(vm, KVM_IRQCHIP_IOAPIC)?;
        // SAFETY: the `ioapic` member is the one KVM filled for this chip_id; it is plain
        // data, and assigning its fields keeps it valid.
        let ioapic = unsafe { &mut chip.chip.ioapic };
        ioapic.base_address = state.ioapic.base_address;
        ioapic.ioregsel = state.ioapic.ioregsel;
        ioapic.id = state.ioapic.id;
        ioapic.irr = state.ioapic.irr;
        for (slot, &bits) in ioapic.redirtbl.iter_mut().zip(&state.ioapic.redirection) {
            slot.bits = bits;
        }
        vm.set_irqchip(&chip)
            .map_err(kvm_op("KVM_SET_IRQCHIP(IOAPIC)"))?;
        if let Some(pit) = &state.pit {
            let mut kvm_pit = kvm_pit_state2 {
                flags: pit.flags,
                ..Default::default()
            };
            for (slot, c) in kvm_pit.channels.iter_mut().zip(&pit.channels) {
                *slot = kvm_pit_channel_state::from(c);
            }
            vm.set_pit2(&kvm_pit).map_err(kvm_op("KVM_SET_PIT2"))?;
        }
        Ok(())
    }
}

fn component_error(e: IrqError) -> MigrationError {
    MigrationError::Component {
        component: IrqChipState::NAME.to_string(),
        source: Box::new(e),
    }
}

impl Snapshot for KvmIrqChip {
    type State = IrqChipState;

    fn save(&self) -> Result<IrqChipState, MigrationError> {
        self.save_state().map_err(component_error)
    }
}

impl Restore for KvmIrqChip {
    /// The new VM (already through [`crate::setup_vm`], no vCPU running) and what the set-up
    /// returned.
    type Args = (Arc<VmFd>, IrqChipInfo);

    fn restore(args: Self::Args, state: &IrqChipState) -> Result<Self, MigrationError> {
        let (vm, info) = args;
        state
            .validate(&info)
            .map_err(|e| MigrationError::InvalidState {
                name: IrqChipState::NAME,
                reason: e.to_string(),
            })?;
        let chip = KvmIrqChip::new(vm, info).map_err(component_error)?;
        chip.restore_state(state).map_err(component_error)?;
        Ok(chip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> IrqChipState {
        IrqChipState {
            pic_master: PicState {
                imr: 0xfb,
                irq_base: 0x20,
                elcr_mask: 0xf8,
                ..Default::default()
            },
            pic_slave: PicState {
                irq_base: 0x28,
                ..Default::default()
            },
            ioapic: IoapicState {
                base_address: 0xfec0_0000,
                redirection: (0..24).map(|i| 0x1_0000 | (0x30 + i)).collect(),
                ..Default::default()
            },
            pit: Some(PitState {
                channels: vec![PitChannelState::default(); 3],
                flags: 0,
            }),
        }
    }

    #[test]
    fn pic_and_pit_conversions_round_trip() {
        let pic = PicState {
            last_irr: 1,
            irr: 2,
            imr: 3,
            isr: 4,
            priority_add: 5,
            irq_base: 6,
            read_reg_select: 7,
            poll: 8,
            special_mask: 9,
            init_state: 10,
            auto_eoi: 11,
            rotate_on_auto_eoi: 12,
            special_fully_nested_mode: 13,
            init4: 14,
            elcr: 15,
            elcr_mask: 16,
        };
        assert_eq!(PicState::from(&kvm_pic_state::from(&pic)), pic);
        let ch = PitChannelState {
            count: 0x1234,
            latched_count: 2,
            count_latched: 3,
            status_latched: 4,
            status: 5,
            read_state: 6,
            write_state: 7,
            write_latch: 8,
            rw_mode: 9,
            mode: 10,
            bcd: 11,
            gate: 12,
            count_load_time: -13,
        };
        assert_eq!(PitChannelState::from(&kvm_pit_channel_state::from(&ch)), ch);
    }

    #[test]
    fn state_encodes_and_decodes() {
        let s = sample();
        let bytes = vmkit_migration::encode(&s).unwrap();
        let back: IrqChipState = vmkit_migration::decode(&bytes).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn validation_names_the_problem() {
        let with_pit = IrqChipInfo {
            x2apic_api: true,
            pit: true,
        };
        let without_pit = IrqChipInfo {
            x2apic_api: true,
            pit: false,
        };
        assert!(sample().validate(&with_pit).is_ok());
        let err = sample().validate(&without_pit).unwrap_err();
        assert!(err.to_string().contains("without one"), "{err}");
        let mut s = sample();
        s.ioapic.redirection.pop();
        assert!(s
            .validate(&with_pit)
            .unwrap_err()
            .to_string()
            .contains("23 redirection entries"));
        let mut s = sample();
        s.pit = Some(PitState {
            channels: vec![],
            flags: 0,
        });
        assert!(s
            .validate(&with_pit)
            .unwrap_err()
            .to_string()
            .contains("0 channels"));
        let mut s = sample();
        s.pit = None;
        assert!(s.validate(&with_pit).is_err());
        assert!(s.validate(&without_pit).is_ok());
    }
}
