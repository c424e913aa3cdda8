// SPDX-License-Identifier: Apache-2.0 OR MIT
//! GSI routing table bookkeeping: pure code, no KVM.
//!
//! KVM keeps one routing table per VM that maps each GSI (global system interrupt) to one or
//! more targets: a pin on the in-kernel PIC or IOAPIC, or an MSI message. `KVM_SET_GSI_ROUTING`
//! replaces the whole table at once, so the table is kept here in full and re-applied on every
//! change. [`GsiRoutingTable`] holds:
//!
//! - the fixed default routes ([`default_routes`]): ISA IRQs 0–15 to PIC pins (master 0–7,
//!   slave 8–15; IRQ 2, the cascade input, is left off) and GSIs 1 and 3–23 to the IOAPIC pin of the same number, GSI 0 (the PIT) to IOAPIC pin 2;
//! - MSI GSIs, allocated from [`FIRST_MSI_GSI`] (24) upward. An allocated GSI carries an MSI
//!   route only once it is configured; until then it has no route, so an irqfd on it
//!   delivers nothing.
//!
//! Capacity: a GSI must be below the KVM limit (`KVM_CAP_IRQ_ROUTING`, 4096 on current kernels)
//! and the whole table may hold at most as many entries. Every allocated GSI counts against
//! the entry budget whether configured or not, so configuring an allocated GSI never runs out
//! of room.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use vmkit_device::interrupt::InterruptError;

/// Number of IOAPIC input pins; GSIs `0..IOAPIC_PINS` are legacy lines.
pub const IOAPIC_PINS: u32 = 24;

/// Number of ISA IRQs that also reach the 8259 PIC pair.
pub const PIC_IRQS: u32 = 16;

/// The PIC cascade input: ISA IRQ 2 has no PIC route.
pub const PIC_CASCADE_IRQ: u32 = 2;

/// The first GSI handed out for MSI routes.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

/// The kernel's bound on the table size and on GSI numbers (`KVM_MAX_IRQ_ROUTES`).
pub const KVM_MAX_GSI_ROUTES: usize = kvm_bindings::KVM_MAX_IRQ_ROUTES;

/// An in-kernel interrupt controller chip that a GSI can be routed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqChip {
    /// The master 8259 PIC (ISA IRQs 0–7).
    PicMaster,
    /// The slave 8259 PIC (ISA IRQs 8–15).
    PicSlave,
    /// The IOAPIC (24 pins).
    Ioapic,
}

impl IrqChip {
    fn kvm_id(self) -> u32 {
        match self {
            IrqChip::PicMaster => KVM_IRQCHIP_PIC_MASTER,
            IrqChip::PicSlave => KVM_IRQCHIP_PIC_SLAVE,
            IrqChip::Ioapic => KVM_IRQCHIP_IOAPIC,
        }
    }
}

/// An MSI route as KVM stores it: the message address halves and data.
///
/// Build one from a guest-programmed message with [`crate::x86_msi_route`], which applies the
/// x2APIC / extended destination ID conventions KVM expects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiRoute {
    /// Low 32 bits of the message address.
    pub address_lo: u32,
    /// High 32 bits of the message address (destination ID bits 31:8 in KVM's x2APIC format).
    pub address_hi: u32,
    /// Message data.
    pub data: u32,
}

/// Where a GSI is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// A pin of an in-kernel interrupt controller.
    Irqchip {
        /// The chip.
        chip: IrqChip,
        /// The pin on that chip (0–7 on a PIC, 0–23 on the IOAPIC).
        pin: u32,
    },
    /// An MSI message.
    Msi(MsiRoute),
}

/// One entry of the routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteEntry {
    /// The GSI this entry routes.
    pub gsi: u32,
    /// Its target.
    pub route: Route,
}

impl RouteEntry {
    /// The entry in KVM's `kvm_irq_routing_entry` form.
    pub fn to_kvm(&self) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry {
            gsi: self.gsi,
            ..Default::default()
        };
        match self.route {
            Route::Irqchip { chip, pin } => {
                e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                e.u.irqchip.irqchip = chip.kvm_id();
                e.u.irqchip.pin = pin;
            }
            Route::Msi(m) => {
                e.type_ = KVM_IRQ_ROUTING_MSI;
                e.u.msi.address_lo = m.address_lo;
                e.u.msi.address_hi = m.address_hi;
                e.u.msi.data = m.data;
            }
        }
        e
    }
}

