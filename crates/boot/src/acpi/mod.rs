// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ACPI tables: RSDP (v2) at [`RSDP_START`], XSDT, FADT (full hardware, not
//! hardware-reduced: the machine has the in-kernel PIC/IOAPIC/PIT), FACS, DSDT, MADT and any
//! tables the caller appends (e.g. an MCFG), all in `0xe0000..0x100000`.
//!
//! Built with acpi_tables 0.2.1; see [`madt`] for the MADT structures that crate lacks.

pub mod dsdt;
pub mod madt;

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::GuestMemoryBackend;

use crate::error::{Error, Result};
use crate::guest::write_bytes;
use crate::layout::{ACPI_END, IOAPIC_ADDR, RSDP_START};
use crate::mptable::SCI_IRQ;

pub use dsdt::build_dsdt;
pub use madt::build_madt;

/// OEM ID written in every table.
pub const OEM_ID: [u8; 6] = *b"VMKIT ";

/// Default PM1a event block I/O port (4 bytes: status, enable).
pub const PM1A_EVT_BLK_DEFAULT: u16 = 0x600;
/// Default PM1a control block I/O port (2 bytes).
pub const PM1A_CNT_BLK_DEFAULT: u16 = 0x604;
/// Default `\_S5_` sleep type: the guest powers off by writing
/// `(SLP_TYP << 10) | SLP_EN (1 << 13)` to PM1a_CNT.
pub const S5_SLEEP_TYPE_DEFAULT: u8 = 5;

/// IA-PC boot architecture flag: legacy (ISA) devices present.
pub const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
/// IA-PC boot architecture flag: an 8042 keyboard controller is present.
pub const IAPC_8042: u16 = 1 << 1;
/// IA-PC boot architecture flag: VGA is not present.
pub const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IA-PC boot architecture flag: MSI must not be enabled.
pub const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// IA-PC boot architecture flag: CMOS RTC not present.
pub const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Fixed ACPI hardware registers (I/O ports) described in the FADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmRegisters {
    /// PM1a event block (4 bytes).
    pub pm1a_evt: u16,
    /// PM1a control block (2 bytes).
    pub pm1a_cnt: u16,
    /// PM timer block (4 bytes, 32-bit counter at 3.579545 MHz), if the machine has one.
    pub pm_tmr: Option<u16>,
    /// GPE0 block (port, length in bytes; the length must be even).
    pub gpe0: Option<(u16, u8)>,
    /// Reset register (port, value to write).
    pub reset: Option<(u16, u8)>,
}

impl Default for PmRegisters {
    fn default() -> Self {
        PmRegisters {
            pm1a_evt: PM1A_EVT_BLK_DEFAULT,
            pm1a_cnt: PM1A_CNT_BLK_DEFAULT,
            pm_tmr: None,
            gpe0: None,
            reset: None,
        }
    }
}

/// A device described in the DSDT's `\_SB` scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcpiDevice {
    /// 16550 UART (PNP0501) at `port` (8 ports) with ISA `irq`.
    Serial {
        /// I/O base.
        port: u16,
        /// ISA IRQ.
        irq: u8,
    },
    /// virtio-mmio device (LNRO0005): MMIO window below 4 GiB and its GSI.
    VirtioMmio {
        /// MMIO base.
        base: u64,
        /// MMIO window size.
        size: u64,
        /// Interrupt (GSI), edge triggered, active high.
        gsi: u32,
    },
    /// A PCI Express host bridge (PNP0A08) with ECAM: described in the DSDT as `PCIn` with
    /// its bus range and windows, and its ECAM region listed in the MCFG table.
    PciHostBridge(PciHostBridge),
    /// Raw AML appended to `\_SB`.
    Aml(Vec<u8>),
}

