// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The x86_64 vCPU layer of vmkit, on `kvm-ioctls`.
//!
//! - [`cpuid`]: the CPUID policy — KVM's supported list shaped for a [`Topology`] (APIC IDs,
//!   leaves 0x1/0x4/0xB/0x1F and the AMD topology leaves), the KVM paravirtual leaves
//!   ([`PvFeatures`]) and named feature removal (`"cx16"`, `"xsave"`, ...).
//! - [`msr`]: the boot MSR values and the MSR list saved with the state.
//! - [`regs`]: boot register state for PVH (32-bit protected mode) and the Linux 64-bit boot
//!   protocol ([`BootRegs`]), GDT descriptor to `kvm_segment` conversion, FPU defaults.
//! - [`lapic`]: LINT0 = ExtINT / LINT1 = NMI, LAPIC register helpers.
//! - [`Vcpu`]: a `VcpuFd` with its index and APIC ID; [`Vcpu::configure`],
//!   [`Vcpu::set_boot_regs`], and [`Vcpu::run_once`], which maps each `KVM_RUN` exit straight
//!   to a [`vmkit_device::Bus`] call (no allocation, no lock).
//! - [`manager`]: one thread per vCPU and the shared [`VmController`] (pause / resume / kick /
//!   stop / wait; implements [`vmkit_migration::Pausable`]).
//! - [`state`]: the complete, versioned vCPU state ([`VcpuState`], `"vmkit-vcpu/x86_64"` v1)
//!   with [`Vcpu::save_state`] / [`Vcpu::restore_state`] (restore order documented there).
//!
//! # Example
//!
//! A one-vCPU VM entered through PVH, with a device on port 0x3f8:
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmkit_device::{Bus, BusDevice, BusRange};
//! use vmkit_vcpu::{
//!     BootRegs, CpuidConfig, CpuidPolicy, Irqchip, Topology, Vcpu, VcpuConfig, VcpuManager, VmStop,
//! };
//!
//! struct Port;
//! impl BusDevice for Port {
//!     fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
//!         data.fill(0);
//!     }
//!     fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
//!         println!("guest wrote {data:?}");
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! vm.create_irq_chip()?;
//! // ... register guest memory with the VM and load the guest (GDT at 0x500, IDT at 0x520) ...
//!
//! let cpuid = CpuidPolicy::from_kvm(
//!     &kvm,
//!     &CpuidConfig::new(1, Topology::new(1, 1, 1)?).remove_features(["cx16"]),
//! )?;
//! let config = Arc::new(VcpuConfig::new(&kvm, &vm, cpuid, Irqchip::InKernel)?);
//! let mut vcpu = Vcpu::new(&vm, 0, config)?;
//! vcpu.configure()?;
//! vcpu.set_boot_regs(&BootRegs::pvh(0x10_0000, 0x6000))?;
//!
//! let pio = Arc::new(Bus::new());
//! pio.insert(BusRange::new(0x3f8, 8)?, Arc::new(Port))?;
//! let mmio = Arc::new(Bus::new());
//!
//! // Either drive the vCPU yourself ...
//! // loop { match vcpu.run_once(&pio, &mmio) { VcpuExitAction::Stop(r) => break, _ => {} } }
//! // ... or give it a thread and a controller:
//! let mut vcpus = vmkit_vcpu::VcpuManager::spawn(vec![vcpu], pio, mmio)?;
//! let controller = vcpus.controller().clone(); // for devices: controller.request_stop(VmStop::Exit(0))
//! controller.pause()?;
//! let states = vcpus.save_states()?;
//! controller.resume();
//! match vcpus.wait() {
//!     VmStop::Exit(code) => println!("exit code {code}, {} vCPU states saved", states.len()),
//!     other => println!("stopped: {other}"),
//! }
//! # Ok(())
//! # }
//! ```

pub mod cpuid;
mod error;
pub mod lapic;
pub mod manager;
pub mod msr;
pub mod regs;
pub mod state;
mod vcpu;

pub use cpuid::{CpuidConfig, CpuidError, CpuidPolicy, HostCpuid, PvFeatures, Topology};
pub use error::{Result, VcpuError};
pub use manager::{kick_signal, VcpuManager, VmController};
pub use regs::{BootRegs, GdtLayout};
pub use state::VcpuState;
pub use vcpu::{Irqchip, Vcpu, VcpuConfig, VcpuExitAction, VcpuRestoreArgs, VmStop};

pub use kvm_bindings;
pub use kvm_ioctls;
