// SPDX-License-Identifier: Apache-2.0 OR MIT
//! vCPU threads and their control: pause, resume, kick, stop, wait.
//!
//! [`VcpuManager::spawn`] starts one thread per vCPU (named `vcpu<i>`), each running
//! [`Vcpu::run_once`] in a loop. The threads share a [`VmController`] (an `Arc`, cheap to hand
//! to devices) through which any thread can:
//!
//! - [`VmController::pause`]: kick every vCPU out of `KVM_RUN` and wait until all are parked;
//! - [`VmController::resume`]: let them run again;
//! - [`VmController::request_stop`]: stop the VM with a [`VmStop`] reason (the first reason
//!   wins), e.g. from a device's exit-port callback running on a vCPU thread;
//! - [`VmController::wait`]: block until the VM stops and get the reason.
//!
//! # Kicking
//!
//! A kick sets the vCPU's `kvm_run.immediate_exit` byte (so a thread about to enter
//! `KVM_RUN` returns at once) and, if the thread is inside `KVM_RUN`, sends it the real-time
//! signal [`kick_signal`], whose handler does nothing: its delivery alone makes `KVM_RUN`
//! return `EINTR`. The vCPU thread then clears `immediate_exit` and checks the control flags.
//! All three (control flags, `immediate_exit`, the thread's "in guest" flag) are sequentially
//! consistent atomics, so a request can never be missed: either the thread sees the flag
//! before entering `KVM_RUN`, or `KVM_RUN` sees `immediate_exit`, or the signal arrives in the
//! guest. The hot path (I/O exits) takes no lock.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, PoisonError};
use std::thread::JoinHandle;

use vmkit_device::Bus;
use vmkit_migration::{MigrationError, Pausable};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, SIGRTMIN};

use crate::error::{Result, VcpuError};
use crate::state::VcpuState;
use crate::vcpu::{Vcpu, VcpuExitAction, VmStop};

/// Offset of the kick signal from `SIGRTMIN`.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

/// The real-time signal used to kick vCPU threads out of `KVM_RUN` (`SIGRTMIN + 0`).
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery interrupts KVM_RUN, the flags say why.
}

static SIGNAL_ONCE: Once = Once::new();
static SIGNAL_RESULT: Mutex<Option<i32>> = Mutex::new(None);

/// Installs the (empty) kick signal handler, once per process.
pub fn register_kick_signal() -> Result<()> {
    SIGNAL_ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), handle_kick) {
            *SIGNAL_RESULT.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.errno());
        }
    });
    match *SIGNAL_RESULT.lock().unwrap_or_else(PoisonError::into_inner) {
        None => Ok(()),
        Some(errno) => Err(VcpuError::Signal {
            signal: kick_signal(),
            source: vmm_sys_util::errno::Error::new(errno),
        }),
    }
}

thread_local! {
    static ON_VCPU_THREAD: Cell<bool> = const { Cell::new(false) };
}

const FLAG_PAUSE: u8 = 1;
const FLAG_STOP: u8 = 2;

/// Where to kick one vCPU thread; present while the thread runs.
struct KickTarget {
    thread: libc::pthread_t,
    immediate_exit: *mut u8,
}

// SAFETY: the pointer is only used while the slot's mutex is held and the owning thread has
// registered it (it deregisters, under the same mutex, before its Vcpu can be dropped).
unsafe impl Send for KickTarget {}

struct KickSlot {
    in_guest: AtomicBool,
    target: Mutex<Option<KickTarget>>,
}

impl KickSlot {
    fn kick(&self) {
        let target = self.target.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = target.as_ref() {
            // SAFETY: registered targets point at a live kvm_run page (see KickTarget); the
            // byte is only accessed atomically.
            unsafe { AtomicU8::from_ptr(t.immediate_exit) }.store(1, Ordering::SeqCst);
            if self.in_guest.load(Ordering::SeqCst) {
                // SAFETY: the thread is alive while registered; the signal has a handler.
                let rc = unsafe { libc::pthread_kill(t.thread, kick_signal()) };
                if rc != 0 {
                    log::warn!("cannot signal a vCPU thread: errno {rc}");
                }
            }
        }
    }
}

#[derive(Default)]
struct CtlState {
    paused: bool,
    parked: usize,
    halted: usize,
    exited: usize,
    threads: usize,
    stop: Option<VmStop>,
}

