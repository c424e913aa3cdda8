// SPDX-License-Identifier: Apache-2.0 OR MIT
//! KVM interrupt controller for vmkit: the in-kernel irqchip (PIC pair, IOAPIC, LAPICs) and
//! PIT, the GSI routing table, MSI routes and irqfd/resamplefd, behind the
//! [`vmkit_device::interrupt`] traits that devices use.
//!
//! # Order of calls
//!
//! 1. [`setup_vm`] on the new `VmFd`, **before any vCPU exists**: identity map and TSS
//!    addresses, `KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`, and the x2APIC API (32-bit APIC IDs,
//!    needed for APIC IDs of 255 and above). Its [`IrqChipInfo`] says whether the x2APIC API
//!    is on.
//! 2. [`KvmIrqChip::new`] with the VM shared as `Arc<VmFd>`: installs the default GSI routes
//!    and becomes the VM's only user of `KVM_SET_GSI_ROUTING`. ([`KvmIrqChip::create`] does
//!    steps 1 and 2.)
//! 3. Create the vCPUs.
//! 4. Hand out interrupts through [`InterruptManager`](vmkit_device::interrupt::InterruptManager):
//!    `legacy_line(gsi, mode)` for ISA/INTx pins ([`KvmLegacyLine`]) and `msi_vectors(n)` for
//!    MSI/MSI-X ([`KvmMsiVectors`]).
//!
//! # Snapshots
//!
//! [`IrqChipState`] (module [`state`]) saves the PIC, IOAPIC and PIT through
//! `vmkit_migration`'s `Snapshot`/`Restore`; restore into a VM after [`setup_vm`] and
//! before its vCPUs run. MSI routes are not in it: the devices' transports re-create their
//! groups and reprogram them.
//!
//! # Hot path
//!
//! `trigger` on a line or vector is one `write(2)` to an eventfd that KVM watches (an irqfd):
//! no lock, no exit to the VMM. Worker threads may write the eventfd themselves
//! ([`MsiVectors::notifier`](vmkit_device::interrupt::MsiVectors::notifier),
//! [`InterruptLine::event`](vmkit_device::interrupt::InterruptLine::event)). Configuration
//! (routes, masks) is the cold path: one lock around the routing table, which is applied to
//! KVM as a whole on every change.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use kvm_ioctls::Kvm;
//! use vmkit_device::interrupt::{InterruptManager, MsiMessage, MsiVectors, TriggerMode};
//! use vmkit_irq::{setup_vm, KvmIrqChip};
//!
//! let kvm = Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! let info = setup_vm(&vm)?; // before any vCPU
//! let chip = KvmIrqChip::new(vm.clone(), info)?;
//! let _vcpu0 = vm.create_vcpu(0)?;
//!
//! // A serial port on ISA IRQ 4.
//! let serial_irq = chip.legacy_line(4, TriggerMode::Edge)?;
//! serial_irq.trigger()?;
//!
//! // Two MSI-X vectors; the transport programs them as the guest writes the table.
//! let msix = chip.msi_vectors(2)?;
//! msix.configure(0, MsiMessage { address: 0xfee0_0000, data: 0x41 })?;
//! msix.set_masked(0, false)?;
//! msix.trigger(0)?; // vector 0x41 to APIC 0
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod chip;
mod error;
pub mod ioevent;
pub mod legacy;
pub mod msi;
pub mod routing;
pub mod setup;
pub mod state;

pub use chip::KvmIrqChip;
pub use error::IrqError;
pub use ioevent::KvmIoEvents;
pub use legacy::KvmLegacyLine;
pub use msi::{x86_msi_route, KvmMsiVectors};
pub use routing::{GsiRoutingTable, MsiRoute};
pub use setup::{
    setup_vm, setup_vm_with, IrqChipInfo, VmIrqConfig, DEFAULT_IDENTITY_MAP_ADDRESS,
    DEFAULT_TSS_ADDRESS, X2APIC_API_FLAGS,
};
pub use state::IrqChipState;
