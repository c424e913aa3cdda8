// SPDX-License-Identifier: Apache-2.0 OR MIT
//! DSDT: `\_S5_` and the `\_SB` scope with the configured devices, built with acpi_tables'
//! AML builders.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name,
    Package, ResourceTemplate, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{AcpiDevice, PciHostBridge, OEM_ID};
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

fn pci_host_bridge_aml(name: &str, b: &PciHostBridge) -> Result<Vec<u8>> {
    let invalid = |reason: String| Error::InvalidConfig {
        what: "PCI host bridge",
        reason,
    };
    if b.bus_end < b.bus_start {
        return Err(invalid(format!(
            "bus range {}..={} is empty",
            b.bus_start, b.bus_end
        )));
    }
    if b.ecam_base % (1 << 20) != 0 {
        return Err(invalid(format!(
            "ECAM base {:#x} is not 1 MiB aligned",
            b.ecam_base
        )));
    }
    let (m32_base, m32_size) = b.mmio32;
    if m32_size == 0
        || m32_base
            .checked_add(m32_size)
            .is_none_or(|end| end > FOUR_GIB)
    {
        return Err(invalid(format!(
            "32-bit window {m32_base:#x} + {m32_size:#x} must be non-empty and below 4 GiB"
        )));
    }
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let adr = Name::new("_ADR".into(), &aml::ZERO);
    let seg = Name::new("_SEG".into(), &u64::from(b.segment));
    let uid = Name::new("_UID".into(), &u64::from(b.segment));
    let bbn = Name::new("_BBN".into(), &u64::from(b.bus_start));
    let buses = AddressSpace::new_bus_number(u16::from(b.bus_start), u16::from(b.bus_end));
    let cfg_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let m32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m32_base as u32,
        (m32_base + m32_size - 1) as u32,
        None,
    );
    let m64 = match b.mmio64 {
        Some((base, size)) => {
            let end = base
                .checked_add(size)
                .filter(|_| size > 0)
                .ok_or_else(|| invalid(format!("64-bit window {base:#x} + {size:#x}")))?;
            Some(AddressSpace::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                base,
                end - 1,
                None,
            ))
        }
        None => None,
    };
    let io = match b.io {
        Some((base, size)) => {
            let end = base
                .checked_add(size.saturating_sub(1))
                .filter(|_| size > 0)
                .ok_or_else(|| invalid(format!("I/O window {base:#x} + {size:#x}")))?;
            Some(AddressSpace::new_io(base, end, None))
        }
        None => None,
    };
    let mut resources: Vec<&dyn Aml> = vec![&buses, &cfg_ports, &m32];
    if let Some(m64) = &m64 {
        resources.push(m64);
    }
    if let Some(io) = &io {
        resources.push(io);
    }
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(resources));
    let mut out = Vec::new();
    Device::new(name.into(), vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs]).to_aml_bytes(&mut out);
    Ok(out)
}

/// Builds the DSDT: `Name(_S5_, Package { s5, s5, 0, 0 })` and `Scope(\_SB)` holding the
/// devices. Serial ports are named `COM1`.. `COM9` (PNP0501), virtio-mmio devices `VR00`..
/// `VRFF` (LNRO0005, edge-triggered interrupt), PCI host bridges `PCI0`.. (PNP0A08 with
/// `_SEG`, `_BBN` and a `_CRS` of bus numbers, the configuration ports and the windows); raw
/// AML is appended as given.
pub fn build_dsdt(devices: &[AcpiDevice], s5_sleep_type: u8) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let s5 = s5_sleep_type;
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&s5, &s5, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);

    let mut sb = Vec::new();
    let (mut serials, mut virtios, mut pcis) = (0u32, 0u32, 0u32);
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
            AcpiDevice::PciHostBridge(b) => {
                if pcis >= 16 {
                    return Err(Error::InvalidConfig {
                        what: "ACPI PCI host bridges",
                        reason: "at most 16 host bridges (PCI0..PCIF) can be described".into(),
                    });
                }
                sb.extend(pci_host_bridge_aml(&format!("PCI{pcis:X}"), b)?);
                pcis += 1;
            }
            AcpiDevice::Aml(bytes) => sb.extend_from_slice(bytes),
        }
    }
    body.extend(aml::Scope::raw("\\_SB_".into(), sb));

    let mut sdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, *b"VMKITDSD", 1);
    sdt.append_slice(&body);
    Ok(sdt.as_slice().to_vec())
}