/// The shared control object of a set of vCPU threads (see the module documentation).
pub struct VmController {
    flags: AtomicU8,
    state: Mutex<CtlState>,
    cond: Condvar,
    slots: Vec<KickSlot>,
}

impl std::fmt::Debug for VmController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("VmController")
            .field("paused", &st.paused)
            .field("parked", &st.parked)
            .field("exited", &st.exited)
            .field("threads", &st.threads)
            .field("stop", &st.stop)
            .finish()
    }
}

impl VmController {
    fn new(vcpus: usize) -> Self {
        Self {
            flags: AtomicU8::new(0),
            state: Mutex::new(CtlState::default()),
            cond: Condvar::new(),
            slots: (0..vcpus)
                .map(|_| KickSlot {
                    in_guest: AtomicBool::new(false),
                    target: Mutex::new(None),
                })
                .collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_on<'a>(&self, g: MutexGuard<'a, CtlState>) -> MutexGuard<'a, CtlState> {
        self.cond.wait(g).unwrap_or_else(PoisonError::into_inner)
    }

    fn kick_all(&self) {
        for s in &self.slots {
            s.kick();
        }
    }

    /// Number of vCPUs controlled.
    pub fn vcpu_count(&self) -> usize {
        self.slots.len()
    }

    /// Kicks vCPU `index` out of `KVM_RUN` (it re-enters unless paused or stopped).
    pub fn kick(&self, index: usize) {
        if let Some(s) = self.slots.get(index) {
            s.kick();
        }
    }

    /// Stops every vCPU and returns once all are parked (or have exited). Idempotent.
    ///
    /// Fails when called from a vCPU thread (it would wait for itself).
    pub fn pause(&self) -> Result<()> {
        if ON_VCPU_THREAD.with(Cell::get) {
            return Err(VcpuError::FromVcpuThread("pause()"));
        }
        {
            let mut st = self.lock();
            st.paused = true;
            self.flags.fetch_or(FLAG_PAUSE, Ordering::SeqCst);
        }
        self.kick_all();
        let mut st = self.lock();
        while st.parked + st.exited < st.threads {
            st = self.wait_on(st);
        }
        Ok(())
    }

    /// Lets paused vCPUs run again. A no-op when not paused.
    pub fn resume(&self) {
        let mut st = self.lock();
        st.paused = false;
        self.flags.fetch_and(!FLAG_PAUSE, Ordering::SeqCst);
        self.cond.notify_all();
    }

    /// Whether the vCPUs are (being) paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Asks the VM to stop with `reason` (ignored if a reason was already recorded) and kicks
    /// every vCPU. Callable from any thread, including vCPU threads (device callbacks).
    pub fn request_stop(&self, reason: VmStop) {
        {
            let mut st = self.lock();
            if st.stop.is_none() {
                log::debug!("VM stop requested: {reason}");
                st.stop = Some(reason);
            }
            self.flags.fetch_or(FLAG_STOP, Ordering::SeqCst);
            self.cond.notify_all();
        }
        self.kick_all();
    }

    /// The stop reason, if the VM has been asked to stop.
    pub fn stop_reason(&self) -> Option<VmStop> {
        self.lock().stop.clone()
    }

    /// Blocks until the VM is asked to stop and returns the first reason.
    pub fn wait(&self) -> VmStop {
        let mut st = self.lock();
        loop {
            if let Some(r) = &st.stop {
                return r.clone();
            }
            st = self.wait_on(st);
        }
    }

    // --- vCPU thread side ---

    fn register(&self, index: usize, immediate_exit: *mut u8) {
        if let Some(s) = self.slots.get(index) {
            // SAFETY: pthread_self has no preconditions.
            let thread = unsafe { libc::pthread_self() };
            *s.target.lock().unwrap_or_else(PoisonError::into_inner) = Some(KickTarget {
                thread,
                immediate_exit,
            });
        }
    }

