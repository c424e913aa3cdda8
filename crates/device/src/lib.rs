// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The device side of vmkit: what a device model sees of the machine.
//!
//! A device model in vmkit knows nothing about the hypervisor. It is reached through a
//! [`Bus`] (one for port I/O, one for MMIO) on which it is registered as a [`BusDevice`] for
//! one or more address ranges, and it raises interrupts through the traits in [`interrupt`]
//! ([`InterruptLine`] for legacy pins, [`MsiVectors`] for MSI/MSI-X), which the `vmkit-irq`
//! crate implements on top of KVM. This keeps devices embeddable in any VMM and testable (and
//! fuzzable) without `/dev/kvm`.
//!
//! The bus is read by every vCPU thread on every exit, so lookups take no lock: the range map
//! is an immutable sorted vector behind an [`arc_swap::ArcSwap`], replaced as a whole by
//! (rare, serialised) updates. Updates are transactional: a [`BusTransaction`] applies all of
//! its inserts and removals or none of them, which keeps hotplug atomic.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_device::{Bus, BusDevice, BusRange};
//!
//! /// A scratch register at one port.
//! #[derive(Default)]
//! struct Scratch(Mutex<u8>);
//!
//! impl BusDevice for Scratch {
//!     fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
//!         let v = *self.0.lock().unwrap();
//!         data.fill(v);
//!     }
//!     fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
//!         if let Some(b) = data.first() {
//!             *self.0.lock().unwrap() = *b;
//!         }
//!     }
//! }
//!
//! let bus = Bus::new();
//! bus.insert(BusRange::new(0x80, 1)?, Arc::new(Scratch::default()))?;
//! bus.write(0x80, &[0x42])?;
//! let mut v = [0u8; 1];
//! bus.read(0x80, &mut v)?;
//! assert_eq!(v, [0x42]);
//! # Ok::<(), vmkit_device::BusError>(())
//! ```

mod bus;
pub mod interrupt;
pub mod ioevent;
pub mod resources;
pub mod testing;

pub use bus::{Bus, BusDevice, BusError, BusRange, BusTransaction};
pub use interrupt::{
    InterruptError, InterruptLine, InterruptManager, MsiMessage, MsiVectors, TriggerMode,
};
pub use ioevent::{IoEventAddress, IoEventError, IoEventMatch, IoEventSpace};
pub use resources::Resource;