/// A PCI segment as firmware describes it: where its ECAM is, which buses it decodes and
/// which address windows it forwards to devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHostBridge {
    /// PCI segment group number.
    pub segment: u16,
    /// First bus number decoded.
    pub bus_start: u8,
    /// Last bus number decoded.
    pub bus_end: u8,
    /// Guest-physical base of the ECAM region (bus `bus_start`, device 0, function 0 at
    /// this address; 1 MiB per bus).
    pub ecam_base: u64,
    /// 32-bit memory window for BARs (base, size), below 4 GiB.
    pub mmio32: (u64, u64),
    /// 64-bit memory window for BARs (base, size), if any.
    pub mmio64: Option<(u64, u64)>,
    /// I/O port window for I/O BARs (base, size), if any. The configuration ports
    /// 0xCF8..0xCFF are always claimed.
    pub io: Option<(u16, u16)>,
}

impl PciHostBridge {
    /// Bytes of ECAM this bridge needs (1 MiB per bus; 0 for an empty bus range).
    pub fn ecam_size(&self) -> u64 {
        (u64::from(self.bus_end) + 1).saturating_sub(u64::from(self.bus_start)) << 20
    }
}

/// COM1: 0x3f8, IRQ 4.
pub const COM1: AcpiDevice = AcpiDevice::Serial {
    port: 0x3f8,
    irq: 4,
};

/// What to put in the ACPI tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// APIC IDs of the CPUs, bootstrap processor first. Position = ACPI processor UID.
    pub apic_ids: Vec<u32>,
    /// IOAPIC ID.
    pub ioapic_id: u8,
    /// IOAPIC MMIO address.
    pub ioapic_addr: u32,
    /// Fixed hardware registers.
    pub pm: PmRegisters,
    /// Value of `\_S5_`'s SLP_TYP.
    pub s5_sleep_type: u8,
    /// FADT `IAPC_BOOT_ARCH` flags.
    pub iapc_boot_arch: u16,
    /// DSDT devices.
    pub devices: Vec<AcpiDevice>,
    /// Complete extra tables (header, correct length and checksum) to list in the XSDT.
    pub extra_tables: Vec<Vec<u8>>,
}

impl AcpiConfig {
    /// Defaults: IOAPIC at 0xfec00000, PM1a registers at 0x600/0x604, no PM timer, S5 type 5,
    /// legacy devices without VGA, and COM1 in the DSDT.
    pub fn new(apic_ids: Vec<u32>, ioapic_id: u8) -> Self {
        AcpiConfig {
            apic_ids,
            ioapic_id,
            ioapic_addr: IOAPIC_ADDR,
            pm: PmRegisters::default(),
            s5_sleep_type: S5_SLEEP_TYPE_DEFAULT,
            iapc_boot_arch: IAPC_LEGACY_DEVICES | IAPC_VGA_NOT_PRESENT,
            devices: vec![COM1],
            extra_tables: Vec::new(),
        }
    }

    /// Lays out and builds all tables (pure; nothing is written).
    pub fn build(&self) -> Result<AcpiTables> {
        build_acpi_tables(self)
    }
}

/// One table at its guest address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// Signature ("RSD PTR " is shortened to "RSD ").
    pub signature: [u8; 4],
    /// Guest-physical address.
    pub addr: u64,
    /// Table bytes.
    pub bytes: Vec<u8>,
}

/// The built table set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// RSDP address (for `boot_params.acpi_rsdp_addr` / `hvm_start_info.rsdp_paddr`).
    pub rsdp_addr: u64,
    /// Every table including the RSDP, in address order.
    pub tables: Vec<AcpiTable>,
}

impl AcpiTables {
    /// The table with `signature`, if present.
    pub fn get(&self, signature: &[u8; 4]) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| &t.signature == signature)
    }

    /// Writes every table to guest memory.
    pub fn write<M: GuestMemoryBackend>(&self, mem: &M) -> Result<()> {
        for t in &self.tables {
            write_bytes(mem, "ACPI table", t.addr, &t.bytes)?;
        }
        Ok(())
    }
}

/// Builds the tables for `cfg` and writes them; returns the table set (RSDP address included).
pub fn write_acpi_tables<M: GuestMemoryBackend>(mem: &M, cfg: &AcpiConfig) -> Result<AcpiTables> {
    let tables = build_acpi_tables(cfg)?;
    tables.write(mem)?;
    Ok(tables)
}