    fn deregister(&self, index: usize) {
        if let Some(s) = self.slots.get(index) {
            *s.target.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// Handles pause (parks until resumed) and returns `false` when the thread must exit.
    fn check_control(&self) -> bool {
        if self.flags.load(Ordering::SeqCst) == 0 {
            return true;
        }
        let mut st = self.lock();
        if st.paused && st.stop.is_none() {
            st.parked += 1;
            self.cond.notify_all();
            while st.paused && st.stop.is_none() {
                st = self.wait_on(st);
            }
            st.parked -= 1;
        }
        st.stop.is_none()
    }

    /// A vCPU halted with nothing to wake it: it parks until the VM stops. When every running
    /// vCPU is halted, the VM stops with [`VmStop::Halted`].
    fn halt(&self) {
        let mut st = self.lock();
        st.halted += 1;
        st.parked += 1;
        if st.halted + st.exited >= st.threads && st.stop.is_none() {
            st.stop = Some(VmStop::Halted);
            self.flags.fetch_or(FLAG_STOP, Ordering::SeqCst);
        }
        self.cond.notify_all();
        while st.stop.is_none() {
            st = self.wait_on(st);
        }
        st.parked -= 1;
        st.halted -= 1;
        drop(st);
        // Wake the others still in KVM_RUN, if this vCPU completed the "all halted" count.
        self.kick_all();
    }

    fn thread_exited(&self) {
        let mut st = self.lock();
        st.exited += 1;
        self.cond.notify_all();
    }
}

impl Pausable for VmController {
    fn pause(&self) -> Result<(), MigrationError> {
        VmController::pause(self).map_err(|e| MigrationError::Component {
            component: "vcpus".into(),
            source: Box::new(e),
        })
    }

    fn resume(&self) -> Result<(), MigrationError> {
        VmController::resume(self);
        Ok(())
    }
}

fn vcpu_thread(
    ctl: Arc<VmController>,
    slot: usize,
    vcpu: Arc<Mutex<Vcpu>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
) {
    ON_VCPU_THREAD.with(|c| c.set(true));
    if let Err(e) = unblock_signal(kick_signal()) {
        log::warn!("vCPU thread {slot}: cannot unblock the kick signal: {e:?}");
    }
    let ie = vcpu
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .immediate_exit_ptr();
    ctl.register(slot, ie);
    let in_guest = &ctl.slots[slot].in_guest;
    'outer: while ctl.check_control() {
        let mut guard = vcpu.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            in_guest.store(true, Ordering::SeqCst);
            let action = guard.run_once(&pio, &mmio);
            in_guest.store(false, Ordering::Release);
            match action {
                VcpuExitAction::Handled => {}
                VcpuExitAction::Interrupted => {
                    guard.clear_immediate_exit();
                    if ctl.flags.load(Ordering::SeqCst) != 0 {
                        continue 'outer;
                    }
                }
                VcpuExitAction::Halted => {
                    drop(guard);
                    ctl.halt();
                    break 'outer;
                }
                VcpuExitAction::Stop(reason) => {
                    drop(guard);
                    ctl.request_stop(reason);
                    break 'outer;
                }
            }
        }
    }
    ctl.deregister(slot);
    drop(vcpu);
    ctl.thread_exited();
}

/// Owns the vCPU threads of a VM.
///
/// Dropping a manager whose VM still runs stops it with [`VmStop::Requested`] and joins the
/// threads.
pub struct VcpuManager {
    controller: Arc<VmController>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for VcpuManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuManager")
            .field("vcpus", &self.vcpus.len())
            .field("controller", &self.controller)
            .finish()
    }
}

