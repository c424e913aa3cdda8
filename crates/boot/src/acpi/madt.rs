// SPDX-License-Identifier: Apache-2.0 OR MIT
//! MADT ("APIC") for an in-kernel PIC + IOAPIC machine, with x2APIC entries.
//!
//! acpi_tables 0.2.1 provides the table, the Processor Local APIC (type 0) and I/O APIC
//! (type 1) structures, but not the interrupt source override (type 2), local APIC NMI
//! (type 4), Processor Local x2APIC (type 9) or local x2APIC NMI (type 0xA). Those four are
//! defined here, small and tested, and plug into acpi_tables' `MADT::add_structure`.

use std::collections::HashSet;

use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::{Aml, AmlSink};
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::{fix_checksum, OEM_ID};
use crate::error::{Error, Result};
use crate::layout::LAPIC_ADDR;
use crate::mptable::{isa_irq_to_gsi, SCI_IRQ};

/// MADT flag: the system also has dual 8259 PICs (PCAT_COMPAT).
pub const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags: active high polarity.
pub const MPS_INTI_ACTIVE_HIGH: u16 = 0b01;
/// MPS INTI flags: level trigger mode.
pub const MPS_INTI_LEVEL: u16 = 0b11 << 2;
/// Largest APIC ID described by a Processor Local APIC (type 0) entry.
pub const XAPIC_MAX_ID: u32 = 254;
/// MADT revision written (ACPI 6.2+ layout; x2APIC structures need at least revision 3).
pub const MADT_REVISION: u8 = 5;

const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const TYPE_LOCAL_APIC_NMI: u8 = 4;
const TYPE_LOCAL_X2APIC: u8 = 9;
const TYPE_LOCAL_X2APIC_NMI: u8 = 0xa;
const LOCAL_APIC_ENABLED: u32 = 1;
/// Processor UID meaning "all processors" in a type-4 entry.
const ALL_XAPIC_UIDS: u8 = 0xff;
/// Processor UID meaning "all processors" in a type-0xA entry.
const ALL_X2APIC_UIDS: u32 = 0xffff_ffff;

macro_rules! aml_bytes {
    ($t:ty) => {
        impl Aml for $t {
            fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
                sink.vec(self.as_bytes());
            }
        }
    };
}

/// Interrupt Source Override (type 2, 10 bytes): ISA `source` IRQ delivered on `gsi`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
pub struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl InterruptSourceOverride {
    /// ISA (bus 0) IRQ `source` -> `gsi` with MPS INTI `flags`.
    pub fn new(source: u8, gsi: u32, flags: u16) -> Self {
        InterruptSourceOverride {
            r#type: TYPE_INTERRUPT_SOURCE_OVERRIDE,
            length: 10,
            bus: 0,
            source,
            gsi: gsi.into(),
            flags: flags.into(),
        }
    }
}
aml_bytes!(InterruptSourceOverride);

/// Local APIC NMI (type 4, 6 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
pub struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

impl LocalApicNmi {
    /// NMI on `lint` of processor `processor_uid` (0xff = all).
    pub fn new(processor_uid: u8, flags: u16, lint: u8) -> Self {
        LocalApicNmi {
            r#type: TYPE_LOCAL_APIC_NMI,
            length: 6,
            processor_uid,
            flags: flags.into(),
            lint,
        }
    }
}
aml_bytes!(LocalApicNmi);

/// Processor Local x2APIC (type 9, 16 bytes): reserved u16, x2APIC ID u32, flags u32,
/// ACPI processor UID u32.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
pub struct LocalX2Apic {
    r#type: u8,
    length: u8,
    reserved: U16,
    x2apic_id: U32,
    flags: U32,
    processor_uid: U32,
}

impl LocalX2Apic {
    /// An enabled processor with `x2apic_id` and ACPI `processor_uid`.
    pub fn new(x2apic_id: u32, processor_uid: u32) -> Self {
        LocalX2Apic {
            r#type: TYPE_LOCAL_X2APIC,
            length: 16,
            reserved: 0.into(),
            x2apic_id: x2apic_id.into(),
            flags: LOCAL_APIC_ENABLED.into(),
            processor_uid: processor_uid.into(),
        }
    }
}
aml_bytes!(LocalX2Apic);

/// Local x2APIC NMI (type 0xA, 12 bytes).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
pub struct LocalX2ApicNmi {
    r#type: u8,
    length: u8,
    flags: U16,
    processor_uid: U32,
    lint: u8,
    reserved: [u8; 3],
}

