// SPDX-License-Identifier: Apache-2.0 OR MIT
//! DSDT: `\_S5_` and the `\_SB` scope with the configured devices, built with acpi_tables'
//! AML builders.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{AcpiDevice, OEM_ID};
use crate::error::{Error, Result};
use crate::layout::FOUR_GIB;

/// DSDT revision (2: 64-bit AML integers).
pub const DSDT_REVISION: u8 = 2;

fn serial_aml(name: &str, uid: u32, port: u16, irq: u8) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &uid);
    let io = IO::new(port, port, 0, 8);
    let int = Interrupt::new(true, true, false, false, u32::from(irq));
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &int]));
    let mut out = Vec::new();
    Device::new(name.into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut out);
    out
}

fn virtio_mmio_aml(name: &str, uid: u32, base: u32, size: u32, gsi: u32) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &"LNRO0005");
    let uid = Name::new("_UID".into(), &uid);
    let cca = Name::new("_CCA".into(), &aml::ONE);
    let mem = Memory32Fixed::new(true, base, size);
    let int = Interrupt::new(true, true, false, false, gsi);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &int]));
    let mut out = Vec::new();
    Device::new(name.into(), vec![&hid, &uid, &cca, &crs]).to_aml_bytes(&mut out);
    out
}

/// Builds the DSDT: `Name(_S5_, Package { s5, s5, 0, 0 })` and `Scope(\_SB)` holding the
/// devices. Serial ports are named `COM1`.. `COM9` (PNP0501), virtio-mmio devices `VR00`..
/// `VRFF` (LNRO0005, edge-triggered interrupt); raw AML is appended as given.
pub fn build_dsdt(devices: &[AcpiDevice], s5_sleep_type: u8) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let s5 = s5_sleep_type;
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&s5, &s5, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);

    let mut sb = Vec::new();
    let (mut serials, mut virtios) = (0u32, 0u32);
    for dev in devices {
        match dev {
            AcpiDevice::Serial { port, irq } => {
                if serials >= 9 {
                    return Err(Error::InvalidConfig {
                        what: "ACPI serial devices",
                        reason: "at most 9 serial ports (COM1..COM9) can be described".into(),
                    });
                }
                let name = format!("COM{}", serials + 1);
                sb.extend(serial_aml(&name, serials, *port, *irq));
                serials += 1;
            }
            AcpiDevice::VirtioMmio { base, size, gsi } => {
                if virtios >= 256 {
                    return Err(Error::InvalidConfig {
                        what: "ACPI virtio-mmio devices",
                        reason: "at most 256 virtio-mmio devices (VR00..VRFF) can be described"
                            .into(),
                    });
                }
                let fits = base.checked_add(*size).is_some_and(|end| end <= FOUR_GIB);
                if *size == 0 || !fits {
                    return Err(Error::InvalidConfig {
                        what: "virtio-mmio device window",
                        reason: format!("{base:#x} + {size:#x} must be non-empty and below 4 GiB"),
                    });
                }
                let name = format!("VR{virtios:02X}");
                sb.extend(virtio_mmio_aml(
                    &name,
                    virtios,
                    *base as u32,
                    *size as u32,
                    *gsi,
                ));
                virtios += 1;
            }
            AcpiDevice::Aml(bytes) => sb.extend_from_slice(bytes),
        }
    }
    body.extend(aml::Scope::raw("\\_SB_".into(), sb));

    let mut sdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, *b"VMKITDSD", 1);
    sdt.append_slice(&body);
    Ok(sdt.as_slice().to_vec())
}
