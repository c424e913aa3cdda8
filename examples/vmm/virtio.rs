// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The example VMM's virtio devices: disks, a multiport console and an entropy source,
//! attached through virtio-pci (behind the PCI root complex, MSI-X interrupts) or
//! virtio-mmio (windows announced in ACPI and on the kernel command line), with queue
//! notifications on ioeventfds.
//!
//! Placement follows fixed plans so that a device keeps its address across restarts:
//! PCI roles from [`SlotPlan`] (console slot 1, rng slot 2, disk k slot 3 + k); virtio-mmio
//! windows in the order console, rng, disks, one 4 KiB window and one GSI each from
//! [`MMIO_BASE`] and [`MMIO_FIRST_GSI`].

use std::sync::Arc;

use vmkit::block::raw::RawBackend;
use vmkit::block::{BlockBackend, CacheMode};
use vmkit::boot::acpi::{AcpiDevice, PciHostBridge};
use vmkit::boot::e820::{E820Entry, E820Type};
use vmkit::device::{Bus, InterruptManager, IoEventSpace, TriggerMode};
use vmkit::irq::KvmIrqChip;
use vmkit::memory::vm_memory::GuestMemoryAtomic;
use vmkit::memory::GuestRam;
use vmkit::pci::slots::{SlotPlan, SlotRole, ECAM_BASE, ECAM_BUSES, ECAM_SIZE};
use vmkit::pci::PciRoot;
use vmkit::virtio::devices::block::{Block, BlockConfig};
use vmkit::virtio::devices::console::{Console, ConsoleConfig, PortBackend, PortConfig};
use vmkit::virtio::devices::rng::Rng;
use vmkit::virtio::transport::{VirtioMmio, VirtioPci};
use vmkit::virtio::{VirtioDevice, VirtioMemory};

use crate::args::{Args, DiskCache, PortBackendArg, Transport};
use crate::{Context, Result};

/// First virtio-mmio window (after the PCI ECAM region, inside the 32-bit MMIO gap).
pub const MMIO_BASE: u64 = 0xf000_0000;
/// Size of one virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device (IOAPIC pins 16..=23 are free of ISA devices).
pub const MMIO_FIRST_GSI: u32 = 16;
/// virtio-mmio devices that fit the IOAPIC's free pins.
pub const MMIO_MAX_DEVICES: usize = 8;
/// Queue size of every virtio queue the example offers.
const QUEUE_SIZE: u16 = 256;

/// What the rest of the machine needs to know about the attached devices.
pub struct VirtioSetup {
    /// ACPI devices to describe (a PCI host bridge, or the virtio-mmio windows).
    pub acpi_devices: Vec<AcpiDevice>,
    /// Non-RAM memory map entries (the ECAM region).
    pub e820: Vec<E820Entry>,
    /// Kernel command line additions (`virtio_mmio.device=` entries).
    pub cmdline: Vec<String>,
    /// Keeps the root complex alive (its configuration access devices hold weak
    /// references).
    pub pci_root: Option<Arc<PciRoot>>,
    /// One line per device for the VMM's log.
    pub summary: Vec<String>,
}

/// A device before it is given a transport, with the PCI role it gets.
struct Pending {
    role: SlotRole,
    what: String,
    device: Box<dyn VirtioDevice>,
}

fn build_devices(args: &Args) -> Result<Vec<Pending>> {
    let mut out = Vec::new();
    if !args.console_ports.is_empty() {
        let max_ports = u32::try_from(args.console_ports.len())
            .ok()
            .filter(|&n| n <= 31)
            .ok_or_else(|| "--console-port: at most 31 ports".to_owned())?;
        let mut console = Console::new(ConsoleConfig {
            max_ports,
            queue_size: QUEUE_SIZE,
            ..ConsoleConfig::default()
        })
        .context(|| "virtio-console".into())?;
        for port in &args.console_ports {
            let backend = match &port.backend {
                PortBackendArg::Stdio => PortBackend::Stdio,
                PortBackendArg::Socket(p) => PortBackend::UnixSocket(p.clone()),
                PortBackendArg::File(p) => PortBackend::File {
                    output: p.clone(),
                    input: None,
                },
                PortBackendArg::Pty => PortBackend::Pty,
            };
            let info = console
                .add_port(PortConfig {
                    name: Some(port.name.clone()),
                    console: false,
                    backend,
                })
                .context(|| format!("--console-port {}", port.name))?;
            eprintln!("vmm: virtio-console port {info:?}");
        }
        out.push(Pending {
            role: SlotRole::Console,
            what: format!("virtio-console ({} ports)", args.console_ports.len()),
            device: Box::new(console),
        });
    }
    if args.rng {
        let rng = Rng::new(QUEUE_SIZE).context(|| "virtio-rng".into())?;
        out.push(Pending {
            role: SlotRole::Rng,
            what: "virtio-rng".into(),
            device: Box::new(rng),
        });
    }
    for (k, disk) in args.disks.iter().enumerate() {
        let index = u8::try_from(k)
            .ok()
            .filter(|&k| k < 8)
            .ok_or_else(|| "--disk: at most 8 disks".to_owned())?;
        let cache = match disk.cache {
            DiskCache::Writeback => CacheMode::Writeback,
            DiskCache::Writethrough => CacheMode::Writethrough,
            DiskCache::None => CacheMode::None,
        };
        let name = disk.path.display().to_string();
        let backend: Arc<dyn BlockBackend> = Arc::new(
            RawBackend::open(&disk.path, disk.read_only, cache)
                .context(|| format!("--disk {name}"))?,
        );
        let config = BlockConfig {
            path: Some(disk.path.clone()),
            read_only: disk.read_only,
            num_queues: disk.queues,
            // One worker thread per queue: requests run synchronously inside a worker, so
            // this is also how many requests reach the host at once.
            workers: usize::from(disk.queues),
            queue_size: QUEUE_SIZE,
            serial: format!("vmkit-disk{k}"),
            ..BlockConfig::default()
        };
        let block = Block::new(backend, config).context(|| format!("--disk {name}"))?;
        out.push(Pending {
            role: SlotRole::Disk(index),
            what: format!("virtio-blk {name} ({} queue(s), {cache:?})", disk.queues),
            device: Box::new(block),
        });
    }
    Ok(out)
}