impl LocalX2ApicNmi {
    /// NMI on `lint` of processor `processor_uid` (0xffff_ffff = all).
    pub fn new(processor_uid: u32, flags: u16, lint: u8) -> Self {
        LocalX2ApicNmi {
            r#type: TYPE_LOCAL_X2APIC_NMI,
            length: 12,
            flags: flags.into(),
            processor_uid: processor_uid.into(),
            lint,
            reserved: [0; 3],
        }
    }
}
aml_bytes!(LocalX2ApicNmi);

/// Builds the MADT: type 0 entries for APIC IDs below 255, type 9 entries for the rest (the
/// ACPI processor UID is the position in `apic_ids`), the IOAPIC with GSI base 0, overrides
/// IRQ 0 -> GSI 2 and SCI IRQ 9 level/active-high, and LINT1 NMI entries (type 4 for all
/// xAPIC processors, type 0xA for all x2APIC processors when there are any).
pub fn build_madt(apic_ids: &[u32], ioapic_id: u8, ioapic_addr: u32) -> Result<Vec<u8>> {
    const TABLE: &str = "ACPI MADT";
    if apic_ids.is_empty() {
        return Err(Error::NoCpus { table: TABLE });
    }
    let mut seen = HashSet::with_capacity(apic_ids.len());
    let mut madt = MADT::new(
        OEM_ID,
        *b"VMKITAPI",
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    let mut any_x2apic = false;
    for (index, &id) in apic_ids.iter().enumerate() {
        if !seen.insert(id) {
            return Err(Error::DuplicateApicId(id));
        }
        if id <= XAPIC_MAX_ID {
            let uid = u8::try_from(index)
                .ok()
                .filter(|&u| u != ALL_XAPIC_UIDS)
                .ok_or(Error::InvalidApicId {
                    id,
                    reason: "an APIC ID below 255 must be among the first 255 entries of the CPU list (its ACPI processor UID is 8-bit)",
                })?;
            madt.add_structure(ProcessorLocalApic::new(
                uid,
                id as u8,
                EnabledStatus::Enabled,
            ));
        } else {
            if id == u32::MAX {
                return Err(Error::InvalidApicId {
                    id,
                    reason: "0xffffffff is the x2APIC broadcast ID",
                });
            }
            let uid = u32::try_from(index)
                .ok()
                .filter(|&u| u != ALL_X2APIC_UIDS)
                .ok_or(Error::TooManyCpus {
                    table: TABLE,
                    count: apic_ids.len(),
                    max: ALL_X2APIC_UIDS as usize,
                })?;
            madt.add_structure(LocalX2Apic::new(id, uid));
            any_x2apic = true;
        }
    }
    madt.add_structure(IoApic::new(ioapic_id, ioapic_addr, 0));
    madt.add_structure(InterruptSourceOverride::new(
        0,
        u32::from(isa_irq_to_gsi(0)),
        0,
    ));
    madt.add_structure(InterruptSourceOverride::new(
        SCI_IRQ,
        u32::from(isa_irq_to_gsi(SCI_IRQ)),
        MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL,
    ));
    madt.add_structure(LocalApicNmi::new(ALL_XAPIC_UIDS, 0, 1));
    if any_x2apic {
        madt.add_structure(LocalX2ApicNmi::new(ALL_X2APIC_UIDS, 0, 1));
    }

    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    // acpi_tables writes revision 1 and flags 0 and has no setter: set PCAT_COMPAT (we have
    // the in-kernel 8259 pair) and a revision that covers x2APIC structures.
    if let Some(rev) = bytes.get_mut(8) {
        *rev = MADT_REVISION;
    }
    if let Some(flags) = bytes.get_mut(40..44) {
        flags.copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    }
    fix_checksum(&mut bytes);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_have_spec_sizes_and_layout() {
        let x2 = LocalX2Apic::new(0x1234_5678, 300);
        assert_eq!(
            x2.as_bytes(),
            &[9, 16, 0, 0, 0x78, 0x56, 0x34, 0x12, 1, 0, 0, 0, 0x2c, 1, 0, 0]
        );
        let nmi = LocalX2ApicNmi::new(0xffff_ffff, 0, 1);
        assert_eq!(
            nmi.as_bytes(),
            &[0xa, 12, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]
        );
        let iso = InterruptSourceOverride::new(0, 2, 0);
        assert_eq!(iso.as_bytes(), &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        let lnmi = LocalApicNmi::new(0xff, 0, 1);
        assert_eq!(lnmi.as_bytes(), &[4, 6, 0xff, 0, 0, 1]);
    }
}