/// The fixed routes for legacy lines (38 entries), as on a PC and as QEMU sets them up:
/// ISA IRQs 0–15 (except the cascade, 2) to the PICs; GSI 0 — where KVM's in-kernel PIT
/// fires — to IOAPIC pin 2, matching the IRQ0 -> GSI2 interrupt source override that
/// vmkit-boot puts in the MADT and MP table; GSIs 1 and 3–23 to the IOAPIC pin of the same
/// number. GSI 2 has no route (the PIC cascade, and IOAPIC pin 2 belongs to the timer).
pub fn default_routes() -> impl Iterator<Item = RouteEntry> {
    let pic = (0..PIC_IRQS)
        .filter(|&irq| irq != PIC_CASCADE_IRQ)
        .map(|irq| RouteEntry {
            gsi: irq,
            route: Route::Irqchip {
                chip: if irq < 8 {
                    IrqChip::PicMaster
                } else {
                    IrqChip::PicSlave
                },
                pin: irq % 8,
            },
        });
    let ioapic = (0..IOAPIC_PINS)
        .filter(|&gsi| gsi != TIMER_IOAPIC_PIN)
        .map(|gsi| RouteEntry {
            gsi,
            route: Route::Irqchip {
                chip: IrqChip::Ioapic,
                pin: if gsi == 0 { TIMER_IOAPIC_PIN } else { gsi },
            },
        });
    pic.chain(ioapic)
}

/// Number of entries [`default_routes`] yields.
pub const DEFAULT_ROUTE_COUNT: usize = (PIC_IRQS - 1 + IOAPIC_PINS - 1) as usize;

/// The IOAPIC pin the ISA timer (IRQ 0, KVM's PIT on GSI 0) is wired to.
pub const TIMER_IOAPIC_PIN: u32 = 2;

/// The VM's GSI routing table: default legacy routes plus allocated MSI GSIs.
///
/// Changes are made on a copy and the copy replaces the original only after KVM accepted it
/// (see [`crate::KvmIrqChip`]), so a failed `KVM_SET_GSI_ROUTING` leaves both in step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GsiRoutingTable {
    /// Exclusive upper bound for GSI numbers.
    gsi_limit: u32,
    /// Maximum number of entries in the table.
    max_entries: usize,
    /// Allocated MSI GSIs and, once configured, their route.
    msi: BTreeMap<u32, Option<MsiRoute>>,
}

impl GsiRoutingTable {
    /// A table with only the default routes, for a kernel that accepts GSIs below
    /// `gsi_limit` and at most `max_entries` entries (both clamped to
    /// [`KVM_MAX_GSI_ROUTES`]).
    ///
    /// Fails if the limits leave no room for the default routes.
    pub fn new(gsi_limit: u32, max_entries: usize) -> Result<Self, InterruptError> {
        let gsi_limit = gsi_limit.min(KVM_MAX_GSI_ROUTES as u32);
        let max_entries = max_entries.min(KVM_MAX_GSI_ROUTES);
        if gsi_limit < IOAPIC_PINS || max_entries < DEFAULT_ROUTE_COUNT {
            return Err(InterruptError::Exhausted(format!(
                "KVM allows {max_entries} routes below GSI {gsi_limit}; the legacy routes alone \
                 need {DEFAULT_ROUTE_COUNT} routes on GSIs 0..{IOAPIC_PINS}"
            )));
        }
        Ok(GsiRoutingTable {
            gsi_limit,
            max_entries,
            msi: BTreeMap::new(),
        })
    }

    /// Exclusive upper bound for GSI numbers.
    pub fn gsi_limit(&self) -> u32 {
        self.gsi_limit
    }

    /// How many MSI GSIs this table can hold at most.
    pub fn msi_capacity(&self) -> usize {
        let by_number = (self.gsi_limit - FIRST_MSI_GSI) as usize;
        let by_entries = self.max_entries - DEFAULT_ROUTE_COUNT;
        by_number.min(by_entries)
    }