/// Sets byte 9 of an ACPI table so that all bytes sum to zero.
pub(crate) fn fix_checksum(table: &mut [u8]) {
    if table.len() > 9 {
        table[9] = 0;
        let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        table[9] = 0u8.wrapping_sub(sum);
    }
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u16, len_bytes: u8) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        len_bytes.saturating_mul(8),
        0,
        AccessSize::Undefined,
        u64::from(port),
    )
}

/// Builds the FADT pointing at `dsdt` and `facs`.
pub fn build_fadt(cfg: &AcpiConfig, dsdt: u64, facs: u64) -> Result<Vec<u8>> {
    let pm = &cfg.pm;
    let mut f = FADTBuilder::new(OEM_ID, *b"VMKITFAC", 1)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::RtcS4)
        .flag(Flags::UsePlatformClock);
    // Both the 32-bit and the 64-bit pointers: every table lives below 1 MiB.
    f.dsdt = (dsdt as u32).into();
    f.x_dsdt = dsdt.into();
    f.firmware_ctrl = (facs as u32).into();
    f.x_firmware_ctrl = facs.into();
    f.sci_int = u16::from(SCI_IRQ).into();
    // SMI_CMD = 0: the platform is always in ACPI mode.
    f.pm1a_evt_blk = u32::from(pm.pm1a_evt).into();
    f.pm1_evt_len = 4;
    f.x_pm1a_evt_blk = io_gas(pm.pm1a_evt, 4);
    f.pm1a_cnt_blk = u32::from(pm.pm1a_cnt).into();
    f.pm1_cnt_len = 2;
    f.x_pm1a_cnt_blk = io_gas(pm.pm1a_cnt, 2);
    if let Some(port) = pm.pm_tmr {
        f.pm_tmr_blk = u32::from(port).into();
        f.pm_tmr_len = 4;
        f.x_pm_tmr_blk = io_gas(port, 4);
        f = f.flag(Flags::TmrValExt);
    }
    if let Some((port, len)) = pm.gpe0 {
        if len == 0 || len % 2 != 0 {
            return Err(Error::InvalidConfig {
                what: "GPE0 block",
                reason: format!("length {len} must be even and non-zero"),
            });
        }
        f.gpe0_blk = u32::from(port).into();
        f.gpe0_blk_len = len;
        f.x_gpe0_blk = io_gas(port, len);
    }
    if let Some((port, value)) = pm.reset {
        f.reset_reg = GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        );
        f.reset_value = value;
        f = f.flag(Flags::ResetRegSup);
    }
    f.iapc_boot_arch = cfg.iapc_boot_arch.into();
    Ok(aml_bytes(&f.finalize()))
}

const RESERVED_SIGNATURES: [&[u8; 4]; 7] = [
    b"FACP", b"APIC", b"DSDT", b"FACS", b"XSDT", b"RSDT", b"MCFG",
];

fn validate_extra(index: usize, t: &[u8]) -> Result<()> {
    let invalid = |reason: String| Error::InvalidAcpiTable { index, reason };
    if t.len() < 36 {
        return Err(invalid(format!(
            "{} bytes is shorter than a table header",
            t.len()
        )));
    }
    let declared = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize;
    if declared != t.len() {
        return Err(invalid(format!(
            "header length {declared} does not match the {} bytes given",
            t.len()
        )));
    }
    let sig = [t[0], t[1], t[2], t[3]];
    if RESERVED_SIGNATURES.contains(&&sig) {
        return Err(invalid(format!(
            "signature {} is built by vmkit-boot itself",
            String::from_utf8_lossy(&sig)
        )));
    }
    if t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) != 0 {
        return Err(invalid("checksum does not add up to zero".into()));
    }
    Ok(())
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// The MCFG table listing the ECAM region of every [`AcpiDevice::PciHostBridge`], or `None`
/// without PCI.
fn build_mcfg(devices: &[AcpiDevice]) -> Option<Vec<u8>> {
    let bridges: Vec<&PciHostBridge> = devices
        .iter()
        .filter_map(|d| match d {
            AcpiDevice::PciHostBridge(b) => Some(b),
            _ => None,
        })
        .collect();
    if bridges.is_empty() {
        return None;
    }
    let mut mcfg = acpi_tables::mcfg::MCFG::new(OEM_ID, *b"VMKITMCF", 1);
    for b in bridges {
        mcfg.add_ecam(b.ecam_base, b.segment, b.bus_start, b.bus_end);
    }
    Some(aml_bytes(&mcfg))
}

