// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Virtio for vmkit: the [`VirtioDevice`] trait, the virtio-mmio (version 2) and modern
//! virtio-pci transports, a conformance suite any device implementation can run, and the
//! block, console and entropy devices.
//!
//! A device model implements [`VirtioDevice`] and knows nothing of the transport or the
//! hypervisor: it gets guest memory, its queues with their notification eventfds and a
//! [`VirtioInterrupt`] at activation. A transport wraps a device and is itself a bus device
//! (virtio-mmio) or a PCI function (virtio-pci), registering ioeventfds through
//! [`vmkit_device::IoEventSpace`] and raising interrupts through `vmkit-device`'s interrupt
//! traits.
//!
//! - [`transport::VirtioMmio`] is a [`vmkit_device::BusDevice`]: register it on the MMIO
//!   bus at [`transport::VirtioMmio::range`] and describe it to the guest (ACPI `LNRO0005`
//!   or a device-tree node) with its base address and interrupt line.
//! - [`transport::VirtioPci`] is a [`vmkit_pci::PciDevice`]: add it to the PCI root complex,
//!   which maps its BAR; interrupts go through MSI-X (one vector per queue plus one for
//!   configuration changes).
//! - [`conformance`] checks any device model through the real transport and guest memory;
//!   [`virtio_conformance_tests!`] turns it into `#[test]`s.
//!
//! Saved state is versioned ([`transport::VirtioMmioState`], [`transport::VirtioPciState`]):
//! the transport saves its registers and queue positions around the device's own section,
//! and restoring rebuilds the transport around a fresh device and re-activates it.
//!
//! ```
//! use std::sync::Arc;
//! use vm_memory::{bitmap::AtomicBitmap, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
//! use vmkit_device::testing::CountingLine;
//! use vmkit_device::{Bus, TriggerMode};
//! use vmkit_migration::{encode_section, Section, VersionedState};
//! use vmkit_virtio::transport::{mmio_regs, VirtioMmio};
//! use vmkit_virtio::{
//!     device_type, features, ActivateContext, VirtioDevice, VirtioError,
//! };
//!
//! /// A device with one queue that does nothing with it.
//! struct Idle;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct IdleState {}
//! impl VersionedState for IdleState {
//!     const NAME: &'static str = "example/idle";
//!     const VERSION: u16 = 1;
//! }
//!
//! impl VirtioDevice for Idle {
//!     fn device_type(&self) -> u32 { device_type::RNG }
//!     fn queue_max_sizes(&self) -> Vec<u16> { vec![64] }
//!     fn device_features(&self) -> u64 { features::VERSION_1 }
//!     fn negotiate_features(&mut self, _: u64) -> Result<(), VirtioError> { Ok(()) }
//!     fn read_config(&self, _: u64, data: &mut [u8]) { data.fill(0) }
//!     fn write_config(&mut self, _: u64, _: &[u8]) {}
//!     fn activate(&mut self, _: ActivateContext) -> Result<(), VirtioError> { Ok(()) }
//!     fn reset(&mut self) {}
//!     fn save_state(&self) -> Result<Section, VirtioError> {
//!         encode_section(&IdleState {}).map_err(|e| VirtioError::State(e.to_string()))
//!     }
//!     fn restore_state(&mut self, _: &Section) -> Result<(), VirtioError> { Ok(()) }
//! }
//!
//! let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(
//!     GuestAddress(0),
//!     1 << 20,
//! )])?);
//! let line = Arc::new(CountingLine::new(TriggerMode::Edge));
//! // A VMM passes its KVM IoEventSpace instead of None, so that queue notifications
//! // go straight to the device's workers.
//! let mmio = Arc::new(VirtioMmio::new(Box::new(Idle), mem, line, 0xd000_0000, None)?);
//! let bus = Bus::new();
//! bus.insert(mmio.range(), mmio.clone())?;
//!
//! let mut magic = [0u8; 4];
//! bus.read(0xd000_0000 + mmio_regs::MAGIC_VALUE, &mut magic)?;
//! assert_eq!(&magic, b"virt");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod conformance;
mod device;
pub mod devices;
pub mod transport;

pub use device::{
    device_type, features, status, ActivateContext, ActiveQueue, VirtioDevice, VirtioError,
    VirtioInterrupt, VirtioInterruptType, VirtioMemory,
};