    /// How many MSI GSIs are allocated.
    pub fn msi_allocated(&self) -> usize {
        self.msi.len()
    }

    /// How many more MSI GSIs can be allocated.
    pub fn msi_available(&self) -> usize {
        self.msi_capacity() - self.msi.len()
    }

    /// Whether `gsi` is an allocated MSI GSI.
    pub fn is_msi_allocated(&self, gsi: u32) -> bool {
        self.msi.contains_key(&gsi)
    }

    /// Allocates `count` MSI GSIs, lowest free numbers first (they need not be contiguous).
    /// All or nothing: on [`InterruptError::Exhausted`] nothing is allocated.
    pub fn allocate_msi(&mut self, count: usize) -> Result<Vec<u32>, InterruptError> {
        let available = self.msi_available();
        if count > available {
            return Err(InterruptError::Exhausted(format!(
                "{count} MSI GSIs requested, {available} of {} left",
                self.msi_capacity()
            )));
        }
        let mut out = Vec::with_capacity(count);
        let mut candidate = FIRST_MSI_GSI;
        while out.len() < count && candidate < self.gsi_limit {
            if !self.msi.contains_key(&candidate) {
                out.push(candidate);
            }
            candidate += 1;
        }
        if out.len() < count {
            // Unreachable while msi_capacity() is consistent with gsi_limit; kept as an
            // error rather than a panic.
            return Err(InterruptError::Exhausted(format!(
                "no free GSI below {} for {count} MSI vectors",
                self.gsi_limit
            )));
        }
        for &gsi in &out {
            self.msi.insert(gsi, None);
        }
        Ok(out)
    }

    /// Frees an allocated MSI GSI; returns whether it had a route (so the table in the
    /// kernel changes).
    pub fn release_msi(&mut self, gsi: u32) -> Result<bool, InterruptError> {
        match self.msi.remove(&gsi) {
            Some(route) => Ok(route.is_some()),
            None => Err(InterruptError::InvalidLine(gsi)),
        }
    }

    /// The route of an allocated MSI GSI (`None` while unconfigured).
    pub fn msi_route(&self, gsi: u32) -> Result<Option<MsiRoute>, InterruptError> {
        self.msi
            .get(&gsi)
            .copied()
            .ok_or(InterruptError::InvalidLine(gsi))
    }

    /// Sets (or with `None` removes) the route of an allocated MSI GSI; returns the previous
    /// route.
    pub fn set_msi_route(
        &mut self,
        gsi: u32,
        route: Option<MsiRoute>,
    ) -> Result<Option<MsiRoute>, InterruptError> {
        let slot = self
            .msi
            .get_mut(&gsi)
            .ok_or(InterruptError::InvalidLine(gsi))?;
        Ok(std::mem::replace(slot, route))
    }

    /// Every entry of the table: the default routes, then the configured MSI routes by GSI.
    pub fn entries(&self) -> Vec<RouteEntry> {
        let msi = self.msi.iter().filter_map(|(&gsi, route)| {
            route.map(|m| RouteEntry {
                gsi,
                route: Route::Msi(m),
            })
        });
        default_routes().chain(msi).collect()
    }

