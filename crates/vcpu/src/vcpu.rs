// SPDX-License-Identifier: Apache-2.0 OR MIT
//! One vCPU: creation, configuration, boot registers, the exit dispatch, save and restore.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_mp_state, kvm_run, Xsave, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
    KVM_SYSTEM_EVENT_SUSPEND, KVM_SYSTEM_EVENT_WAKEUP, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vmkit_device::Bus;
use vmkit_migration::{MigrationError, Restore, Snapshot};

use crate::cpuid::CpuidPolicy;
use crate::error::{Result, VcpuError};
use crate::lapic;
use crate::msr;
use crate::regs::{boot_fpu, BootRegs};
use crate::state::{self, VcpuState, XSAVE_LEGACY_SIZE};

/// Whether the VM has KVM's in-kernel interrupt controller (PIC/IOAPIC and per-vCPU LAPIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Irqchip {
    /// `KVM_CREATE_IRQCHIP` was called: LAPICs are in the kernel, HLT never exits.
    InKernel,
    /// No in-kernel irqchip: no LAPIC state, HLT exits to userspace.
    None,
}

/// Why a VM stopped (the first reason reported wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmStop {
    /// The guest asked to exit with a code (e.g. through a debug exit port device).
    Exit(i32),
    /// The guest asked for a reset (`KVM_SYSTEM_EVENT_RESET`, or a device such as i8042).
    Reset,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`); on a PC this resets the machine.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u32,
    },
    /// The guest powered off (`KVM_SYSTEM_EVENT_SHUTDOWN`, ACPI S5, ...).
    Shutdown,
    /// The guest reported a crash (`KVM_SYSTEM_EVENT_CRASH`, pvpanic).
    Crash,
    /// Every vCPU executed HLT without an in-kernel irqchip to wake it.
    Halted,
    /// The VMM stopped the VM (e.g. its manager was dropped).
    Requested,
    /// A vCPU could not continue: KVM entry failure, internal/emulation error, ioctl error.
    Error(String),
}

impl VmStop {
    /// Whether a PC would reset here (reset request or triple fault).
    pub fn is_reset(&self) -> bool {
        matches!(self, Self::Reset | Self::TripleFault { .. })
    }
}

impl std::fmt::Display for VmStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exit(c) => write!(f, "guest exited with code {c}"),
            Self::Reset => f.write_str("guest requested a reset"),
            Self::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted"),
            Self::Shutdown => f.write_str("guest shut down"),
            Self::Crash => f.write_str("guest crashed"),
            Self::Halted => {
                f.write_str("all vCPUs halted with no interrupt controller to wake them")
            }
            Self::Requested => f.write_str("stop requested by the VMM"),
            Self::Error(e) => write!(f, "vCPU error: {e}"),
        }
    }
}

/// What one `KVM_RUN` came back with, after the exit was dispatched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExitAction {
    /// An I/O or MMIO exit was handled; run again.
    Handled,
    /// `KVM_RUN` was interrupted (signal or `immediate_exit`): check for pause/stop, then run
    /// again (after [`Vcpu::clear_immediate_exit`]).
    Interrupted,
    /// The vCPU executed HLT and nothing in the kernel can wake it (no in-kernel irqchip).
    Halted,
    /// The VM must stop.
    Stop(VmStop),
}

/// Per-VM facts every vCPU needs: the CPUID policy, the irqchip mode, KVM capabilities and
/// the MSR candidates for the state. Build once, share as `Arc`.
///
/// The first vCPU to be configured probes which MSRs really read and write back; every
/// other vCPU reuses that list (they share the CPUID policy, which decides it), which saves
/// about a third of the KVM time of configuring a vCPU.
#[derive(Debug)]
pub struct VcpuConfig {
    cpuid: CpuidPolicy,
    irqchip: Irqchip,
    msr_candidates: Vec<u32>,
    state_msrs: OnceLock<Vec<u32>>,
    x2apic: bool,
    /// XSAVE area size in bytes; `None` without `KVM_CAP_XSAVE`.
    xsave_size: Option<usize>,
    xsave2: bool,
    xcrs: bool,
    debugregs: bool,
}

impl VcpuConfig {
    /// Reads the capabilities of `kvm`/`vm` and the MSR index list.
    pub fn new(kvm: &Kvm, vm: &VmFd, cpuid: CpuidPolicy, irqchip: Irqchip) -> Result<Self> {
        let xsave2_size = vm.check_extension_int(Cap::Xsave2);
        let (xsave_size, xsave2) = if xsave2_size > 0 {
            (Some((xsave2_size as usize).max(XSAVE_LEGACY_SIZE)), true)
        } else if vm.check_extension(Cap::Xsave) {
            (Some(XSAVE_LEGACY_SIZE), false)
        } else {
            (None, false)
        };
        Ok(Self {
            cpuid,
            irqchip,
            msr_candidates: msr::state_msr_candidates(kvm)?,
            state_msrs: OnceLock::new(),
            x2apic: false,
            xsave_size,
            xsave2,
            xcrs: vm.check_extension(Cap::Xcrs),
            debugregs: vm.check_extension(Cap::Debugregs),
        })
    }

    /// Starts every vCPU's LAPIC in x2APIC mode (`IA32_APIC_BASE` bit 10), as firmware
    /// does when APIC IDs exceed 254 or when the guest should find x2APIC enabled. Needs an
    /// in-kernel irqchip.
    pub fn with_x2apic(mut self, enabled: bool) -> Self {
        self.x2apic = enabled;
        self
    }

    /// Whether [`VcpuConfig::with_x2apic`] is on.
    pub fn x2apic(&self) -> bool {
        self.x2apic
    }

    /// The CPUID policy.
    pub fn cpuid(&self) -> &CpuidPolicy {
        &self.cpuid
    }

    /// The irqchip mode.
    pub fn irqchip(&self) -> Irqchip {
        self.irqchip
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.cpuid.vcpu_count()
    }

    /// MSRs considered for the state (KVM's index list minus [`msr::NEVER_RESTORE`]).
    pub fn msr_candidates(&self) -> &[u32] {
        &self.msr_candidates
    }

    /// XSAVE area size used for the state, if KVM supports XSAVE.
    pub fn xsave_size(&self) -> Option<usize> {
        self.xsave_size
    }
}

/// Counts unmapped accesses; logs the first few and then every power of two.
static UNMAPPED_ACCESSES: AtomicU64 = AtomicU64::new(0);

#[cold]
#[inline(never)]
fn log_unmapped(kind: &str, addr: u64, len: usize, write: bool) {
    let n = UNMAPPED_ACCESSES.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= 8 || n.is_power_of_two() {
        log::warn!(
            "unmapped {kind} {} of {len} bytes at {addr:#x} ({}; {n} unmapped accesses so far)",
            if write { "write" } else { "read" },
            if write {
                "ignored"
            } else {
                "reads as all ones"
            },
        );
    }
}

#[inline]
fn bus_read(bus: &Bus, kind: &str, addr: u64, data: &mut [u8]) {
    if bus.read(addr, data).is_err() {
        data.fill(0xff);
        log_unmapped(kind, addr, data.len(), false);
    }
}

#[inline]
fn bus_write(bus: &Bus, kind: &str, addr: u64, data: &[u8]) {
    if bus.write(addr, data).is_err() {
        log_unmapped(kind, addr, data.len(), true);
    }
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failure",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit reason",
        _ => "unknown suberror",
    }
}

/// One x86_64 vCPU: a `VcpuFd` with its index, APIC ID and the per-VM [`VcpuConfig`].
pub struct Vcpu {
    fd: VcpuFd,
    index: u32,
    apic_id: u32,
    config: Arc<VcpuConfig>,
    /// The `kvm_run` page of `fd` (mapped for as long as `fd` lives; moving `fd` does not
    /// move the mapping).
    run: NonNull<kvm_run>,
    /// MSRs saved by [`Vcpu::save_state`] (probed by [`Vcpu::configure`] or taken from a
    /// restored state).
    state_msrs: Vec<u32>,
}

// SAFETY: `run` points into the kvm_run mapping owned by `fd`, which is `Send`; the pointer
// is only dereferenced by the thread that owns the `Vcpu` (or for the atomic
// `immediate_exit` byte, see `manager`).
unsafe impl Send for Vcpu {}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .field("apic_id", &self.apic_id)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Creates vCPU `index` in `vm`; its KVM vCPU id is its APIC ID from the topology.
    pub fn new(vm: &VmFd, index: u32, config: Arc<VcpuConfig>) -> Result<Self> {
        let apic_id = config
            .cpuid
            .apic_id(index)
            .map_err(|e| VcpuError::from(e).on(index))?;
        let fd = vm
            .create_vcpu(u64::from(apic_id))
            .map_err(|source| VcpuError::Create {
                index,
                apic_id,
                source,
            })?;
        Ok(Self::from_fd(fd, index, apic_id, config))
    }

    /// Wraps an existing `VcpuFd` (created with KVM vCPU id `apic_id`).
    pub fn from_fd(mut fd: VcpuFd, index: u32, apic_id: u32, config: Arc<VcpuConfig>) -> Self {
        let run = NonNull::from(fd.get_kvm_run());
        Self {
            fd,
            index,
            apic_id,
            config,
            run,
            state_msrs: Vec::new(),
        }
    }

    /// Index of the vCPU in the VM.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// APIC ID (and KVM vCPU id).
    pub fn apic_id(&self) -> u32 {
        self.apic_id
    }

    /// The per-VM configuration.
    pub fn config(&self) -> &Arc<VcpuConfig> {
        &self.config
    }

    /// The underlying KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The underlying KVM vCPU, mutably (e.g. to call `run()` yourself).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// MSRs [`Vcpu::save_state`] saves (empty before [`Vcpu::configure`]: then every
    /// readable candidate is saved).
    pub fn state_msrs(&self) -> &[u32] {
        &self.state_msrs
    }

    fn ioctl(&self, ioctl: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Ioctl {
            index,
            ioctl,
            source,
        }
    }

    /// Sets the vCPU up before its first run: CPUID, the MSR list for state saving, the boot
    /// MSRs, and (with an in-kernel irqchip) LINT0 = ExtINT / LINT1 = NMI and, with
    /// [`VcpuConfig::with_x2apic`], x2APIC mode.
    ///
    /// Leaves the registers at their reset values: a vCPU not given [`Vcpu::set_boot_regs`]
    /// starts like an AP (with an in-kernel irqchip it waits for INIT/SIPI).
    pub fn configure(&mut self) -> Result<()> {
        let cpuid = self
            .config
            .cpuid
            .cpuid_for(self.index)
            .map_err(|e| VcpuError::from(e).on(self.index))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl("KVM_SET_CPUID2"))?;
        self.state_msrs = match self.config.state_msrs.get() {
            Some(list) => list.clone(),
            None => {
                let list = msr::probe_state_msrs(&self.fd, &self.config.msr_candidates)
                    .map_err(|e| VcpuError::from(e).on(self.index))?;
                // Another vCPU may have probed concurrently; both lists are equal.
                let _ = self.config.state_msrs.set(list.clone());
                list
            }
        };
        // LINT0/LINT1 are set in xAPIC mode; the switch to x2APIC below keeps them.
        if self.config.irqchip == Irqchip::InKernel {
            lapic::configure_lint(&self.fd).map_err(|e| VcpuError::from(e).on(self.index))?;
        }
        let mut boot = msr::boot_msrs();
        if self.config.x2apic && self.config.irqchip == Irqchip::InKernel {
            let base = lapic::default_apic_base(self.index == 0) | lapic::APIC_BASE_X2APIC;
            boot.push(msr::entry(msr::index::IA32_APIC_BASE, base));
        }
        msr::write_all(&self.fd, &boot).map_err(|e| VcpuError::from(e).on(self.index))?;
        Ok(())
    }

    /// Loads the boot register state (segments, control registers, GPRs, FPU) and, with an
    /// in-kernel irqchip, makes the vCPU runnable (so an AP started this way does not wait for
    /// SIPI). `apic_base` keeps KVM's reset value (see [`lapic::default_apic_base`]).
    pub fn set_boot_regs(&self, boot: &BootRegs) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
        boot.apply_sregs(&mut sregs)
            .map_err(|e| VcpuError::from(e).on(self.index))?;
        let regs = boot.regs().map_err(|e| VcpuError::from(e).on(self.index))?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.ioctl("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs)
            .map_err(self.ioctl("KVM_SET_REGS"))?;
        self.fd
            .set_fpu(&boot_fpu())
            .map_err(self.ioctl("KVM_SET_FPU"))?;
        if self.config.irqchip == Irqchip::InKernel {
            self.fd
                .set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(self.ioctl("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// Pointer to the `immediate_exit` byte of this vCPU's `kvm_run` page.
    pub(crate) fn immediate_exit_ptr(&self) -> *mut u8 {
        // SAFETY: `run` is valid for the life of `self.fd`; addr_of_mut creates no reference.
        unsafe { std::ptr::addr_of_mut!((*self.run.as_ptr()).immediate_exit) }
    }

    /// Clears `immediate_exit` (after an [`VcpuExitAction::Interrupted`]).
    #[inline]
    pub fn clear_immediate_exit(&self) {
        // SAFETY: the byte lives in the kvm_run mapping owned by `self.fd`; other threads
        // only ever access it atomically (see `manager`), so we do too.
        unsafe { std::sync::atomic::AtomicU8::from_ptr(self.immediate_exit_ptr()) }
            .store(0, Ordering::SeqCst);
    }

    /// Sets `immediate_exit`: the next `KVM_RUN` returns at once with
    /// [`VcpuExitAction::Interrupted`].
    pub fn set_immediate_exit(&self) {
        // SAFETY: as in `clear_immediate_exit`.
        unsafe { std::sync::atomic::AtomicU8::from_ptr(self.immediate_exit_ptr()) }
            .store(1, Ordering::SeqCst);
    }

    /// Runs the vCPU until the next exit and dispatches it: port I/O to `pio`, MMIO to `mmio`
    /// (unmapped reads return all ones, unmapped writes are dropped, both logged with a rate
    /// limit). No allocation and no lock on the I/O paths.
    #[inline]
    pub fn run_once(&mut self, pio: &Bus, mmio: &Bus) -> VcpuExitAction {
        let run = self.run;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    // SAFETY: KVM just reported KVM_EXIT_IO, so the `io` union member is the
                    // valid one; this reads one byte of it through the raw pointer (the data
                    // slice lies elsewhere in the page).
                    let size = usize::from(unsafe { (*run.as_ptr()).__bindgen_anon_1.io.size });
                    if size == 0 || data.len() == size {
                        bus_write(pio, "port", u64::from(port), data);
                    } else {
                        for chunk in data.chunks(size) {
                            bus_write(pio, "port", u64::from(port), chunk);
                        }
                    }
                    VcpuExitAction::Handled
                }
                VcpuExit::IoIn(port, data) => {
                    // SAFETY: as for IoOut.
                    let size = usize::from(unsafe { (*run.as_ptr()).__bindgen_anon_1.io.size });
                    if size == 0 || data.len() == size {
                        bus_read(pio, "port", u64::from(port), data);
                    } else {
                        for chunk in data.chunks_mut(size) {
                            bus_read(pio, "port", u64::from(port), chunk);
                        }
                    }
                    VcpuExitAction::Handled
                }
                VcpuExit::MmioRead(addr, data) => {
                    bus_read(mmio, "MMIO", addr, data);
                    VcpuExitAction::Handled
                }
                VcpuExit::MmioWrite(addr, data) => {
                    bus_write(mmio, "MMIO", addr, data);
                    VcpuExitAction::Handled
                }
                VcpuExit::Intr => VcpuExitAction::Interrupted,
                VcpuExit::Hlt => VcpuExitAction::Halted,
                VcpuExit::Shutdown => VcpuExitAction::Stop(VmStop::TripleFault { vcpu: self.index }),
                VcpuExit::SystemEvent(kind, _) => self.system_event(kind),
                VcpuExit::FailEntry(reason, cpu) => VcpuExitAction::Stop(VmStop::Error(format!(
                    "vCPU {}: KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}",
                    self.index
                ))),
                VcpuExit::InternalError => VcpuExitAction::Stop(VmStop::Error(self.internal_error())),
                VcpuExit::IrqWindowOpen => VcpuExitAction::Handled,
                other => VcpuExitAction::Stop(VmStop::Error(format!(
                    "vCPU {}: unexpected KVM exit {other:?}",
                    self.index
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => VcpuExitAction::Interrupted,
            Err(e) => VcpuExitAction::Stop(VmStop::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.index))),
        }
    }

    #[cold]
    fn system_event(&self, kind: u32) -> VcpuExitAction {
        match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExitAction::Stop(VmStop::Shutdown),
            KVM_SYSTEM_EVENT_RESET => VcpuExitAction::Stop(VmStop::Reset),
            KVM_SYSTEM_EVENT_CRASH => VcpuExitAction::Stop(VmStop::Crash),
            KVM_SYSTEM_EVENT_WAKEUP | KVM_SYSTEM_EVENT_SUSPEND => {
                log::info!(
                    "vCPU {}: system event {kind} (wakeup/suspend) ignored",
                    self.index
                );
                VcpuExitAction::Handled
            }
            other => VcpuExitAction::Stop(VmStop::Error(format!(
                "vCPU {}: unknown KVM system event {other}",
                self.index
            ))),
        }
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` from the `kvm_run` page.
    #[cold]
    fn internal_error(&self) -> String {
        // SAFETY: KVM reported KVM_EXIT_INTERNAL_ERROR, so `internal` (and, for emulation
        // failures, its extension `emulation_failure`) is the valid union member; both are
        // plain integers copied out here.
        let (internal, emulation) = unsafe {
            let u = &(*self.run.as_ptr()).__bindgen_anon_1;
            (u.internal, u.emulation_failure)
        };
        let mut msg = format!(
            "vCPU {}: KVM internal error: {} (suberror {})",
            self.index,
            internal_error_name(internal.suberror),
            internal.suberror
        );
        if let Ok(regs) = self.fd.get_regs() {
            msg.push_str(&format!(" at rip {:#x}", regs.rip));
        }
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
            && emulation.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
        {
            // SAFETY: the flag says the instruction bytes are valid (union of plain bytes).
            let insn = unsafe { emulation.__bindgen_anon_1.__bindgen_anon_1 };
            let n = usize::from(insn.insn_size).min(insn.insn_bytes.len());
            let bytes: Vec<String> = insn.insn_bytes[..n]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            msg.push_str(&format!("; instruction bytes: {}", bytes.join(" ")));
        } else {
            let n = (internal.ndata as usize).min(internal.data.len());
            if n > 0 {
                msg.push_str(&format!("; data: {:#x?}", &internal.data[..n]));
            }
        }
        msg
    }

    /// Saves the complete vCPU state. The vCPU must not be running (pause it first).
    pub fn save_state(&self) -> Result<VcpuState> {
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.ioctl("KVM_GET_CPUID2"))?;
        let regs = self.fd.get_regs().map_err(self.ioctl("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))?;
        let fpu = self.fd.get_fpu().map_err(self.ioctl("KVM_GET_FPU"))?;
        let xsave = self.save_xsave()?;
        let xcrs = if self.config.xcrs {
            Some(state::xcrs_from_kvm(
                &self.fd.get_xcrs().map_err(self.ioctl("KVM_GET_XCRS"))?,
            ))
        } else {
            None
        };
        let lapic = if self.config.irqchip == Irqchip::InKernel {
            Some(lapic::to_bytes(
                &self.fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?,
            ))
        } else {
            None
        };
        let msrs = if self.state_msrs.is_empty() {
            msr::read_available(&self.fd, &self.config.msr_candidates)
        } else {
            msr::read_all(&self.fd, &self.state_msrs)
        }
        .map_err(|e| VcpuError::from(e).on(self.index))?;
        let debug_regs = if self.config.debugregs {
            Some(
                self.fd
                    .get_debug_regs()
                    .map_err(self.ioctl("KVM_GET_DEBUGREGS"))?
                    .into(),
            )
        } else {
            None
        };
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(self.ioctl("KVM_GET_MP_STATE"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(self.ioctl("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            index: self.index,
            apic_id: self.apic_id,
            cpuid: cpuid.as_slice().iter().map(|&e| e.into()).collect(),
            regs: regs.into(),
            sregs: sregs.into(),
            fpu: fpu.into(),
            xsave,
            xcrs,
            msrs: msrs.into_iter().map(Into::into).collect(),
            lapic,
            debug_regs,
            mp_state: mp_state.mp_state,
            events: events.into(),
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    fn xsave_fam_len(size: usize) -> usize {
        (size.saturating_sub(XSAVE_LEGACY_SIZE)).div_ceil(4)
    }

    fn save_xsave(&self) -> Result<Option<Vec<u8>>> {
        let Some(size) = self.config.xsave_size else {
            return Ok(None);
        };
        if self.config.xsave2 {
            let mut xsave =
                Xsave::new(Self::xsave_fam_len(size)).map_err(|e| VcpuError::Restore {
                    index: self.index,
                    reason: format!("cannot allocate a {size}-byte XSAVE buffer: {e:?}"),
                })?;
            // SAFETY: the buffer holds the 4096-byte region plus `size - 4096` bytes of FAM
            // entries, i.e. the KVM_CAP_XSAVE2 size KVM writes; no feature is enabled
            // dynamically by this process after the size was read.
            unsafe { self.fd.get_xsave2(&mut xsave) }.map_err(self.ioctl("KVM_GET_XSAVE2"))?;
            let fam = xsave.as_fam_struct_ref();
            let mut bytes = state::xsave_bytes(&fam.xsave.region);
            bytes.extend(state::xsave_bytes(xsave.as_slice()));
            bytes.truncate(size);
            Ok(Some(bytes))
        } else {
            let x = self.fd.get_xsave().map_err(self.ioctl("KVM_GET_XSAVE"))?;
            Ok(Some(state::xsave_bytes(&x.region)))
        }
    }

    fn restore_xsave(&self, st: &VcpuState) -> Result<()> {
        let Some(size) = self.config.xsave_size else {
            return Err(VcpuError::Restore {
                index: self.index,
                reason: "the state has an XSAVE area but KVM here has no KVM_CAP_XSAVE".into(),
            });
        };
        let words = st.xsave_words(size)?.ok_or_else(|| VcpuError::Restore {
            index: self.index,
            reason: "no XSAVE area".into(),
        })?;
        let fam_len = Self::xsave_fam_len(size);
        let mut xsave = Xsave::new(fam_len).map_err(|e| VcpuError::Restore {
            index: self.index,
            reason: format!("cannot allocate a {size}-byte XSAVE buffer: {e:?}"),
        })?;
        let (region, extra) = words.split_at(words.len().min(1024));
        // SAFETY: only the fixed-size region of the FAM struct is touched here; the entries
        // are written through the bounds-checked slice below.
        let fam = unsafe { xsave.as_mut_fam_struct() };
        fam.xsave.region[..region.len()].copy_from_slice(region);
        for (dst, src) in xsave.as_mut_slice().iter_mut().zip(extra) {
            *dst = *src;
        }
        // SAFETY: the buffer is `size` bytes (region + fam_len entries), the size KVM reads
        // with KVM_CAP_XSAVE2 (or exactly the legacy 4096 bytes without it).
        unsafe { self.fd.set_xsave2(&xsave) }.map_err(self.ioctl("KVM_SET_XSAVE"))
    }

    /// Restores a saved state into this (fresh, not running) vCPU, in the order documented in
    /// [`crate::state`]. The state is validated first; its APIC ID must match this vCPU's.
    pub fn restore_state(&mut self, st: &VcpuState) -> Result<()> {
        st.validate()?;
        let fail = |reason: String| VcpuError::Restore {
            index: self.index,
            reason,
        };
        if st.apic_id != self.apic_id {
            return Err(fail(format!(
                "the state belongs to APIC ID {} (vCPU {}), this vCPU has APIC ID {}",
                st.apic_id, st.index, self.apic_id
            )));
        }
        match (&st.lapic, self.config.irqchip) {
            (None, Irqchip::InKernel) => {
                return Err(fail(
                    "the state has no LAPIC but this VM has an in-kernel irqchip".into(),
                ))
            }
            (Some(_), Irqchip::None) => {
                return Err(fail(
                    "the state has an in-kernel LAPIC but this VM has no irqchip".into(),
                ))
            }
            _ => {}
        }

        // 1. CPUID.
        let cpuid = kvm_bindings::CpuId::from_entries(&st.kvm_cpuid())
            .map_err(|e| fail(format!("cannot build the CPUID list: {e:?}")))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl("KVM_SET_CPUID2"))?;
        // 2. TSC frequency.
        if let Some(khz) = st.tsc_khz {
            let here = self.fd.get_tsc_khz().ok();
            if here != Some(khz) {
                self.fd.set_tsc_khz(khz).map_err(|e| {
                    fail(format!(
                        "the guest TSC runs at {khz} kHz, this vCPU at {here:?} kHz, and KVM cannot scale it: {e}"
                    ))
                })?;
            }
        }
        // 3. sregs, 4. regs.
        self.fd
            .set_sregs(&st.sregs.into())
            .map_err(self.ioctl("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&st.regs.into())
            .map_err(self.ioctl("KVM_SET_REGS"))?;
        // 5. FPU, then XSAVE (which supersedes it where KVM keeps one copy), XCRs.
        self.fd
            .set_fpu(&st.fpu.into())
            .map_err(self.ioctl("KVM_SET_FPU"))?;
        if st.xsave.is_some() {
            self.restore_xsave(st)?;
        }
        if let Some(xcrs) = st.kvm_xcrs() {
            if !self.config.xcrs {
                return Err(fail(
                    "the state has XCRs but KVM here has no KVM_CAP_XCRS".into(),
                ));
            }
            self.fd
                .set_xcrs(&xcrs)
                .map_err(self.ioctl("KVM_SET_XCRS"))?;
        }
        // 6. LAPIC.
        if let Some(bytes) = &st.lapic {
            let page = lapic::from_bytes(bytes)
                .ok_or_else(|| fail("LAPIC page has the wrong size".into()))?;
            self.fd
                .set_lapic(&page)
                .map_err(self.ioctl("KVM_SET_LAPIC"))?;
        }
        // 7. MSRs.
        let msrs: Vec<_> = st
            .kvm_msrs()
            .into_iter()
            .filter(|e| !msr::NEVER_RESTORE.contains(&e.index))
            .collect();
        msr::write_all(&self.fd, &msrs).map_err(|e| VcpuError::from(e).on(self.index))?;
        self.state_msrs = msrs.iter().map(|e| e.index).collect();
        // 8. Debug registers.
        if let Some(d) = st.debug_regs {
            if self.config.debugregs {
                self.fd
                    .set_debug_regs(&d.into())
                    .map_err(self.ioctl("KVM_SET_DEBUGREGS"))?;
            }
        }
        // 9. MP state, then events.
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: st.mp_state,
            })
            .map_err(self.ioctl("KVM_SET_MP_STATE"))?;
        let mut events: kvm_bindings::kvm_vcpu_events = st.events.into();
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        self.fd
            .set_vcpu_events(&events)
            .map_err(self.ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Creates vCPU `st.index` in `vm` and restores `st` into it.
    pub fn restore_new(vm: &VmFd, config: Arc<VcpuConfig>, st: &VcpuState) -> Result<Self> {
        st.validate()?;
        let mut vcpu = Self::new(vm, st.index, config)?;
        vcpu.restore_state(st)?;
        Ok(vcpu)
    }
}

impl Snapshot for Vcpu {
    type State = VcpuState;

    fn save(&self) -> Result<VcpuState, MigrationError> {
        self.save_state().map_err(|e| MigrationError::Component {
            component: format!("vcpu/{}", self.index),
            source: Box::new(e),
        })
    }
}

/// What [`Restore::restore`] needs to rebuild a [`Vcpu`].
#[derive(Clone, Debug)]
pub struct VcpuRestoreArgs {
    /// The VM to create the vCPU in.
    pub vm: Arc<VmFd>,
    /// The per-VM configuration.
    pub config: Arc<VcpuConfig>,
}

impl Restore for Vcpu {
    type Args = VcpuRestoreArgs;

    fn restore(args: VcpuRestoreArgs, state: &VcpuState) -> Result<Self, MigrationError> {
        Self::restore_new(&args.vm, args.config, state).map_err(|e| match e {
            VcpuError::State(m) => m,
            e => MigrationError::Component {
                component: format!("vcpu/{}", state.index),
                source: Box::new(e),
            },
        })
    }
}