/// Lays out and builds all tables for `cfg` (pure).
pub fn build_acpi_tables(cfg: &AcpiConfig) -> Result<AcpiTables> {
    for (i, t) in cfg.extra_tables.iter().enumerate() {
        validate_extra(i, t)?;
    }
    let madt = build_madt(&cfg.apic_ids, cfg.ioapic_id, cfg.ioapic_addr)?;
    let dsdt = build_dsdt(&cfg.devices, cfg.s5_sleep_type)?;
    let mcfg = build_mcfg(&cfg.devices);
    let facs = aml_bytes(&FACS::new());

    // Layout: RSDP, XSDT, FACS (64-byte aligned), DSDT, FADT, MADT, extras.
    let area_full = |size: u64| Error::TableAreaFull {
        what: "ACPI tables",
        size,
        start: RSDP_START,
        end: ACPI_END,
    };
    let xsdt_entries = 2 + u64::from(mcfg.is_some()) + cfg.extra_tables.len() as u64;
    let xsdt_addr = RSDP_START + 64;
    let xsdt_len = 36 + 8 * xsdt_entries;
    let facs_addr = align_up(xsdt_addr + xsdt_len, 64);
    let dsdt_addr = align_up(facs_addr + facs.len() as u64, 16);
    let fadt_addr = align_up(dsdt_addr + dsdt.len() as u64, 16);
    let fadt = build_fadt(cfg, dsdt_addr, facs_addr)?;
    let madt_addr = align_up(fadt_addr + fadt.len() as u64, 16);
    let mut cursor = align_up(madt_addr + madt.len() as u64, 16);
    let mcfg_addr = mcfg.as_ref().map(|t| {
        let addr = cursor;
        cursor = align_up(cursor + t.len() as u64, 16);
        addr
    });
    let mut extras = Vec::with_capacity(cfg.extra_tables.len());
    for t in &cfg.extra_tables {
        extras.push(cursor);
        cursor = align_up(cursor + t.len() as u64, 16);
    }
    if cursor > ACPI_END {
        return Err(area_full(cursor - RSDP_START));
    }

    let mut xsdt = XSDT::new(OEM_ID, *b"VMKITXSD", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(addr) = mcfg_addr {
        xsdt.add_entry(addr);
    }
    for &addr in &extras {
        xsdt.add_entry(addr);
    }
    let xsdt = aml_bytes(&xsdt);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    let mut tables = vec![
        AcpiTable {
            signature: *b"RSD ",
            addr: RSDP_START,
            bytes: rsdp,
        },
        AcpiTable {
            signature: *b"XSDT",
            addr: xsdt_addr,
            bytes: xsdt,
        },
        AcpiTable {
            signature: *b"FACS",
            addr: facs_addr,
            bytes: facs,
        },
        AcpiTable {
            signature: *b"DSDT",
            addr: dsdt_addr,
            bytes: dsdt,
        },
        AcpiTable {
            signature: *b"FACP",
            addr: fadt_addr,
            bytes: fadt,
        },
        AcpiTable {
            signature: *b"APIC",
            addr: madt_addr,
            bytes: madt,
        },
    ];
    if let (Some(bytes), Some(addr)) = (mcfg, mcfg_addr) {
        tables.push(AcpiTable {
            signature: *b"MCFG",
            addr,
            bytes,
        });
    }
    for (t, addr) in cfg.extra_tables.iter().zip(extras) {
        tables.push(AcpiTable {
            signature: [t[0], t[1], t[2], t[3]],
            addr,
            bytes: t.clone(),
        });
    }
    Ok(AcpiTables {
        rsdp_addr: RSDP_START,
        tables,
    })
}