    /// The table in the form `KVM_SET_GSI_ROUTING` takes.
    pub fn to_kvm(&self) -> Result<KvmIrqRouting, InterruptError> {
        let entries: Vec<kvm_irq_routing_entry> =
            self.entries().iter().map(RouteEntry::to_kvm).collect();
        KvmIrqRouting::from_entries(&entries).map_err(|e| {
            InterruptError::Exhausted(format!(
                "routing table of {} entries does not fit KVM's limit: {e:?}",
                entries.len()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(data: u32) -> MsiRoute {
        MsiRoute {
            address_lo: 0xfee0_0000,
            address_hi: 0,
            data,
        }
    }

    #[test]
    fn default_routes_cover_pic_and_ioapic() {
        let routes: Vec<RouteEntry> = default_routes().collect();
        assert_eq!(routes.len(), DEFAULT_ROUTE_COUNT);
        assert_eq!(routes.len(), 38);
        // The PIT's GSI 0 reaches PIC pin 0 and IOAPIC pin 2; nothing is routed on GSI 2.
        let gsi0: Vec<Route> = routes
            .iter()
            .filter(|r| r.gsi == 0)
            .map(|r| r.route)
            .collect();
        assert_eq!(
            gsi0,
            vec![
                Route::Irqchip {
                    chip: IrqChip::PicMaster,
                    pin: 0
                },
                Route::Irqchip {
                    chip: IrqChip::Ioapic,
                    pin: 2
                }
            ]
        );
        assert!(!routes.iter().any(|r| r.gsi == 2));
        // No PIC route for the cascade input.
        assert!(!routes.iter().any(|r| r.gsi == 2
            && matches!(
                r.route,
                Route::Irqchip {
                    chip: IrqChip::PicMaster | IrqChip::PicSlave,
                    ..
                }
            )));
        // IRQ 9 goes to slave pin 1 and IOAPIC pin 9.
        let gsi9: Vec<Route> = routes
            .iter()
            .filter(|r| r.gsi == 9)
            .map(|r| r.route)
            .collect();
        assert_eq!(
            gsi9,
            vec![
                Route::Irqchip {
                    chip: IrqChip::PicSlave,
                    pin: 1
                },
                Route::Irqchip {
                    chip: IrqChip::Ioapic,
                    pin: 9
                }
            ]
        );
        // GSIs 16..24 reach only the IOAPIC.
        for gsi in 16..24 {
            let n = routes.iter().filter(|r| r.gsi == gsi).count();
            assert_eq!(n, 1, "gsi {gsi}");
        }
        // Every other IOAPIC pin has exactly one route, on the GSI of the same number.
        for pin in (1..IOAPIC_PINS).filter(|&p| p != TIMER_IOAPIC_PIN) {
            assert!(routes.contains(&RouteEntry {
                gsi: pin,
                route: Route::Irqchip {
                    chip: IrqChip::Ioapic,
                    pin
                }
            }));
        }
    }

    #[test]
    fn allocation_starts_at_24_and_reuses_freed_gsis() {
        let mut t = GsiRoutingTable::new(4096, 4096).unwrap();
        assert_eq!(t.allocate_msi(3).unwrap(), vec![24, 25, 26]);
        assert_eq!(t.allocate_msi(2).unwrap(), vec![27, 28]);
        assert!(!t.release_msi(25).unwrap());
        assert!(!t.release_msi(27).unwrap());
        assert_eq!(t.allocate_msi(3).unwrap(), vec![25, 27, 29]);
        assert_eq!(t.msi_allocated(), 6);
        // Double free and freeing a legacy GSI are errors.
        assert!(matches!(
            t.release_msi(100),
            Err(InterruptError::InvalidLine(100))
        ));
        assert!(matches!(
            t.release_msi(4),
            Err(InterruptError::InvalidLine(4))
        ));
    }

    #[test]
    fn capacity_is_bounded_by_gsi_limit_and_entry_count() {
        // Entry budget binds: 4096 - 38 default entries.
        let t = GsiRoutingTable::new(4096, 4096).unwrap();
        assert_eq!(t.msi_capacity(), 4096 - 38);
        // GSI numbers bind.
        let t = GsiRoutingTable::new(64, 4096).unwrap();
        assert_eq!(t.msi_capacity(), 40);
        // Limits above KVM's are clamped.
        let t = GsiRoutingTable::new(u32::MAX, usize::MAX).unwrap();
        assert_eq!(t.gsi_limit(), 4096);
        // Too small for the legacy routes.
        assert!(GsiRoutingTable::new(16, 4096).is_err());
        assert!(GsiRoutingTable::new(4096, 10).is_err());
        // Exactly the legacy routes: no MSI room.
        let mut t = GsiRoutingTable::new(24, 39).unwrap();
        assert_eq!(t.msi_capacity(), 0);
        assert!(matches!(
            t.allocate_msi(1),
            Err(InterruptError::Exhausted(_))
        ));
        assert_eq!(t.allocate_msi(0).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn exhaustion_is_all_or_nothing() {
        let mut t = GsiRoutingTable::new(34, 4096).unwrap();
        assert_eq!(t.msi_capacity(), 10);
        t.allocate_msi(8).unwrap();
        let before = t.clone();
        assert!(matches!(
            t.allocate_msi(3),
            Err(InterruptError::Exhausted(_))
        ));
        assert_eq!(t, before);
        assert_eq!(t.allocate_msi(2).unwrap(), vec![32, 33]);
        assert_eq!(t.msi_available(), 0);
        assert!(t.allocate_msi(1).is_err());
        assert!(!t.release_msi(30).unwrap());
        assert_eq!(t.allocate_msi(1).unwrap(), vec![30]);
    }

    #[test]
    fn fill_to_the_kernel_limit_and_build_the_kvm_table() {
        let mut t = GsiRoutingTable::new(4096, 4096).unwrap();
        let cap = t.msi_capacity();
        let gsis = t.allocate_msi(cap).unwrap();
        assert_eq!(gsis.len(), cap);
        assert_eq!(*gsis.last().unwrap(), FIRST_MSI_GSI + cap as u32 - 1);
        for &gsi in &gsis {
            t.set_msi_route(gsi, Some(route(gsi))).unwrap();
        }
        let kvm = t.to_kvm().unwrap();
        assert_eq!(kvm.as_slice().len(), KVM_MAX_GSI_ROUTES);
        assert!(t.allocate_msi(1).is_err());
    }

    #[test]
    fn only_configured_msi_gsis_have_entries() {
        let mut t = GsiRoutingTable::new(4096, 4096).unwrap();
        let gsis = t.allocate_msi(3).unwrap();
        assert_eq!(t.entries().len(), DEFAULT_ROUTE_COUNT);
        assert_eq!(t.set_msi_route(gsis[1], Some(route(0x41))).unwrap(), None);
        let entries = t.entries();
        assert_eq!(entries.len(), DEFAULT_ROUTE_COUNT + 1);
        assert_eq!(
            entries.last().copied(),
            Some(RouteEntry {
                gsi: 25,
                route: Route::Msi(route(0x41))
            })
        );
        assert_eq!(t.msi_route(25).unwrap(), Some(route(0x41)));
        assert_eq!(t.msi_route(24).unwrap(), None);
        assert!(t.msi_route(3).is_err());
        // Replacing returns the old route; removing leaves the GSI allocated.
        assert_eq!(
            t.set_msi_route(25, Some(route(0x42))).unwrap(),
            Some(route(0x41))
        );
        assert_eq!(t.set_msi_route(25, None).unwrap(), Some(route(0x42)));
        assert!(t.is_msi_allocated(25));
        assert_eq!(t.entries().len(), DEFAULT_ROUTE_COUNT);
        // Routes on unallocated or legacy GSIs are refused.
        assert!(t.set_msi_route(5, Some(route(1))).is_err());
        assert!(t.set_msi_route(99, Some(route(1))).is_err());
        // Releasing a configured GSI reports that the kernel table changes.
        t.set_msi_route(26, Some(route(0x43))).unwrap();
        assert!(t.release_msi(26).unwrap());
        assert_eq!(t.entries().len(), DEFAULT_ROUTE_COUNT);
    }

    #[test]
    fn kvm_form_of_entries() {
        let pic = RouteEntry {
            gsi: 9,
            route: Route::Irqchip {
                chip: IrqChip::PicSlave,
                pin: 1,
            },
        }
        .to_kvm();
        assert_eq!(pic.gsi, 9);
        assert_eq!(pic.type_, KVM_IRQ_ROUTING_IRQCHIP);
        // SAFETY: the entry was built as an irqchip route, so `irqchip` is the live member.
        let (chip, pin) = unsafe { (pic.u.irqchip.irqchip, pic.u.irqchip.pin) };
        assert_eq!((chip, pin), (KVM_IRQCHIP_PIC_SLAVE, 1));

        let msi = RouteEntry {
            gsi: 30,
            route: Route::Msi(MsiRoute {
                address_lo: 0xfee0_1000,
                address_hi: 0x100,
                data: 0x4041,
            }),
        }
        .to_kvm();
        assert_eq!(msi.type_, KVM_IRQ_ROUTING_MSI);
        assert_eq!(msi.flags, 0);
        // SAFETY: the entry was built as an MSI route, so `msi` is the live member.
        let m = unsafe { msi.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 0x100, 0x4041)
        );
    }
}
