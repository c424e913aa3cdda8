// SPDX-License-Identifier: Apache-2.0 OR MIT
//! MSI vector groups on KVM: one GSI, one eventfd and one irqfd per vector.
//!
//! A vector is *routed* once [`configure`](MsiVectors::configure) gave it a usable message,
//! and its irqfd is registered exactly while it is routed **and** unmasked:
//!
//! - **Created** masked and unconfigured: a GSI is allocated, without a route or irqfd.
//! - [`configure`](MsiVectors::configure) translates the guest's message with
//!   [`x86_msi_route`] and installs it as the GSI's MSI route (the whole routing table is
//!   re-applied). A message that is not an x86 interrupt message (address outside
//!   0xFEExxxxx, or an address high word KVM would reject) removes the route instead: the
//!   vector behaves as unconfigured. That is a guest action, not an error.
//! - [`set_masked`](MsiVectors::set_masked) deregisters (`true`) or registers (`false`) the
//!   irqfd of a routed vector. Deregistration waits until KVM has finished injecting the
//!   triggers it had already seen.
//! - [`trigger`](MsiVectors::trigger) writes the eventfd; it takes no lock. Writing the
//!   [`notifier`](MsiVectors::notifier) eventfd directly from a worker thread is the same.
//!
//! **Unconfigured vectors never deliver**: their triggers stay in the eventfd counter and
//! are discarded when the vector becomes routed (the counter is drained before the irqfd is
//! registered). Were the irqfd registered on a GSI without a route, KVM would defer such a
//! trigger to a work item that looks the route up later, and could deliver it after a
//! `configure` that followed the trigger.
//!
//! **A trigger while masked** (on a routed vector) is not delivered. The eventfd counter
//! keeps it, and it acts as the vector's pending bit: when the vector is unmasked, KVM sees
//! the pending count on registration and delivers the interrupt once (several triggers while
//! masked coalesce into one) to the route in place then. If the vector is unconfigured and
//! configured again in between, the trigger is discarded as above. A transport that tracks
//! pending bits itself (MSI-X PBA) can consume the latched trigger with
//! [`KvmMsiVectors::take_pending`] while the vector is masked, so it is not also delivered
//! at unmask.
//!
//! `KVM_SIGNAL_MSI` ([`crate::KvmIrqChip::signal_msi`]) is the alternative to the irqfd for
//! delivering a message directly: one ioctl per interrupt, no GSI needed, but the message must
//! be at hand (under a lock) on the hot path, so the groups do not use it.

use std::io;
use std::sync::{Arc, Mutex};

use vmkit_device::interrupt::{InterruptError, MsiMessage, MsiVectors};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::chip::{lock, Shared};
use crate::error::kvm_io;
use crate::routing::MsiRoute;

/// Low address bits of the x86 interrupt message window (0xFEE0_0000..0xFEF0_0000).
const MSI_ADDRESS_WINDOW_MASK: u32 = 0xfff0_0000;
const MSI_ADDRESS_WINDOW: u32 = 0xfee0_0000;
/// Address bit 4: the message is in interrupt-remapping format.
const MSI_ADDR_REMAPPABLE: u32 = 1 << 4;
/// Address bits 11:5: extended destination ID (APIC ID bits 14:8), see
/// `KVM_FEATURE_MSI_EXT_DEST_ID`.
const MSI_ADDR_EXT_DEST_MASK: u32 = 0x7f << 5;

/// Translates a guest-programmed MSI message into the route KVM expects, or `None` if the
/// message cannot be an x86 interrupt (the vector then stays unrouted and never delivers).
///
/// `x2apic_format` says whether the VM runs with `KVM_X2APIC_API_USE_32BIT_IDS`
/// ([`crate::IrqChipInfo::x2apic_api`]). With it, KVM reads destination ID bits 31:8 from
/// `address_hi` bits 31:8 and rejects the whole routing table if `address_hi` bits 7:0 are
/// not zero, so:
///
/// - a message whose address high word has bits 7:0 set is refused (`None`);
/// - a compatibility-format message (bit 4 clear) with the extended destination ID in
///   address bits 11:5 and a zero high word has those bits moved to `address_hi` bits 14:8
///   (what QEMU does too), because KVM itself ignores bits 11:5;
/// - a message that already carries destination bits in `address_hi` is passed unchanged.
///
/// Without it, KVM knows only 8-bit destinations: the high word must be zero and bits 11:5
/// are passed unchanged (KVM ignores them; a guest only uses them when the VMM advertises
/// `KVM_FEATURE_MSI_EXT_DEST_ID`, which it must not do without the x2APIC API).
pub fn x86_msi_route(message: MsiMessage, x2apic_format: bool) -> Option<MsiRoute> {
    let lo = message.address as u32;
    let hi = (message.address >> 32) as u32;
    if lo & MSI_ADDRESS_WINDOW_MASK != MSI_ADDRESS_WINDOW {
        return None;
    }
    let data = message.data;
    if !x2apic_format {
        return (hi == 0).then_some(MsiRoute {
            address_lo: lo,
            address_hi: 0,
            data,
        });
    }
    if hi & 0xff != 0 {
        return None;
    }
    let ext = lo & MSI_ADDR_EXT_DEST_MASK;
    if hi == 0 && lo & MSI_ADDR_REMAPPABLE == 0 && ext != 0 {
        return Some(MsiRoute {
            address_lo: lo & !MSI_ADDR_EXT_DEST_MASK,
            address_hi: (ext >> 5) << 8,
            data,
        });
    }
    Some(MsiRoute {
        address_lo: lo,
        address_hi: hi,
        data,
    })
}

