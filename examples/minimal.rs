// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The smallest complete VMM built from vmkit: the composition example of the README.
//!
//! `cargo run --release --example minimal -- 4` boots the embedded test guest with 4 vCPUs,
//! prints its report (COM1 on stdout) and exits with the guest's exit code. Everything the
//! full example (`examples/vmm`) adds — flags, Linux kernels, x2APIC, timing, error
//! context — is left out, so that the recipe is easy to see.

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use vmkit::boot::{self, acpi::AcpiConfig, BootConfig, BootProtocol, KernelOptions, MmioGap};
use vmkit::device::{Bus, InterruptManager, TriggerMode};
use vmkit::devices::serial::SerialOutput;
use vmkit::devices::{ExitPort, Serial};
use vmkit::irq::KvmIrqChip;
use vmkit::memory::{RamConfig, SlotTable, MMIO_GAP_START};
use vmkit::vcpu::{BootRegs, CpuidConfig, CpuidPolicy, Irqchip, Topology, Vcpu, VcpuConfig};
use vmkit::vcpu::{VcpuManager, VmController, VmStop};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<std::process::ExitCode, Error> {
    let cpus: u32 = std::env::args().nth(1).map_or(Ok(2), |s| s.parse())?;
    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = Arc::new(kvm.create_vm()?);
    let irq_info = vmkit::irq::setup_vm(&vm)?; // PIC, IOAPIC, PIT: before any vCPU
    let ram = RamConfig::new(256 << 20).build()?;
    let mut slots = SlotTable::new(vm.clone()); // dropping it deletes the KVM slots
    slots.register_memory(ram.memory(), false)?;
    let irqchip = KvmIrqChip::new(vm.clone(), irq_info)?;
    let cpuid = CpuidPolicy::from_kvm(&kvm, &CpuidConfig::new(cpus, Topology::flat(cpus)?))?;
    let apic_ids = (0..cpus)
        .map(|i| cpuid.apic_id(i))
        .collect::<Result<Vec<_>, _>>()?;

    let stopper: Arc<OnceLock<Arc<VmController>>> = Arc::default();
    let pio = Arc::new(Bus::new());
    let com1_irq = irqchip.legacy_line(4, TriggerMode::Edge)?;
    let com1 = Arc::new(
        Serial::builder(com1_irq)
            .output(SerialOutput::Stdout)
            .build()?,
    );
    pio.insert(com1.range(), com1.clone())?;
    let exit = Arc::new(ExitPort::new({
        let stopper = stopper.clone();
        move |code| {
            stopper
                .get()
                .map_or((), |c| c.request_stop(VmStop::Exit(code)))
        }
    }));
    pio.insert(exit.range(), exit.clone())?;

    let (mem, gap) = (ram.memory(), MmioGap::below_4g(MMIO_GAP_START));
    let guest = &mut Cursor::new(vmkit::guest::elf());
    let kernel = boot::load_kernel_from(mem, guest, "test guest", &KernelOptions::new(gap))?;
    let acpi = boot::acpi::write_acpi_tables(mem, &AcpiConfig::new(apic_ids, 0xfe))?;
    let mut boot_config = BootConfig::new("", gap);
    boot_config.rsdp_addr = Some(acpi.rsdp_addr);
    let info = boot::configure_boot(mem, &kernel, &boot_config)?;
    let regs = match info.protocol {
        BootProtocol::Pvh => BootRegs::pvh(info.entry, info.boot_data_addr),
        BootProtocol::Linux64 => {
            BootRegs::linux64(info.entry, info.boot_data_addr, info.page_table_root)
        }
    };

    let config = Arc::new(VcpuConfig::new(&kvm, &vm, cpuid, Irqchip::InKernel)?);
    let mut vcpus = (0..cpus)
        .map(|i| Vcpu::new(&vm, i, config.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    vcpus.iter_mut().try_for_each(|v| v.configure())?;
    vcpus[0].set_boot_regs(&regs)?; // the APs wait for the guest's INIT/SIPI
    let mut manager = VcpuManager::spawn(vcpus, pio, Arc::new(Bus::new()))?;
    let _ = stopper.set(manager.controller().clone());
    Ok(match manager.wait() {
        VmStop::Exit(code) => std::process::ExitCode::from(code as u8),
        VmStop::Shutdown | VmStop::Reset | VmStop::Requested => std::process::ExitCode::SUCCESS,
        other => return Err(format!("the guest stopped: {other}").into()),
    })
}
