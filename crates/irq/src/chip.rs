// SPDX-License-Identifier: Apache-2.0 OR MIT
//! [`KvmIrqChip`]: the VM's interrupt manager on the in-kernel irqchip.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_bindings::{kvm_irqchip, kvm_msi, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::{Cap, VmFd};
use vmkit_device::interrupt::{
    InterruptError, InterruptLine, InterruptManager, MsiMessage, MsiVectors, TriggerMode,
};

use crate::error::{kvm_io, kvm_op, IrqError};
use crate::legacy::KvmLegacyLine;
use crate::msi::{x86_msi_route, KvmMsiVectors};
use crate::routing::{GsiRoutingTable, RouteEntry, IOAPIC_PINS};
use crate::setup::{setup_vm, IrqChipInfo};

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the guarded data
/// is only changed by whole-value assignments, so it stays consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the chip and the lines and groups it handed out.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) vm: Arc<VmFd>,
    pub(crate) x2apic_format: bool,
    pub(crate) irqfd_resample: bool,
    pit: bool,
    /// The routing table; its lock also serialises `KVM_SET_GSI_ROUTING`.
    routes: Mutex<GsiRoutingTable>,
    /// Per legacy GSI: how many lines assert it through `set_level`.
    pub(crate) levels: Mutex<[u32; IOAPIC_PINS as usize]>,
}

impl Shared {
    /// Runs `change` on a copy of the routing table. If it reports that the kernel's table
    /// changes, the copy is applied with `KVM_SET_GSI_ROUTING` first; the copy replaces the
    /// table only if that succeeded, so a failure leaves everything as it was.
    pub(crate) fn update_routes<R>(
        &self,
        change: impl FnOnce(&mut GsiRoutingTable) -> Result<(R, bool), InterruptError>,
    ) -> Result<R, InterruptError> {
        let mut table = lock(&self.routes);
        let mut next = table.clone();
        let (result, kernel_changes) = change(&mut next)?;
        if kernel_changes {
            self.commit(&next)?;
        }
        *table = next;
        Ok(result)
    }

    fn commit(&self, table: &GsiRoutingTable) -> Result<(), InterruptError> {
        let routing = table.to_kvm()?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| kvm_io("KVM_SET_GSI_ROUTING", e))
    }
}

/// The VM's interrupt manager on KVM's in-kernel irqchip: owns the GSI routing table and
/// hands out [`KvmLegacyLine`]s and [`KvmMsiVectors`] groups.
///
/// It must be the only user of `KVM_SET_GSI_ROUTING` on its VM (the table is replaced as a
/// whole). Cloning is cheap and yields a handle to the same table. Lines and groups keep the
/// table alive; dropping them frees their GSIs.
///
/// Call order: [`setup_vm`] → [`KvmIrqChip::new`] → create vCPUs (or [`KvmIrqChip::create`],
/// which does the first two, then vCPUs). Lines and groups can be created at any time after.
#[derive(Clone, Debug)]
pub struct KvmIrqChip {
    shared: Arc<Shared>,
}

impl KvmIrqChip {
    /// Runs [`setup_vm`] (irqchip, PIT, x2APIC API, TSS and identity map at their defaults)
    /// and then [`KvmIrqChip::new`]. Call before creating vCPUs.
    pub fn create(vm: Arc<VmFd>) -> Result<Self, IrqError> {
        let info = setup_vm(&vm)?;
        Self::new(vm, info)
    }

    /// Takes over the GSI routing of a VM on which [`crate::setup_vm`] (or
    /// [`crate::setup_vm_with`]) created the irqchip, and installs the default legacy routes
    /// (see [`crate::routing::default_routes`]). May be called before or after the vCPUs
    /// exist.
    pub fn new(vm: Arc<VmFd>, info: IrqChipInfo) -> Result<Self, IrqError> {
        if !vm.check_extension(Cap::Irqfd) {
            return Err(IrqError::MissingCapability("KVM_CAP_IRQFD"));
        }
        let max_routes = vm.check_extension_int(Cap::IrqRouting);
        let max_routes = u32::try_from(max_routes)
            .ok()
            .filter(|&n| n > 0)
            .ok_or(IrqError::MissingCapability("KVM_CAP_IRQ_ROUTING"))?;
        let table = GsiRoutingTable::new(max_routes, max_routes as usize)?;
        let shared = Shared {
            irqfd_resample: vm.check_extension(Cap::IrqfdResample),
            x2apic_format: info.x2apic_api,
            pit: info.pit,
            vm,
            routes: Mutex::new(table.clone()),
            levels: Mutex::new([0; IOAPIC_PINS as usize]),
        };
        let routing = table.to_kvm()?;
        shared
            .vm
            .set_gsi_routing(&routing)
            .map_err(kvm_op("KVM_SET_GSI_ROUTING"))?;
        Ok(KvmIrqChip {
            shared: Arc::new(shared),
        })
    }

    /// What the VM was set up with.
    pub fn info(&self) -> IrqChipInfo {
        IrqChipInfo {
            x2apic_api: self.shared.x2apic_format,
            pit: self.shared.pit,
        }
    }

