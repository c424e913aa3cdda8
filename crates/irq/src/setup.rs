// SPDX-License-Identifier: Apache-2.0 OR MIT
//! VM-level interrupt set-up that must happen before the first vCPU is created.
//!
//! [`setup_vm`] (or [`setup_vm_with`]) runs, in this order:
//!
//! 1. `KVM_SET_IDENTITY_MAP_ADDR` (one page, default [`DEFAULT_IDENTITY_MAP_ADDRESS`]) and
//!    `KVM_SET_TSS_ADDR` (three pages, default [`DEFAULT_TSS_ADDRESS`]): on Intel VMX these
//!    pages back real-mode emulation; they must lie outside guest RAM and every MMIO range.
//!    Both belong with VM set-up because KVM refuses the identity map once a vCPU exists.
//! 2. `KVM_CREATE_IRQCHIP`: in-kernel PIC pair, IOAPIC and per-vCPU local APICs. KVM refuses
//!    it once a vCPU exists; vCPUs created before it would have no in-kernel LAPIC.
//! 3. `KVM_CREATE_PIT2` with a dummy speaker port (optional).
//! 4. `KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)` with `KVM_X2APIC_API_USE_32BIT_IDS |
//!    KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK`, when KVM offers both flags. This is what lets a
//!    guest address APIC IDs of 255 and above (x2APIC IDs are 32 bits; MSI routes then carry
//!    destination bits 31:8 in the high address word) and stops KVM from treating
//!    destination 0xff as a broadcast in x2APIC mode. It must precede vCPU creation too, so
//!    that every LAPIC's state (`KVM_GET/SET_LAPIC`) uses the 32-bit ID format from the start.
//!
//! Then create the [`crate::KvmIrqChip`] (which installs the GSI routing table; it may also be
//! created after the vCPUs), and only then the vCPUs.

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, KVM_CAP_X2APIC_API, KVM_PIT_SPEAKER_DUMMY,
    KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK, KVM_X2APIC_API_USE_32BIT_IDS,
};
use kvm_ioctls::{Cap, VmFd};

use crate::error::{kvm_op, IrqError};

/// Default guest-physical address of the three-page TSS area (`KVM_SET_TSS_ADDR`).
pub const DEFAULT_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Default guest-physical address of the one-page identity-map table
/// (`KVM_SET_IDENTITY_MAP_ADDR`).
pub const DEFAULT_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The x2APIC API flags this crate enables.
pub const X2APIC_API_FLAGS: u32 =
    KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK;

/// What [`setup_vm_with`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmIrqConfig {
    /// Guest-physical address of the TSS pages (`[addr, addr + 3 pages)`), or `None` to
    /// skip `KVM_SET_TSS_ADDR`.
    pub tss_address: Option<u64>,
    /// Guest-physical address of the identity-map page, or `None` to skip
    /// `KVM_SET_IDENTITY_MAP_ADDR`.
    pub identity_map_address: Option<u64>,
    /// Whether to create the in-kernel PIT (`KVM_CREATE_PIT2`, speaker port dummy).
    pub pit: bool,
    /// Whether to enable the x2APIC API (32-bit APIC IDs, no broadcast quirk) when KVM
    /// offers it.
    pub x2apic_api: bool,
}

impl Default for VmIrqConfig {
    fn default() -> Self {
        VmIrqConfig {
            tss_address: Some(DEFAULT_TSS_ADDRESS),
            identity_map_address: Some(DEFAULT_IDENTITY_MAP_ADDRESS),
            pit: true,
            x2apic_api: true,
        }
    }
}

/// What [`setup_vm_with`] set up; pass it to [`crate::KvmIrqChip::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqChipInfo {
    /// Whether the x2APIC API with 32-bit APIC IDs is enabled. When `false`, APIC IDs above
    /// 254 are unreachable and MSI routes use only the 8-bit destination; a VMM must then not
    /// advertise `KVM_FEATURE_MSI_EXT_DEST_ID` to the guest nor create more than 255 vCPUs.
    pub x2apic_api: bool,
    /// Whether the in-kernel PIT exists.
    pub pit: bool,
}

/// Sets up the VM's interrupt hardware with [`VmIrqConfig::default`]: identity map at
/// 0xfffbc000, TSS at 0xfffbd000, irqchip, PIT, x2APIC API. Call once, before creating vCPUs.
pub fn setup_vm(vm: &VmFd) -> Result<IrqChipInfo, IrqError> {
    setup_vm_with(vm, &VmIrqConfig::default())
}

/// Sets up the VM's interrupt hardware as `config` says (see the [module docs](self) for the
/// order and why). Call once, before creating vCPUs.
pub fn setup_vm_with(vm: &VmFd, config: &VmIrqConfig) -> Result<IrqChipInfo, IrqError> {
    if !vm.check_extension(Cap::Irqchip) {
        return Err(IrqError::MissingCapability("KVM_CAP_IRQCHIP"));
    }
    if let Some(addr) = config.identity_map_address {
        if !vm.check_extension(Cap::SetIdentityMapAddr) {
            return Err(IrqError::MissingCapability("KVM_CAP_SET_IDENTITY_MAP_ADDR"));
        }
        vm.set_identity_map_address(addr)
            .map_err(kvm_op("KVM_SET_IDENTITY_MAP_ADDR"))?;
    }
    if let Some(addr) = config.tss_address {
        let addr = usize::try_from(addr).map_err(|_| {
            IrqError::InvalidConfig(format!("TSS address {addr:#x} does not fit usize"))
        })?;
        vm.set_tss_address(addr)
            .map_err(kvm_op("KVM_SET_TSS_ADDR"))?;
    }
    vm.create_irq_chip().map_err(kvm_op("KVM_CREATE_IRQCHIP"))?;
    if config.pit {
        if !vm.check_extension(Cap::Pit2) {
            return Err(IrqError::MissingCapability("KVM_CAP_PIT2"));
        }
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_op("KVM_CREATE_PIT2"))?;
    }
    let mut x2apic_api = false;
    if config.x2apic_api {
        let offered = vm.check_extension_int(Cap::X2ApicApi);
        if offered > 0 && (offered as u32) & X2APIC_API_FLAGS == X2APIC_API_FLAGS {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_X2APIC_API,
                ..Default::default()
            };
            cap.args[0] = u64::from(X2APIC_API_FLAGS);
            vm.enable_cap(&cap)
                .map_err(kvm_op("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)"))?;
            x2apic_api = true;
        } else {
            log::info!(
                "KVM_CAP_X2APIC_API not offered (flags {offered:#x}): APIC IDs above 254 unavailable"
            );
        }
    }
    Ok(IrqChipInfo {
        x2apic_api,
        pit: config.pit,
    })
}