/// One vector: its GSI and the irqfd eventfd.
#[derive(Debug)]
struct MsiVector {
    gsi: u32,
    event: EventFd,
}

impl MsiVector {
    fn register(&self, shared: &Shared) -> Result<(), InterruptError> {
        shared
            .vm
            .register_irqfd(&self.event, self.gsi)
            .map_err(|e| kvm_io("KVM_IRQFD", e))
    }

    fn deregister(&self, shared: &Shared) -> Result<(), InterruptError> {
        shared
            .vm
            .unregister_irqfd(&self.event, self.gsi)
            .map_err(|e| kvm_io("KVM_IRQFD(deassign)", e))
    }

    /// Discards the triggers accumulated in the eventfd counter.
    fn drain(&self) -> Result<bool, InterruptError> {
        match self.event.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(InterruptError::Io(e)),
        }
    }
}

/// Per-vector control state (cold path, under the group's lock).
#[derive(Clone, Copy, Debug)]
struct VectorState {
    /// Whether the vector is masked.
    masked: bool,
    /// Whether the vector's GSI has an MSI route.
    routed: bool,
    /// The last message the transport configured.
    message: Option<MsiMessage>,
}

impl VectorState {
    /// Whether the irqfd is registered.
    fn armed(&self) -> bool {
        self.routed && !self.masked
    }
}

/// A group of MSI/MSI-X vectors on KVM; see the [module docs](self) for the semantics.
///
/// Created by [`crate::KvmIrqChip::create_msi_vectors`] (or through
/// [`vmkit_device::interrupt::InterruptManager::msi_vectors`]). Dropping the group
/// deregisters its irqfds and frees its GSIs for reuse.
#[derive(Debug)]
pub struct KvmMsiVectors {
    shared: Arc<Shared>,
    vectors: Box<[MsiVector]>,
    state: Mutex<Box<[VectorState]>>,
}

impl KvmMsiVectors {
    /// Allocates `count` GSIs and creates the eventfds; every vector starts masked and
    /// unconfigured.
    pub(crate) fn new(shared: Arc<Shared>, count: usize) -> Result<Self, InterruptError> {
        // Create the eventfds first: allocation then cannot leave GSIs behind on failure.
        let events = (0..count)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<EventFd>>>()?;
        let gsis = shared.update_routes(|t| Ok((t.allocate_msi(count)?, false)))?;
        let vectors: Box<[MsiVector]> = gsis
            .into_iter()
            .zip(events)
            .map(|(gsi, event)| MsiVector { gsi, event })
            .collect();
        let state = vec![
            VectorState {
                masked: true,
                routed: false,
                message: None,
            };
            count
        ]
        .into_boxed_slice();
        Ok(KvmMsiVectors {
            shared,
            vectors,
            state: Mutex::new(state),
        })
    }

    fn invalid(&self, index: usize) -> InterruptError {
        InterruptError::InvalidVector {
            index,
            len: self.vectors.len(),
        }
    }

    fn vector(&self, index: usize) -> Result<&MsiVector, InterruptError> {
        self.vectors.get(index).ok_or_else(|| self.invalid(index))
    }

    /// The GSI that vector `index` uses.
    pub fn gsi(&self, index: usize) -> Option<u32> {
        self.vectors.get(index).map(|v| v.gsi)
    }

    /// Whether vector `index` is masked.
    pub fn is_masked(&self, index: usize) -> Result<bool, InterruptError> {
        let state = lock(&self.state);
        let s = state.get(index).ok_or_else(|| self.invalid(index))?;
        Ok(s.masked)
    }

