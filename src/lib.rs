// SPDX-License-Identifier: Apache-2.0 OR MIT
//! vmkit: reusable KVM virtualization components.
//!
//! This umbrella crate re-exports the component crates under short names, so a VMM can
//! depend on one crate and still take only the parts it needs. Each component is also usable
//! on its own (`vmkit-vcpu`, `vmkit-memory`, ...). `examples/vmm` assembles them into a
//! complete machine; `docs/architecture.md` explains how they fit together.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmkit::memory::{RamConfig, SlotTable};
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! vmkit::irq::setup_vm(&vm)?; // in-kernel PIC/IOAPIC/PIT, before any vCPU
//! let ram = RamConfig::new(256 << 20).build()?;
//! let mut slots = SlotTable::new(vm.clone());
//! slots.register_memory(ram.memory(), false)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use vmkit_block as block;
pub use vmkit_boot as boot;
pub use vmkit_device as device;
pub use vmkit_devices as devices;
pub use vmkit_guest as guest;
pub use vmkit_irq as irq;
pub use vmkit_memory as memory;
pub use vmkit_migration as migration;
pub use vmkit_pci as pci;
pub use vmkit_vcpu as vcpu;
pub use vmkit_virtio as virtio;
