// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Arbitrary machine configurations (APIC ID lists, memory layouts, MMIO gaps, command lines,
//! ACPI devices and extra tables) fed to the MP table, ACPI, memory map, zero page and PVH
//! start info builders of vmkit-boot. Errors are fine; panics are bugs.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_boot::acpi::{AcpiConfig, AcpiDevice, PciHostBridge, PmRegisters};
use vmkit_boot::cmdline::check_cmdline;
use vmkit_boot::kernel::bzimage::parse_bzimage;
use vmkit_boot::linux::{build_boot_params, ZeroPageConfig};
use vmkit_boot::mptable::build_mptable;
use vmkit_boot::pvh::build_start_info;
use vmkit_boot::{build_memory_map, E820Entry, E820Type, Initramfs, MmioGap};

#[derive(Arbitrary, Debug)]
enum Device {
    Serial { port: u16, irq: u8 },
    VirtioMmio { base: u64, size: u64, gsi: u32 },
    Pci {
        segment: u16,
        buses: (u8, u8),
        ecam_base: u64,
        mmio32: (u64, u64),
        mmio64: Option<(u64, u64)>,
        io: Option<(u16, u16)>,
    },
    Aml(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    apic_ids: Vec<u32>,
    sequential_cpus: Option<u16>,
    ioapic_id: u8,
    ioapic_addr: u32,
    ram: Vec<(u64, u64)>,
    gap_start: u64,
    gap_end: u64,
    extra_e820: Vec<(u64, u64, u8)>,
    cmdline: String,
    kernel_cmdline_max: Option<u16>,
    setup_header_bytes: Vec<u8>,
    initramfs: Option<(u64, u64)>,
    rsdp: Option<u64>,
    s5_sleep_type: u8,
    iapc_boot_arch: u16,
    pm1a_evt: u16,
    pm1a_cnt: u16,
    pm_tmr: Option<u16>,
    gpe0: Option<(u16, u8)>,
    reset: Option<(u16, u8)>,
    devices: Vec<Device>,
    extra_tables: Vec<Vec<u8>>,
    fix_extra_checksums: bool,
}

fn kind(k: u8) -> E820Type {
    match k % 5 {
        0 => E820Type::Ram,
        1 => E820Type::Reserved,
        2 => E820Type::Acpi,
        3 => E820Type::Nvs,
        _ => E820Type::Unusable,
    }
}

fuzz_target!(|input: Input| {
    let mut apic_ids = input.apic_ids;
    apic_ids.truncate(1024);
    if let Some(n) = input.sequential_cpus {
        // Large, valid lists too (up to 4096 CPUs).
        apic_ids = (0..u32::from(n % 4097)).collect();
    }

    let _ = build_mptable(&apic_ids, input.ioapic_id);

    let mut extra_tables: Vec<Vec<u8>> = input.extra_tables.into_iter().take(8).collect();
    if input.fix_extra_checksums {
        for t in &mut extra_tables {
            if t.len() >= 36 {
                let len = t.len() as u32;
                t[4..8].copy_from_slice(&len.to_le_bytes());
                t[9] = 0;
                let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
                t[9] = 0u8.wrapping_sub(sum);
            }
        }
    }
    let acpi = AcpiConfig {
        apic_ids: apic_ids.clone(),
        ioapic_id: input.ioapic_id,
        ioapic_addr: input.ioapic_addr,
        pm: PmRegisters {
            pm1a_evt: input.pm1a_evt,
            pm1a_cnt: input.pm1a_cnt,
            pm_tmr: input.pm_tmr,
            gpe0: input.gpe0,
            reset: input.reset,
        },
        s5_sleep_type: input.s5_sleep_type,
        iapc_boot_arch: input.iapc_boot_arch,
        devices: input
            .devices
            .into_iter()
            .take(300)
            .map(|d| match d {
                Device::Serial { port, irq } => AcpiDevice::Serial { port, irq },
                Device::VirtioMmio { base, size, gsi } => {
                    AcpiDevice::VirtioMmio { base, size, gsi }
                }
                Device::Pci {
                    segment,
                    buses,
                    ecam_base,
                    mmio32,
                    mmio64,
                    io,
                } => AcpiDevice::PciHostBridge(PciHostBridge {
                    segment,
                    bus_start: buses.0,
                    bus_end: buses.1,
                    ecam_base,
                    mmio32,
                    mmio64,
                    io,
                }),
                Device::Aml(b) => AcpiDevice::Aml(b),
            })
            .collect(),
        extra_tables,
    };
    if let Ok(tables) = acpi.build() {
        // Every table the builder produced must carry a valid checksum.
        for t in &tables.tables {
            if &t.signature != b"FACS" {
                assert_eq!(t.bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            }
            assert!(t.addr >= 0xe0000 && t.addr + t.bytes.len() as u64 <= 0x10_0000);
        }
    }

    let ram: Vec<(u64, u64)> = input.ram.into_iter().take(512).collect();
    let gap = MmioGap {
        start: input.gap_start,
        end: input.gap_end,
    };
    let extra: Vec<E820Entry> = input
        .extra_e820
        .into_iter()
        .take(160)
        .map(|(addr, size, k)| E820Entry {
            addr,
            size,
            kind: kind(k),
        })
        .collect();
    let map = match build_memory_map(&ram, gap, &extra) {
        Ok(map) => {
            for w in map.windows(2) {
                assert!(
                    w[0].addr + w[0].size <= w[1].addr,
                    "sorted, non-overlapping"
                );
            }
            map
        }
        Err(_) => Vec::new(),
    };

    let kernel_max = input.kernel_cmdline_max.map(usize::from);
    let _ = check_cmdline(&input.cmdline, kernel_max);

    let initramfs = input.initramfs.map(|(addr, size)| Initramfs { addr, size });
    let header = parse_bzimage(
        &input.setup_header_bytes,
        input.setup_header_bytes.len() as u64,
    )
    .ok()
    .map(|info| info.header);
    let _ = build_boot_params(&ZeroPageConfig {
        header: header.as_ref(),
        cmdline_addr: 0x20000,
        initramfs,
        rsdp_addr: input.rsdp,
        memory_map: &map,
    });
    let _ = build_start_info(0x20000, initramfs, input.rsdp, &map);
});