    /// The message last configured on vector `index` (`None` until configured).
    pub fn message(&self, index: usize) -> Result<Option<MsiMessage>, InterruptError> {
        let state = lock(&self.state);
        let s = state.get(index).ok_or_else(|| self.invalid(index))?;
        Ok(s.message)
    }

    /// Removes vector `index`'s route (e.g. on device reset): it no longer delivers until
    /// configured again. Its mask state is unchanged.
    pub fn unconfigure(&self, index: usize) -> Result<(), InterruptError> {
        self.set_route(index, None, None)
    }

    /// While vector `index` is masked: consumes the triggers latched since it was masked and
    /// reports whether there were any (the MSI-X pending bit). They are then not delivered at
    /// unmask. Returns `false` for an unmasked vector.
    pub fn take_pending(&self, index: usize) -> Result<bool, InterruptError> {
        let vector = self.vector(index)?;
        let state = lock(&self.state);
        let s = state.get(index).ok_or_else(|| self.invalid(index))?;
        if !s.masked {
            return Ok(false);
        }
        vector.drain()
    }

    /// Installs (`Some`) or removes (`None`) the route of vector `index`, keeping the irqfd
    /// registered exactly while the vector is routed and unmasked.
    fn set_route(
        &self,
        index: usize,
        route: Option<MsiRoute>,
        message: Option<MsiMessage>,
    ) -> Result<(), InterruptError> {
        let vector = self.vector(index)?;
        let shared = &*self.shared;
        let mut state = lock(&self.state);
        let s = state.get_mut(index).ok_or_else(|| self.invalid(index))?;
        let gsi = vector.gsi;
        let set = |r: Option<MsiRoute>| {
            shared.update_routes(|t| {
                let previous = t.set_msi_route(gsi, r)?;
                Ok((previous, previous != r))
            })
        };
        match route {
            Some(_) => {
                let previous = set(route)?;
                if !s.routed {
                    // Triggers from before the vector was routed are discarded.
                    let result = vector.drain().and_then(|_| {
                        if s.masked {
                            Ok(())
                        } else {
                            vector.register(shared)
                        }
                    });
                    if let Err(e) = result {
                        if let Err(undo) = set(previous) {
                            log::error!("GSI {gsi}: cannot restore the previous route: {undo}");
                        }
                        return Err(e);
                    }
                    s.routed = true;
                }
            }
            None => {
                if s.routed {
                    if s.armed() {
                        // Before the route goes, so that triggers KVM already saw are still
                        // delivered and none is left to a route that no longer exists.
                        vector.deregister(shared)?;
                    }
                    if let Err(e) = set(None) {
                        if s.armed() {
                            if let Err(undo) = vector.register(shared) {
                                log::error!("GSI {gsi}: cannot re-register the irqfd: {undo}");
                            }
                        }
                        return Err(e);
                    }
                    s.routed = false;
                }
            }
        }
        s.message = message;
        Ok(())
    }
}

impl MsiVectors for KvmMsiVectors {
    fn len(&self) -> usize {
        self.vectors.len()
    }

    fn configure(&self, index: usize, message: MsiMessage) -> Result<(), InterruptError> {
        let route = x86_msi_route(message, self.shared.x2apic_format);
        if route.is_none() {
            log::debug!(
                "MSI vector {index}: {message:x?} is not an x86 interrupt message; vector left unrouted"
            );
        }
        self.set_route(index, route, Some(message))
    }

    fn set_masked(&self, index: usize, masked: bool) -> Result<(), InterruptError> {
        let vector = self.vector(index)?;
        let mut state = lock(&self.state);
        let s = state.get_mut(index).ok_or_else(|| self.invalid(index))?;
        if s.masked == masked {
            return Ok(());
        }
        if s.routed {
            if masked {
                vector.deregister(&self.shared)?;
            } else {
                vector.register(&self.shared)?;
            }
        }
        s.masked = masked;
        Ok(())
    }

    fn trigger(&self, index: usize) -> Result<(), InterruptError> {
        self.vector(index)?.event.write(1)?;
        Ok(())
    }

    fn notifier(&self, index: usize) -> Option<&EventFd> {
        self.vectors.get(index).map(|v| &v.event)
    }
}