impl VcpuManager {
    /// Starts one thread per vCPU, dispatching port I/O to `pio` and MMIO to `mmio`.
    ///
    /// The vCPUs should be configured (and the BSP given boot registers) already. Thread `i`
    /// runs `vcpus[i]` and is named `vcpu<index>`.
    pub fn spawn(vcpus: Vec<Vcpu>, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Self> {
        Self::spawn_with(vcpus, pio, mmio, false)
    }

    /// Like [`VcpuManager::spawn`], but the threads start paused (call
    /// [`VmController::resume`]), e.g. to restore state or attach a debugger first.
    pub fn spawn_paused(vcpus: Vec<Vcpu>, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Self> {
        Self::spawn_with(vcpus, pio, mmio, true)
    }

    fn spawn_with(vcpus: Vec<Vcpu>, pio: Arc<Bus>, mmio: Arc<Bus>, paused: bool) -> Result<Self> {
        if vcpus.is_empty() {
            return Err(VcpuError::InvalidVcpuSet("no vCPUs".into()));
        }
        register_kick_signal()?;
        let controller = Arc::new(VmController::new(vcpus.len()));
        if paused {
            controller.lock().paused = true;
            controller.flags.fetch_or(FLAG_PAUSE, Ordering::SeqCst);
        }
        let vcpus: Vec<Arc<Mutex<Vcpu>>> =
            vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        let mut manager = Self {
            controller: controller.clone(),
            vcpus: Vec::with_capacity(vcpus.len()),
            threads: Vec::with_capacity(vcpus.len()),
        };
        for (slot, vcpu) in vcpus.into_iter().enumerate() {
            let index = vcpu.lock().unwrap_or_else(PoisonError::into_inner).index();
            let (ctl, v, p, m) = (controller.clone(), vcpu.clone(), pio.clone(), mmio.clone());
            controller.lock().threads += 1;
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_thread(ctl, slot, v, p, m));
            match handle {
                Ok(h) => {
                    manager.vcpus.push(vcpu);
                    manager.threads.push(h);
                }
                Err(source) => {
                    controller.lock().threads -= 1;
                    // Dropping `manager` stops and joins what was started.
                    return Err(VcpuError::Spawn { index, source });
                }
            }
        }
        Ok(manager)
    }

    /// The shared controller (hand clones to devices that stop the VM).
    pub fn controller(&self) -> &Arc<VmController> {
        &self.controller
    }

    /// The vCPUs. Lock one only while paused or stopped: a running vCPU thread holds its lock.
    pub fn vcpus(&self) -> &[Arc<Mutex<Vcpu>>] {
        &self.vcpus
    }

    /// See [`VmController::pause`].
    pub fn pause(&self) -> Result<()> {
        self.controller.pause()
    }

    /// See [`VmController::resume`].
    pub fn resume(&self) {
        self.controller.resume()
    }

    /// See [`VmController::request_stop`].
    pub fn request_stop(&self, reason: VmStop) {
        self.controller.request_stop(reason)
    }

    fn require_parked(&self, what: &'static str) -> Result<()> {
        let st = self.controller.lock();
        let quiet = st.stop.is_some() && st.exited >= st.threads
            || st.paused && st.parked + st.exited >= st.threads;
        if quiet {
            Ok(())
        } else {
            Err(VcpuError::NotPaused(what))
        }
    }

    /// Saves every vCPU's state, in vCPU order. The vCPUs must be paused (or stopped).
    pub fn save_states(&self) -> Result<Vec<VcpuState>> {
        self.require_parked("save_states")?;
        self.vcpus
            .iter()
            .map(|v| {
                v.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .save_state()
            })
            .collect()
    }

    /// Restores states into the vCPUs (matched by APIC ID). The vCPUs must be paused, e.g.
    /// started with [`VcpuManager::spawn_paused`].
    pub fn restore_states(&self, states: &[VcpuState]) -> Result<()> {
        self.require_parked("restore_states")?;
        if states.len() != self.vcpus.len() {
            return Err(VcpuError::InvalidVcpuSet(format!(
                "{} states for {} vCPUs",
                states.len(),
                self.vcpus.len()
            )));
        }
        for v in &self.vcpus {
            let mut v = v.lock().unwrap_or_else(PoisonError::into_inner);
            let st = states
                .iter()
                .find(|s| s.apic_id == v.apic_id())
                .ok_or_else(|| {
                    VcpuError::InvalidVcpuSet(format!("no state for APIC ID {}", v.apic_id()))
                })?;
            v.restore_state(st)?;
        }
        Ok(())
    }

    /// Waits until the VM stops, joins every vCPU thread and returns the first stop reason.
    pub fn wait(&mut self) -> VmStop {
        let reason = self.controller.wait();
        self.join();
        reason
    }

    fn join(&mut self) {
        for h in self.threads.drain(..) {
            let name = h.thread().name().map(str::to_owned).unwrap_or_default();
            if h.join().is_err() {
                log::error!("vCPU thread {name} panicked");
            }
        }
    }

    /// Stops the VM (if still running), joins the threads and returns the vCPUs.
    pub fn into_vcpus(mut self) -> Vec<Vcpu> {
        self.controller.request_stop(VmStop::Requested);
        self.join();
        std::mem::take(&mut self.vcpus)
            .into_iter()
            .filter_map(|v| Arc::try_unwrap(v).ok())
            .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
            .collect()
    }
}

impl Drop for VcpuManager {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.controller.request_stop(VmStop::Requested);
            self.join();
        }
    }
}
