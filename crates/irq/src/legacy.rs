// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Legacy interrupt lines (ISA IRQs, PCI INTx) on KVM: an irqfd on an IOAPIC/PIC GSI.
//!
//! - **Edge** lines register a plain irqfd: each [`trigger`](InterruptLine::trigger) (an
//!   eventfd write) makes KVM pulse the GSI once.
//! - **Level** lines register the irqfd with a resample eventfd (`KVM_IRQFD_FLAG_RESAMPLE`):
//!   `trigger` asserts the GSI and KVM keeps it asserted until the guest acknowledges the
//!   interrupt (EOI at the IOAPIC, or the PIC); KVM then deasserts it and signals
//!   [`resample_event`](InterruptLine::resample_event). A device whose condition is still
//!   pending triggers again. Several level lines may share a GSI (PCI INTx sharing): each
//!   has its own irqfd and resample eventfd.
//! - [`set_level`](InterruptLine::set_level) on a level line drives the GSI with
//!   `KVM_IRQ_LINE` instead, for devices that hold a level explicitly (the line stays
//!   asserted until `set_level(false)`, across EOIs). The lines sharing a GSI are wire-ORed:
//!   KVM sees the GSI asserted while at least one of them is. Edge lines refuse `set_level`.
//!
//! Dropping a line deregisters its irqfd and releases any level it still asserts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmkit_device::interrupt::{InterruptError, InterruptLine, TriggerMode};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::chip::{lock, Shared};
use crate::error::kvm_io;
use crate::routing::IOAPIC_PINS;

/// A legacy interrupt line on a KVM GSI; see the [module docs](self).
#[derive(Debug)]
pub struct KvmLegacyLine {
    shared: Arc<Shared>,
    gsi: u32,
    mode: TriggerMode,
    event: EventFd,
    resample: Option<EventFd>,
    /// Whether this line asserts the GSI through `set_level`; changed only under
    /// `shared.levels`.
    asserted: AtomicBool,
}

impl KvmLegacyLine {
    pub(crate) fn new(
        shared: Arc<Shared>,
        gsi: u32,
        mode: TriggerMode,
    ) -> Result<Self, InterruptError> {
        // GSI 2 has no route: it is the PIC cascade, and IOAPIC pin 2 carries the timer.
        if gsi >= IOAPIC_PINS || gsi == crate::routing::TIMER_IOAPIC_PIN {
            return Err(InterruptError::InvalidLine(gsi));
        }
        let event = EventFd::new(EFD_NONBLOCK)?;
        let resample = match mode {
            TriggerMode::Edge => {
                shared
                    .vm
                    .register_irqfd(&event, gsi)
                    .map_err(|e| kvm_io("KVM_IRQFD", e))?;
                None
            }
            TriggerMode::Level => {
                if !shared.irqfd_resample {
                    return Err(InterruptError::Unsupported(
                        "level-triggered lines need KVM_CAP_IRQFD_RESAMPLE",
                    ));
                }
                let resample = EventFd::new(EFD_NONBLOCK)?;
                shared
                    .vm
                    .register_irqfd_with_resample(&event, &resample, gsi)
                    .map_err(|e| kvm_io("KVM_IRQFD(resample)", e))?;
                Some(resample)
            }
        };
        Ok(KvmLegacyLine {
            shared,
            gsi,
            mode,
            event,
            resample,
            asserted: AtomicBool::new(false),
        })
    }

    /// The GSI this line drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Applies this line's `set_level` state change to the wire-OR of its GSI.
    fn drive(&self, asserted: bool) -> Result<(), InterruptError> {
        let mut levels = lock(&self.shared.levels);
        let count = levels
            .get_mut(self.gsi as usize)
            .ok_or(InterruptError::InvalidLine(self.gsi))?;
        if self.asserted.load(Ordering::Relaxed) == asserted {
            return Ok(());
        }
        let new = if asserted {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
        if (*count == 0) != (new == 0) {
            self.shared
                .vm
                .set_irq_line(self.gsi, new != 0)
                .map_err(|e| kvm_io("KVM_IRQ_LINE", e))?;
        }
        *count = new;
        self.asserted.store(asserted, Ordering::Relaxed);
        Ok(())
    }
}

impl InterruptLine for KvmLegacyLine {
    fn trigger_mode(&self) -> TriggerMode {
        self.mode
    }

    fn trigger(&self) -> Result<(), InterruptError> {
        self.event.write(1)?;
        Ok(())
    }

    fn set_level(&self, asserted: bool) -> Result<(), InterruptError> {
        match self.mode {
            TriggerMode::Edge => Err(InterruptError::Unsupported(
                "set_level on an edge-triggered line",
            )),
            TriggerMode::Level => self.drive(asserted),
        }
    }

    fn event(&self) -> Option<&EventFd> {
        Some(&self.event)
    }

    fn resample_event(&self) -> Option<&EventFd> {
        self.resample.as_ref()
    }
}

impl Drop for KvmLegacyLine {
    fn drop(&mut self) {
        if let Err(e) = self.shared.vm.unregister_irqfd(&self.event, self.gsi) {
            log::warn!("GSI {}: KVM_IRQFD(deassign) failed: {e}", self.gsi);
        }
        if self.mode == TriggerMode::Level {
            if let Err(e) = self.drive(false) {
                log::warn!("GSI {}: releasing the line level failed: {e}", self.gsi);
            }
        }
    }
}