impl Drop for KvmMsiVectors {
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (vector, s) in self.vectors.iter().zip(state.iter()) {
            if s.armed() {
                // Should it fail, closing the eventfd below still detaches the irqfd
                // (KVM drops an irqfd whose eventfd is closed).
                if let Err(e) = vector.deregister(&self.shared) {
                    log::warn!("MSI GSI {}: {e}", vector.gsi);
                }
            }
        }
        let gsis: Vec<u32> = self.vectors.iter().map(|v| v.gsi).collect();
        // If the kernel refuses the new table, the GSIs stay allocated (leaked) with their
        // routes, so they are never handed out again while a stale route exists.
        let result = self.shared.update_routes(|t| {
            let mut changed = false;
            for &gsi in &gsis {
                changed |= t.release_msi(gsi)?;
            }
            Ok(((), changed))
        });
        if let Err(e) = result {
            log::error!("freeing MSI GSIs {gsis:?} failed, they stay allocated: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(address: u64, data: u32) -> MsiMessage {
        MsiMessage { address, data }
    }

    #[test]
    fn plain_xapic_message_passes_unchanged() {
        let r = x86_msi_route(msg(0xfee1_2000, 0x41), true).unwrap();
        assert_eq!(
            r,
            MsiRoute {
                address_lo: 0xfee1_2000,
                address_hi: 0,
                data: 0x41
            }
        );
        assert_eq!(x86_msi_route(msg(0xfee1_2000, 0x41), false), Some(r));
    }

    #[test]
    fn extended_destination_id_moves_to_address_high() {
        // APIC ID 0x12c: low byte 0x2c in bits 19:12, bits 14:8 (= 1) in address bits 11:5.
        let m = msg(0xfee2_c000 | (1 << 5), 0x30);
        assert_eq!(m.x86_destination(), 0x12c);
        let r = x86_msi_route(m, true).unwrap();
        assert_eq!(
            r,
            MsiRoute {
                address_lo: 0xfee2_c000,
                address_hi: 0x100,
                data: 0x30
            }
        );
        // What KVM computes with the x2APIC format: lo[19:12] | hi[31:8].
        let kvm_dest = ((r.address_lo >> 12) & 0xff) | (r.address_hi & 0xffff_ff00);
        assert_eq!(kvm_dest, 0x12c);
        // Highest extended ID: 0x7fff.
        let r = x86_msi_route(msg(0xfeef_f000 | (0x7f << 5), 0), true).unwrap();
        assert_eq!(
            ((r.address_lo >> 12) & 0xff) | (r.address_hi & 0xffff_ff00),
            0x7fff
        );
    }

    #[test]
    fn x2apic_high_destination_passes_unchanged() {
        let m = msg((0x0001_2300u64 << 32) | 0xfee4_5000, 0x55);
        let r = x86_msi_route(m, true).unwrap();
        assert_eq!(
            r,
            MsiRoute {
                address_lo: 0xfee4_5000,
                address_hi: 0x0001_2300,
                data: 0x55
            }
        );
        assert_eq!(
            ((r.address_lo >> 12) & 0xff) | (r.address_hi & 0xffff_ff00),
            m.x86_destination()
        );
        // With high destination bits present the low extended bits are left alone.
        let m = msg((0x100u64 << 32) | 0xfee0_0000 | (3 << 5), 0);
        assert_eq!(x86_msi_route(m, true).unwrap().address_lo, 0xfee0_0060);
    }

    #[test]
    fn remappable_format_is_not_swizzled() {
        let m = msg(
            u64::from(0xfee0_0000 | MSI_ADDR_REMAPPABLE | (5 << 5)),
            0x10,
        );
        let r = x86_msi_route(m, true).unwrap();
        assert_eq!(r.address_lo, 0xfee0_00b0);
        assert_eq!(r.address_hi, 0);
    }

    #[test]
    fn non_interrupt_addresses_are_unrouted() {
        // Outside the 0xFEExxxxx window: an ordinary DMA write, not an interrupt.
        assert_eq!(x86_msi_route(msg(0, 0x41), true), None);
        assert_eq!(x86_msi_route(msg(0xfed0_0000, 0x41), true), None);
        assert_eq!(x86_msi_route(msg(0xfef0_0000, 0x41), false), None);
        // High word bits 7:0 would make KVM reject the whole table.
        assert_eq!(
            x86_msi_route(msg((1u64 << 32) | 0xfee0_0000, 0x41), true),
            None
        );
        // Without the x2APIC API any high word is not an interrupt address.
        assert_eq!(
            x86_msi_route(msg((0x100u64 << 32) | 0xfee0_0000, 0x41), false),
            None
        );
    }

    #[test]
    fn legacy_format_keeps_extended_bits() {
        let m = msg(0xfee2_c000 | (1 << 5), 0x30);
        let r = x86_msi_route(m, false).unwrap();
        assert_eq!(r.address_lo, 0xfee2_c020);
        assert_eq!(r.address_hi, 0);
    }
}