    /// The VM this chip belongs to.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.shared.vm
    }

    /// Exclusive upper bound for GSI numbers (KVM's `KVM_CAP_IRQ_ROUTING`, at most 4096).
    pub fn gsi_limit(&self) -> u32 {
        lock(&self.shared.routes).gsi_limit()
    }

    /// How many MSI vectors (GSIs) the VM can have at most.
    pub fn msi_capacity(&self) -> usize {
        lock(&self.shared.routes).msi_capacity()
    }

    /// How many more MSI vectors can be allocated now.
    pub fn msi_available(&self) -> usize {
        lock(&self.shared.routes).msi_available()
    }

    /// The routing table as last applied to KVM.
    pub fn routes(&self) -> Vec<RouteEntry> {
        lock(&self.shared.routes).entries()
    }

    /// A legacy line on `gsi` (0..24, an IOAPIC pin; 0..16 except 2 also reach the PIC),
    /// with its concrete type. See [`KvmLegacyLine`].
    pub fn create_legacy_line(
        &self,
        gsi: u32,
        mode: TriggerMode,
    ) -> Result<KvmLegacyLine, InterruptError> {
        KvmLegacyLine::new(self.shared.clone(), gsi, mode)
    }

    /// A group of `count` MSI vectors (masked, unconfigured), with its concrete type. Fails
    /// with [`InterruptError::Exhausted`] if fewer than `count` GSIs are free.
    pub fn create_msi_vectors(&self, count: usize) -> Result<KvmMsiVectors, InterruptError> {
        let available = self.msi_available();
        if count > available {
            // Checked here too so that no eventfds are created for a hopeless request.
            return Err(InterruptError::Exhausted(format!(
                "{count} MSI vectors requested, {available} GSIs free"
            )));
        }
        KvmMsiVectors::new(self.shared.clone(), count)
    }

    /// Injects an MSI message once with `KVM_SIGNAL_MSI` (translated like a route, see
    /// [`x86_msi_route`]), without a GSI. Returns `Ok(true)` if delivered, `Ok(false)` if the
    /// guest blocked it or the message is not an x86 interrupt message.
    pub fn signal_msi(&self, message: MsiMessage) -> Result<bool, InterruptError> {
        let Some(route) = x86_msi_route(message, self.shared.x2apic_format) else {
            return Ok(false);
        };
        let msi = kvm_msi {
            address_lo: route.address_lo,
            address_hi: route.address_hi,
            data: route.data,
            ..Default::default()
        };
        let delivered = self
            .shared
            .vm
            .signal_msi(msi)
            .map_err(|e| kvm_io("KVM_SIGNAL_MSI", e))?;
        Ok(delivered > 0)
    }

    fn ioapic_state(&self) -> Result<kvm_irqchip, InterruptError> {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        self.shared
            .vm
            .get_irqchip(&mut chip)
            .map_err(|e| kvm_io("KVM_GET_IRQCHIP(IOAPIC)", e))?;
        Ok(chip)
    }

    /// Reads IOAPIC redirection entry `pin` (0..24) from the in-kernel IOAPIC. Normally the
    /// guest programs these; this is for firmware-less set-ups, debugging and tests.
    pub fn ioapic_redirection(&self, pin: u32) -> Result<u64, InterruptError> {
        let chip = self.ioapic_state()?;
        // SAFETY: KVM_GET_IRQCHIP with chip_id IOAPIC fills the `ioapic` member; every bit
        // pattern of the plain-integer struct is valid.
        let table = unsafe { chip.chip.ioapic.redirtbl };
        let entry = table
            .get(pin as usize)
            .ok_or(InterruptError::InvalidLine(pin))?;
        // SAFETY: `bits` covers the whole 8-byte union; any value is a valid u64.
        Ok(unsafe { entry.bits })
    }

    /// Writes IOAPIC redirection entry `pin` (0..24): vector in bits 7:0, delivery mode
    /// 10:8, destination mode 11, polarity 13, trigger mode 15 (1 = level), mask 16,
    /// destination 63:56 (read-modify-write of the IOAPIC state with `KVM_SET_IRQCHIP`).
    pub fn set_ioapic_redirection(&self, pin: u32, entry: u64) -> Result<(), InterruptError> {
        let mut chip = self.ioapic_state()?;
        // SAFETY: as in `ioapic_redirection`: the `ioapic` member is the one KVM filled and
        // is plain data; writing a u64 into the `bits` member of an entry is always valid.
        let slot = unsafe { chip.chip.ioapic.redirtbl.get_mut(pin as usize) }
            .ok_or(InterruptError::InvalidLine(pin))?;
        slot.bits = entry;
        self.shared
            .vm
            .set_irqchip(&chip)
            .map_err(|e| kvm_io("KVM_SET_IRQCHIP(IOAPIC)", e))
    }
}

impl InterruptManager for KvmIrqChip {
    fn legacy_line(
        &self,
        gsi: u32,
        mode: TriggerMode,
    ) -> Result<Arc<dyn InterruptLine>, InterruptError> {
        Ok(Arc::new(self.create_legacy_line(gsi, mode)?))
    }

    fn msi_vectors(&self, count: usize) -> Result<Arc<dyn MsiVectors>, InterruptError> {
        Ok(Arc::new(self.create_msi_vectors(count)?))
    }
}