/// Builds the devices the command line asks for and attaches them through `args.transport`.
pub fn attach(
    args: &Args,
    mem: &GuestRam,
    irqchip: &KvmIrqChip,
    ioevents: Arc<dyn IoEventSpace>,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
) -> Result<VirtioSetup> {
    let devices = build_devices(args)?;
    let vmem: VirtioMemory = GuestMemoryAtomic::new(mem.clone());
    let mut setup = VirtioSetup {
        acpi_devices: Vec::new(),
        e820: Vec::new(),
        cmdline: Vec::new(),
        pci_root: None,
        summary: Vec::new(),
    };
    match args.transport {
        Transport::Pci => {
            let plan = SlotPlan::default();
            let root = PciRoot::new(plan, mmio.clone(), pio.clone());
            root.register_config_access()
                .context(|| "PCI configuration access".into())?;
            for dev in devices {
                let vectors = irqchip
                    .msi_vectors(VirtioPci::vectors_needed(dev.device.as_ref()))
                    .context(|| format!("MSI-X vectors for {}", dev.what))?;
                let pci = VirtioPci::new(dev.device, vmem.clone(), vectors, Some(ioevents.clone()))
                    .context(|| dev.what.clone())?;
                let addr = root
                    .add_role(dev.role, Arc::new(pci))
                    .context(|| format!("placing {} on PCI", dev.what))?;
                setup.summary.push(format!("{addr} {}", dev.what));
            }
            let (mmio_base, mmio_size) = plan.mmio_window();
            let (io_base, io_size) = plan.io_window();
            setup
                .acpi_devices
                .push(AcpiDevice::PciHostBridge(PciHostBridge {
                    segment: 0,
                    bus_start: 0,
                    bus_end: (ECAM_BUSES - 1) as u8,
                    ecam_base: ECAM_BASE,
                    mmio32: (mmio_base, mmio_size),
                    mmio64: None,
                    io: u16::try_from(io_base).ok().zip(u16::try_from(io_size).ok()),
                }));
            // Linux uses an MCFG region only if firmware also reserves it.
            setup.e820.push(E820Entry {
                addr: ECAM_BASE,
                size: ECAM_SIZE,
                kind: E820Type::Reserved,
            });
            setup.pci_root = Some(root);
        }
        Transport::Mmio => {
            if devices.len() > MMIO_MAX_DEVICES {
                return Err(format!(
                    "--transport mmio: at most {MMIO_MAX_DEVICES} virtio devices, {} asked for",
                    devices.len()
                ));
            }
            for (i, dev) in devices.into_iter().enumerate() {
                let base = MMIO_BASE + MMIO_SIZE * i as u64;
                let gsi = MMIO_FIRST_GSI + i as u32;
                let line = irqchip
                    .legacy_line(gsi, TriggerMode::Edge)
                    .context(|| format!("GSI {gsi} for {}", dev.what))?;
                let transport =
                    VirtioMmio::new(dev.device, vmem.clone(), line, base, Some(ioevents.clone()))
                        .context(|| dev.what.clone())?;
                let transport = Arc::new(transport);
                mmio.insert(transport.range(), transport)
                    .context(|| format!("virtio-mmio window at {base:#x}"))?;
                setup.acpi_devices.push(AcpiDevice::VirtioMmio {
                    base,
                    size: MMIO_SIZE,
                    gsi,
                });
                setup
                    .cmdline
                    .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
                setup
                    .summary
                    .push(format!("mmio {base:#x} gsi {gsi} {}", dev.what));
            }
        }
    }
    Ok(setup)
}
