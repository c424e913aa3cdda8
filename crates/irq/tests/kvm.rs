// SPDX-License-Identifier: Apache-2.0 OR MIT
//! KVM tests for vmkit-irq (need `/dev/kvm`): chip set-up, line and MSI group bookkeeping on a
//! real VM, and interrupt delivery into a tiny real-mode guest.
//!
//! The delivery guest (hand-assembled 16-bit code at 0x1000) installs one real-mode IVT entry
//! per test vector, reports "ready" with `out 0x11`, then loops on `sti; hlt`. The handler for
//! vector V does `mov al, V; out 0x10, al`, writes the LAPIC EOI register (xAPIC: MMIO at
//! 0xfee000b0 through an FS segment whose base the host set to 0xfee00000; x2APIC: `wrmsr`
//! 0x80b) and `iret`s. The host runs `KVM_RUN` on a vCPU thread and forwards every PIO exit
//! to the test thread, which triggers interrupts and checks the exact sequence of vectors the
//! guest saw. Each guest is stopped by a `KVM_SIGNAL_MSI` of the lowest-priority vector
//! [`SYNC`], then of [`STOP`]; every exit seen before [`SYNC`] must have been expected, so a
//! spurious delivery pending at that point fails the test. The receive calls
//! have a generous watchdog so that a broken delivery fails instead of hanging; nothing is
//! asserted about time.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kvm_bindings::{
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_userspace_memory_region, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmkit_device::interrupt::{
    InterruptError, InterruptLine, InterruptManager, MsiMessage, MsiVectors, TriggerMode,
};
use vmkit_irq::routing::{Route, DEFAULT_ROUTE_COUNT};
use vmkit_irq::{setup_vm, IrqError, KvmIrqChip, MsiRoute};

/// How long a test waits for a guest event before declaring the guest hung.
const WATCHDOG: Duration = Duration::from_secs(60);

const MEM_SIZE: usize = 0x10000;
const CODE: usize = 0x1000;
const HANDLERS: usize = 0x1100;
const HANDLER_SIZE: usize = 0x20;
const OUT_PORT: u16 = 0x10;
const READY_PORT: u16 = 0x11;
/// The vector that ends a guest run (delivered with KVM_SIGNAL_MSI).
const STOP: u8 = 0x7e;
/// The lowest-priority vector the guests handle: delivered (with KVM_SIGNAL_MSI) after
/// every interrupt already pending, it marks "nothing else was pending".
const SYNC: u8 = 0x20;

const LAPIC_TPR: usize = 0x80;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_LVT0: usize = 0x350;
const MSR_IA32_APICBASE: u32 = 0x1b;

fn new_vm() -> (Kvm, Arc<VmFd>) {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    (kvm, vm)
}

fn new_chip() -> (Kvm, KvmIrqChip) {
    let (kvm, vm) = new_vm();
    let chip = KvmIrqChip::create(vm).expect("irqchip set-up");
    (kvm, chip)
}

fn xapic_msg(dest: u8, vector: u8) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000 | (u64::from(dest) << 12),
        data: u32::from(vector),
    }
}

fn ioapic_irr(vm: &VmFd) -> u32 {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).expect("KVM_GET_IRQCHIP");
    // SAFETY: KVM_GET_IRQCHIP for the IOAPIC fills the `ioapic` member with plain integers.
    unsafe { chip.chip.ioapic.irr }
}

fn msi_routes(chip: &KvmIrqChip) -> Vec<(u32, MsiRoute)> {
    chip.routes()
        .into_iter()
        .filter_map(|e| match e.route {
            Route::Msi(m) => Some((e.gsi, m)),
            Route::Irqchip { .. } => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Set-up and bookkeeping on a real VM
// ---------------------------------------------------------------------------------------

#[test]
fn kvm_setup_installs_irqchip_pit_and_default_routes() {
    if !vmkit_testkit::kvm_available("kvm_setup_installs_irqchip_pit_and_default_routes") {
        return;
    }
    let (_kvm, vm) = new_vm();
    let x2apic_offered = vm.check_extension_int(kvm_ioctls::Cap::X2ApicApi) as u32;
    let info = setup_vm(&vm).expect("setup_vm");
    assert!(info.pit);
    assert_eq!(
        info.x2apic_api,
        x2apic_offered & vmkit_irq::X2APIC_API_FLAGS == vmkit_irq::X2APIC_API_FLAGS
    );
    // The PIT exists.
    vm.get_pit2().expect("KVM_GET_PIT2 after KVM_CREATE_PIT2");
    let chip = KvmIrqChip::new(vm.clone(), info).expect("KvmIrqChip::new");
    assert_eq!(chip.info(), info);
    assert_eq!(chip.routes().len(), DEFAULT_ROUTE_COUNT);
    let limit = chip.gsi_limit();
    assert!(limit > 24);
    assert_eq!(chip.msi_available(), chip.msi_capacity());
    assert!(chip.msi_capacity() <= (limit - 24) as usize);
    // A second irqchip is refused, with the ioctl named.
    let err = setup_vm(&vm).expect_err("second setup_vm");
    assert!(err.to_string().contains("KVM_"), "{err}");
    // vCPUs can be created afterwards.
    vm.create_vcpu(0).expect("KVM_CREATE_VCPU after set-up");
}

#[test]
fn kvm_setup_after_vcpu_creation_fails() {
    if !vmkit_testkit::kvm_available("kvm_setup_after_vcpu_creation_fails") {
        return;
    }
    let (_kvm, vm) = new_vm();
    let _vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let err = setup_vm(&vm).expect_err("set-up after a vCPU exists must fail");
    assert!(matches!(err, IrqError::Kvm { .. }), "{err}");
}

#[test]
fn kvm_chip_without_irqchip_fails() {
    if !vmkit_testkit::kvm_available("kvm_chip_without_irqchip_fails") {
        return;
    }
    let (_kvm, vm) = new_vm();
    let info = vmkit_irq::IrqChipInfo {
        x2apic_api: false,
        pit: false,
    };
    let err = KvmIrqChip::new(vm, info).expect_err("routing needs an in-kernel irqchip");
    assert!(err.to_string().contains("KVM_SET_GSI_ROUTING"), "{err}");
}

#[test]
fn kvm_legacy_lines() {
    if !vmkit_testkit::kvm_available("kvm_legacy_lines") {
        return;
    }
    let (_kvm, chip) = new_chip();
    let vm = chip.vm().clone();

    let edge = chip.legacy_line(4, TriggerMode::Edge).expect("edge line");
    assert_eq!(edge.trigger_mode(), TriggerMode::Edge);
    assert!(edge.event().is_some());
    assert!(edge.resample_event().is_none());
    edge.trigger().expect("edge trigger");
    assert!(matches!(
        edge.set_level(true),
        Err(InterruptError::Unsupported(_))
    ));

    let level = chip
        .legacy_line(10, TriggerMode::Level)
        .expect("level line");
    assert_eq!(level.trigger_mode(), TriggerMode::Level);
    assert!(level.resample_event().is_some());
    level.trigger().expect("level trigger");

    // Every routed GSI is a valid line; GSI 2 (PIC cascade, its IOAPIC pin carries the
    // timer) and nothing beyond the IOAPIC is.
    for gsi in [0, 1, 3, 15, 16, 23] {
        chip.legacy_line(gsi, TriggerMode::Edge)
            .unwrap_or_else(|e| panic!("gsi {gsi}: {e}"));
    }
    for gsi in [2, 24, 100, u32::MAX] {
        assert!(matches!(
            chip.legacy_line(gsi, TriggerMode::Level),
            Err(InterruptError::InvalidLine(g)) if g == gsi
        ));
    }

    // set_level: lines sharing GSI 20 are wire-ORed. Program pin 20 as level-triggered and
    // masked, so the IOAPIC's IRR shows the line level without delivering it.
    let pin = 20;
    chip.set_ioapic_redirection(pin, (1 << 16) | (1 << 15) | 0x50)
        .expect("program IOAPIC pin");
    assert_eq!(
        chip.ioapic_redirection(pin).unwrap(),
        (1 << 16) | (1 << 15) | 0x50
    );
    assert!(chip.ioapic_redirection(24).is_err());
    assert!(chip.set_ioapic_redirection(24, 0).is_err());
    let a = chip.create_legacy_line(pin, TriggerMode::Level).unwrap();
    let b = chip.create_legacy_line(pin, TriggerMode::Level).unwrap();
    assert_eq!(a.gsi(), pin);
    assert_eq!(ioapic_irr(&vm) & (1 << pin), 0);
    a.set_level(true).unwrap();
    assert_ne!(ioapic_irr(&vm) & (1 << pin), 0);
    b.set_level(true).unwrap();
    a.set_level(true).unwrap(); // idempotent: still one assertion from `a`
    a.set_level(false).unwrap();
    assert_ne!(ioapic_irr(&vm) & (1 << pin), 0, "b still asserts the line");
    b.set_level(false).unwrap();
    assert_eq!(ioapic_irr(&vm) & (1 << pin), 0);
    b.set_level(false).unwrap(); // idempotent
    assert_eq!(ioapic_irr(&vm) & (1 << pin), 0);
    // Dropping a line releases its level.
    a.set_level(true).unwrap();
    b.set_level(true).unwrap();
    drop(a);
    assert_ne!(ioapic_irr(&vm) & (1 << pin), 0);
    drop(b);
    assert_eq!(ioapic_irr(&vm) & (1 << pin), 0);
}

#[test]
fn kvm_msi_groups_bookkeeping() {
    if !vmkit_testkit::kvm_available("kvm_msi_groups_bookkeeping") {
        return;
    }
    let (_kvm, chip) = new_chip();
    let capacity = chip.msi_capacity();

    let g = chip.create_msi_vectors(4).expect("group");
    assert_eq!(g.len(), 4);
    let gsis: Vec<u32> = (0..4).map(|i| g.gsi(i).unwrap()).collect();
    assert_eq!(gsis, vec![24, 25, 26, 27]);
    assert_eq!(chip.msi_available(), capacity - 4);
    for i in 0..4 {
        assert!(g.is_masked(i).unwrap());
        assert_eq!(g.message(i).unwrap(), None);
        assert!(g.notifier(i).is_some());
    }
    // Unconfigured vectors have no route.
    assert!(msi_routes(&chip).is_empty());

    // Index validation.
    let bad = InterruptError::InvalidVector { index: 4, len: 4 }.to_string();
    assert_eq!(g.trigger(4).unwrap_err().to_string(), bad);
    assert_eq!(
        g.configure(4, xapic_msg(0, 0x40)).unwrap_err().to_string(),
        bad
    );
    assert_eq!(g.set_masked(4, false).unwrap_err().to_string(), bad);
    assert_eq!(g.take_pending(99).unwrap_err().to_string(), {
        InterruptError::InvalidVector { index: 99, len: 4 }.to_string()
    });
    assert!(g.notifier(4).is_none());
    assert!(g.gsi(4).is_none());

    // Configure, reconfigure, unconfigure.
    g.configure(0, xapic_msg(1, 0x40)).unwrap();
    g.configure(2, xapic_msg(0, 0x42)).unwrap();
    assert_eq!(
        msi_routes(&chip),
        vec![
            (
                24,
                MsiRoute {
                    address_lo: 0xfee0_1000,
                    address_hi: 0,
                    data: 0x40
                }
            ),
            (
                26,
                MsiRoute {
                    address_lo: 0xfee0_0000,
                    address_hi: 0,
                    data: 0x42
                }
            ),
        ]
    );
    g.configure(0, xapic_msg(2, 0x41)).unwrap();
    assert_eq!(msi_routes(&chip)[0].1.address_lo, 0xfee0_2000);
    assert_eq!(g.message(0).unwrap(), Some(xapic_msg(2, 0x41)));
    g.unconfigure(2).unwrap();
    assert_eq!(msi_routes(&chip).len(), 1);
    assert_eq!(g.message(2).unwrap(), None);

    // A guest message KVM would reject (address high bits 7:0 set) or a non-interrupt
    // address leaves the vector unrouted and does not break the table for others.
    if chip.info().x2apic_api {
        g.configure(
            1,
            MsiMessage {
                address: (1 << 32) | 0xfee0_0000,
                data: 0x43,
            },
        )
        .unwrap();
        assert_eq!(msi_routes(&chip).len(), 1);
    }
    g.configure(
        1,
        MsiMessage {
            address: 0x1000,
            data: 0x43,
        },
    )
    .unwrap();
    assert_eq!(msi_routes(&chip).len(), 1);
    g.configure(3, xapic_msg(0, 0x44)).unwrap();
    assert_eq!(msi_routes(&chip).len(), 2);

    // Mask / unmask (irqfd assign / deassign), idempotent both ways.
    g.set_masked(0, false).unwrap();
    g.set_masked(0, false).unwrap();
    assert!(!g.is_masked(0).unwrap());
    g.trigger(0).unwrap();
    g.set_masked(0, true).unwrap();
    g.set_masked(0, true).unwrap();
    // Triggers while masked latch as the pending bit.
    assert!(!g.take_pending(0).unwrap());
    g.trigger(0).unwrap();
    g.trigger(0).unwrap();
    assert!(g.take_pending(0).unwrap());
    assert!(!g.take_pending(0).unwrap());
    // An unmasked vector has no pending state.
    g.set_masked(3, false).unwrap();
    g.trigger(3).unwrap();
    assert!(!g.take_pending(3).unwrap());
    // Unconfigured but unmasked: accepted, delivers nothing.
    g.set_masked(2, false).unwrap();
    g.trigger(2).unwrap();

    // A second group takes the next GSIs; dropping the first frees and removes its routes.
    let g2 = chip.msi_vectors(2).unwrap();
    g2.configure(1, xapic_msg(0, 0x50)).unwrap();
    drop(g);
    assert_eq!(
        msi_routes(&chip).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![29]
    );
    assert_eq!(chip.msi_available(), capacity - 2);
    let g3 = chip.create_msi_vectors(5).unwrap();
    let reused: Vec<u32> = (0..5).map(|i| g3.gsi(i).unwrap()).collect();
    assert_eq!(reused, vec![24, 25, 26, 27, 30]);
    // Reused GSIs start unrouted and masked.
    assert_eq!(msi_routes(&chip).len(), 1);
    assert!(g3.is_masked(0).unwrap());

    // Exhaustion: an oversized request fails without side effects; an empty group is fine.
    let available = chip.msi_available();
    assert!(matches!(
        chip.msi_vectors(available + 1),
        Err(InterruptError::Exhausted(_))
    ));
    assert_eq!(chip.msi_available(), available);
    let empty = chip.msi_vectors(0).unwrap();
    assert!(empty.is_empty());
    drop((g2, g3, empty));
    assert_eq!(chip.msi_available(), capacity);
    assert!(msi_routes(&chip).is_empty());
}

#[test]
fn kvm_msi_groups_from_many_threads() {
    if !vmkit_testkit::kvm_available("kvm_msi_groups_from_many_threads") {
        return;
    }
    let (_kvm, chip) = new_chip();
    let capacity = chip.msi_capacity();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let chip = chip.clone();
            thread::spawn(move || {
                let mut kept = Vec::new();
                for round in 0..10u8 {
                    let g = chip.create_msi_vectors(8).expect("group");
                    for i in 0..8 {
                        g.configure(i, xapic_msg(t, 0x20 + round))
                            .expect("configure");
                        g.set_masked(i, false).expect("unmask");
                    }
                    if round % 2 == 0 {
                        kept.push(g);
                    }
                }
                kept
            })
        })
        .collect();
    let groups: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    // 4 threads x 5 kept groups x 8 vectors, every GSI distinct and routed.
    let mut gsis: Vec<u32> = groups
        .iter()
        .flat_map(|g| (0..8).map(|i| g.gsi(i).unwrap()))
        .collect();
    gsis.sort_unstable();
    gsis.dedup();
    assert_eq!(gsis.len(), 160);
    let routed: Vec<u32> = msi_routes(&chip).iter().map(|r| r.0).collect();
    assert_eq!(routed, gsis);
    assert_eq!(chip.msi_available(), capacity - 160);
    drop(groups);
    assert_eq!(chip.msi_available(), capacity);
    assert!(msi_routes(&chip).is_empty());
}

#[test]
fn kvm_irqchip_state_save_restore() {
    if !vmkit_testkit::kvm_available("kvm_irqchip_state_save_restore") {
        return;
    }
    use vmkit_migration::{Restore, Snapshot};
    let (_kvm, a) = new_chip();
    // Give the chips some non-reset state.
    a.set_ioapic_redirection(5, (1 << 16) | (1 << 15) | 0x35)
        .unwrap();
    a.set_ioapic_redirection(17, (3u64 << 56) | 0x47).unwrap();
    let line = a.create_legacy_line(5, TriggerMode::Level).unwrap();
    line.set_level(true).unwrap(); // pin 5 masked: stays in IRR
    let mut state = a.save().expect("save");
    assert_ne!(state.ioapic.irr & (1 << 5), 0);
    state.pic_master.imr = 0xfb;
    state.pic_master.irq_base = 0x20;
    state.pic_slave.irq_base = 0x28;
    a.restore_state(&state).expect("restore into the same VM");
    let saved = a.save().expect("save again");
    assert_eq!(saved.pic_master.imr, 0xfb);
    assert_eq!(saved.pic_slave.irq_base, 0x28);
    assert_eq!(saved.ioapic.redirection[17], (3u64 << 56) | 0x47);

    // Through the versioned encoding into a fresh VM.
    let bytes = vmkit_migration::encode(&saved).unwrap();
    let decoded: vmkit_irq::IrqChipState = vmkit_migration::decode(&bytes).unwrap();
    let (_kvm2, vm2) = new_vm();
    let info2 = setup_vm(&vm2).unwrap();
    let b = KvmIrqChip::restore((vm2, info2), &decoded).expect("restore");
    let mut restored = b.save().unwrap();
    let mut expected = saved.clone();
    // KVM recomputes the PIT's load time on restore.
    for s in [&mut restored, &mut expected] {
        for c in &mut s.pit.as_mut().unwrap().channels {
            c.count_load_time = 0;
        }
    }
    assert_eq!(restored, expected);

    // A state that does not fit is refused, not applied.
    let mut bad = saved.clone();
    bad.ioapic.redirection.truncate(3);
    assert!(b.restore_state(&bad).is_err());
    let (_kvm3, vm3) = new_vm();
    let info3 = vmkit_irq::setup_vm_with(
        &vm3,
        &vmkit_irq::VmIrqConfig {
            pit: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!info3.pit);
    assert!(KvmIrqChip::restore((vm3, info3), &saved).is_err());
}

// ---------------------------------------------------------------------------------------
// Delivery into a real-mode guest
// ---------------------------------------------------------------------------------------

/// How the guest's handlers signal end of interrupt.
#[derive(Clone, Copy)]
enum Eoi {
    /// `mov dword fs:[0xb0], 0` with FS based at the xAPIC MMIO page.
    Xapic,
    /// `wrmsr` to the x2APIC EOI MSR 0x80b.
    X2apic,
}

/// The guest program, placed at [`CODE`]: IVT set-up, ready report, `sti; hlt` loop, then
/// one handler per vector at [`HANDLERS`].
fn guest_image(vectors: &[u8], eoi: Eoi) -> Vec<u8> {
    let mut code = Vec::new();
    for (i, &v) in vectors.iter().enumerate() {
        let handler = u16::try_from(HANDLERS + i * HANDLER_SIZE).expect("handler below 64 KiB");
        let ivt = u16::from(v) * 4;
        // mov word [ivt], handler ; mov word [ivt + 2], 0
        code.extend([0xc7, 0x06]);
        code.extend(ivt.to_le_bytes());
        code.extend(handler.to_le_bytes());
        code.extend([0xc7, 0x06]);
        code.extend((ivt + 2).to_le_bytes());
        code.extend([0x00, 0x00]);
    }
    code.extend([0xe6, READY_PORT as u8]); // out READY_PORT, al
    code.extend([0xfb, 0xf4, 0xeb, 0xfc]); // loop: sti; hlt; jmp loop
    assert!(code.len() <= HANDLERS - CODE, "too many vectors");
    code.resize(HANDLERS - CODE, 0xf4);
    for &v in vectors {
        let mut h = vec![0xb0, v, 0xe6, OUT_PORT as u8]; // mov al, v ; out OUT_PORT, al
        match eoi {
            // mov dword fs:[0x00b0], 0
            Eoi::Xapic => h.extend([0x64, 0x66, 0xc7, 0x06, 0xb0, 0x00, 0, 0, 0, 0]),
            // mov ecx, 0x80b ; xor eax, eax ; xor edx, edx ; wrmsr
            Eoi::X2apic => h.extend([
                0x66, 0xb9, 0x0b, 0x08, 0x00, 0x00, 0x66, 0x31, 0xc0, 0x66, 0x31, 0xd2, 0x0f, 0x30,
            ]),
        }
        h.push(0xcf); // iret
        assert!(h.len() <= HANDLER_SIZE);
        h.resize(HANDLER_SIZE, 0xf4);
        code.extend(h);
    }
    code
}

/// Anonymous memory backing guest-physical [0, MEM_SIZE).
struct GuestMem {
    ptr: *mut u8,
}

impl GuestMem {
    fn new() -> Self {
        // SAFETY: anonymous private mapping, no fixed address; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        GuestMem { ptr: ptr.cast() }
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= MEM_SIZE);
        // SAFETY: the range was checked to lie inside the mapping, which we own.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) };
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

fn lapic_reg(l: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| l.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        l.regs[offset + i] = byte as _;
    }
}

type GuestEvent = Result<(u16, u8), String>;

/// A one-vCPU real-mode guest running on its own thread.
struct Guest {
    chip: KvmIrqChip,
    events: Receiver<GuestEvent>,
    thread: Option<JoinHandle<()>>,
    /// Message that reaches the vCPU with vector [`STOP`].
    stop_message: MsiMessage,
    _mem: GuestMem,
    _kvm: Kvm,
}

impl Guest {
    /// Starts a guest with handlers for `vectors` (plus [`SYNC`] and [`STOP`]) on vCPU `vcpu_id`, its
    /// LAPIC in x2APIC mode if `x2apic`. Returns after the guest reported ready.
    fn start(vcpu_id: u64, x2apic: bool, vectors: &[u8], stop_message: MsiMessage) -> Guest {
        let (kvm, vm) = new_vm();
        let info = setup_vm(&vm).expect("setup_vm");
        if x2apic {
            assert!(info.x2apic_api, "this KVM lacks the x2APIC API");
        }
        let chip = KvmIrqChip::new(vm.clone(), info).expect("KvmIrqChip::new");

        let mut mem = GuestMem::new();
        let mut all = vectors.to_vec();
        all.extend([SYNC, STOP]);
        let eoi = if x2apic { Eoi::X2apic } else { Eoi::Xapic };
        mem.write(CODE, &guest_image(&all, eoi));
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem.ptr as u64,
            flags: 0,
        };
        // SAFETY: the region is our anonymous mapping, which outlives the VM's use of it
        // (the vCPU thread is joined before `mem` is dropped).
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");

        let vcpu = vm.create_vcpu(vcpu_id).expect("KVM_CREATE_VCPU");
        if x2apic {
            let cpuid = kvm
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .expect("KVM_GET_SUPPORTED_CPUID");
            vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
            // Enabled (bit 11) + x2APIC mode (bit 10).
            let base = 0xfee0_0000 | (1 << 11) | (1 << 10);
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_APICBASE,
                data: base,
                ..Default::default()
            }])
            .expect("one MSR entry");
            assert_eq!(vcpu.set_msrs(&msrs).expect("KVM_SET_MSRS"), 1, "APIC base");
        }
        if vcpu_id != 0 {
            // Not the BSP: make it runnable without INIT/SIPI.
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .expect("KVM_SET_MP_STATE");
        }
        let mut lapic = vcpu.get_lapic().expect("KVM_GET_LAPIC");
        set_lapic_reg(&mut lapic, LAPIC_SVR, 0x1ff); // software enable, spurious vector 0xff
        set_lapic_reg(&mut lapic, LAPIC_LVT0, 1 << 16); // LINT0 (PIC ExtINT) masked
        set_lapic_reg(&mut lapic, LAPIC_TPR, 0);
        vcpu.set_lapic(&lapic).expect("KVM_SET_LAPIC");
        assert_eq!(
            lapic_reg(&vcpu.get_lapic().expect("KVM_GET_LAPIC"), LAPIC_SVR) & 0x100,
            0x100
        );

        let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        // FS points at the xAPIC page so the handlers can write the EOI register.
        sregs.fs.base = 0xfee0_0000;
        vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
        let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
        regs.rip = CODE as u64;
        regs.rsp = 0x8000;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).expect("KVM_SET_REGS");

        let (tx, rx) = mpsc::channel();
        let thread = thread::spawn(move || run_vcpu(vcpu, tx));
        let mut guest = Guest {
            chip,
            events: rx,
            thread: Some(thread),
            stop_message,
            _mem: mem,
            _kvm: kvm,
        };
        assert_eq!(guest.next(), (READY_PORT, 0), "guest did not start");
        guest
    }

    /// The next PIO exit the guest made.
    fn next(&mut self) -> (u16, u8) {
        match self.events.recv_timeout(WATCHDOG) {
            Ok(Ok(event)) => event,
            Ok(Err(e)) => panic!("vCPU thread failed: {e}"),
            Err(e) => panic!("watchdog: no guest event within {WATCHDOG:?} ({e})"),
        }
    }

    /// Waits for the guest's handler of `vector` to report.
    fn expect_vector(&mut self, vector: u8) {
        assert_eq!(
            self.next(),
            (OUT_PORT, vector),
            "expected the guest to take vector {vector:#x}"
        );
    }

    /// Stops the guest: first a KVM_SIGNAL_MSI of [`SYNC`], the lowest-priority vector, so
    /// that any interrupt already pending in the LAPIC is taken before it; then one of
    /// [`STOP`]. Returns the events seen before [`SYNC`] (none, if every earlier delivery was
    /// expected).
    fn stop(mut self) -> Vec<(u16, u8)> {
        let sync = MsiMessage {
            data: u32::from(SYNC),
            ..self.stop_message
        };
        assert!(
            self.chip.signal_msi(sync).expect("KVM_SIGNAL_MSI"),
            "sync not delivered"
        );
        let mut before = Vec::new();
        loop {
            match self.next() {
                (OUT_PORT, SYNC) => break,
                other => before.push(other),
            }
        }
        let delivered = self
            .chip
            .signal_msi(self.stop_message)
            .expect("KVM_SIGNAL_MSI");
        assert!(delivered, "stop message not delivered");
        assert_eq!(self.next(), (OUT_PORT, STOP));
        if let Some(t) = self.thread.take() {
            t.join().expect("vCPU thread panicked");
        }
        before
    }
}

fn run_vcpu(mut vcpu: VcpuFd, tx: mpsc::Sender<GuestEvent>) {
    loop {
        let event = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => Ok((port, data.first().copied().unwrap_or(0))),
            Ok(other) => Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => Err(format!("KVM_RUN: {e}")),
        };
        let last = matches!(event, Ok((OUT_PORT, STOP)) | Err(_));
        if tx.send(event).is_err() || last {
            return;
        }
    }
}

/// Blocks until `fd` is readable (with the watchdog), then consumes its count.
fn wait_eventfd(fd: &vmm_sys_util::eventfd::EventFd) -> u64 {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = i32::try_from(WATCHDOG.as_millis()).expect("watchdog fits i32 ms");
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
    assert!(n >= 0, "poll: {}", io::Error::last_os_error());
    assert_eq!(n, 1, "watchdog: eventfd not signalled within {WATCHDOG:?}");
    fd.read().expect("read eventfd")
}

#[test]
fn kvm_msi_delivery_xapic() {
    if !vmkit_testkit::kvm_available("kvm_msi_delivery_xapic") {
        return;
    }
    let mut guest = Guest::start(0, false, &[0x30, 0x40, 0x48], xapic_msg(0, STOP));
    let chip = guest.chip.clone();
    let g = chip.create_msi_vectors(3).unwrap();

    // Configured + unmasked: trigger (from this thread; the vCPU runs on its own) delivers.
    g.configure(0, xapic_msg(0, 0x40)).unwrap();
    g.set_masked(0, false).unwrap();
    g.trigger(0).unwrap();
    guest.expect_vector(0x40);
    // Writing the notifier directly is the same.
    g.notifier(0).unwrap().write(1).unwrap();
    guest.expect_vector(0x40);

    // A trigger while masked is not delivered (vector 1 overtakes it) ...
    g.configure(1, xapic_msg(0, 0x30)).unwrap();
    g.set_masked(1, false).unwrap();
    g.set_masked(0, true).unwrap();
    g.trigger(0).unwrap();
    g.trigger(1).unwrap();
    guest.expect_vector(0x30);
    // ... but latched, and delivered once at unmask.
    g.set_masked(0, false).unwrap();
    guest.expect_vector(0x40);
    g.trigger(0).unwrap();
    guest.expect_vector(0x40);

    // A latched trigger that the transport took is not delivered at unmask.
    g.set_masked(0, true).unwrap();
    g.trigger(0).unwrap();
    assert!(g.take_pending(0).unwrap());
    g.set_masked(0, false).unwrap();
    g.trigger(1).unwrap();
    guest.expect_vector(0x30);

    // A trigger latched while masked is discarded if the vector is unconfigured meanwhile.
    g.set_masked(0, true).unwrap();
    g.trigger(0).unwrap();
    g.unconfigure(0).unwrap();
    g.configure(0, xapic_msg(0, 0x40)).unwrap();
    g.set_masked(0, false).unwrap();
    g.trigger(1).unwrap();
    guest.expect_vector(0x30);

    // An unconfigured vector, even unmasked, never delivers, also not once it is configured
    // later; triggers after that are delivered.
    g.set_masked(2, false).unwrap();
    g.trigger(2).unwrap();
    g.trigger(1).unwrap();
    guest.expect_vector(0x30);
    g.configure(2, xapic_msg(0, 0x48)).unwrap();
    g.trigger(1).unwrap();
    guest.expect_vector(0x30);
    g.trigger(2).unwrap();
    guest.expect_vector(0x48);
    g.trigger(1).unwrap();
    guest.expect_vector(0x30);

    // Reconfiguring an unmasked vector retargets it.
    g.configure(0, xapic_msg(0, 0x48)).unwrap();
    g.trigger(0).unwrap();
    guest.expect_vector(0x48);
    // A message outside the interrupt window unroutes it.
    g.configure(
        0,
        MsiMessage {
            address: 0x2000,
            data: 0x40,
        },
    )
    .unwrap();
    g.trigger(0).unwrap();
    g.trigger(1).unwrap();
    guest.expect_vector(0x30);

    // A second group, as the marker for the checks below.
    let g1 = chip.create_msi_vectors(1).unwrap();
    g1.configure(0, xapic_msg(0, 0x30)).unwrap();
    g1.set_masked(0, false).unwrap();

    // Through the trait object, as devices see it.
    let dyn_group: Arc<dyn MsiVectors> = chip.msi_vectors(1).unwrap();
    dyn_group.configure(0, xapic_msg(0, 0x40)).unwrap();
    dyn_group.set_masked(0, false).unwrap();
    dyn_group.trigger(0).unwrap();
    guest.expect_vector(0x40);

    // Dropping the group removes its routes: the reused GSIs deliver nothing until
    // configured again.
    let old: Vec<u32> = (0..3).map(|i| g.gsi(i).unwrap()).collect();
    drop(g);
    // Gone from KVM's table too: KVM_IRQ_LINE on a GSI with an MSI route would deliver it.
    for &gsi in &old {
        chip.vm().set_irq_line(gsi, true).expect("KVM_IRQ_LINE");
    }
    g1.trigger(0).unwrap();
    guest.expect_vector(0x30);
    let g = chip.create_msi_vectors(3).unwrap();
    let new: Vec<u32> = (0..3).map(|i| g.gsi(i).unwrap()).collect();
    assert_eq!(old, new, "freed GSIs are reused");
    for i in 0..3 {
        g.set_masked(i, false).unwrap();
        g.trigger(i).unwrap();
    }
    assert_eq!(guest.stop(), vec![], "unexpected deliveries");
}

#[test]
fn kvm_legacy_line_delivery() {
    if !vmkit_testkit::kvm_available("kvm_legacy_line_delivery") {
        return;
    }
    let mut guest = Guest::start(0, false, &[0x50, 0x51, 0x52], xapic_msg(0, STOP));
    let chip = guest.chip.clone();
    // IOAPIC: vector in 7:0, fixed delivery, physical destination APIC 0 (63:56),
    // active high; bit 15 = level.
    const LEVEL: u64 = 1 << 15;
    chip.set_ioapic_redirection(20, LEVEL | 0x50).unwrap();
    chip.set_ioapic_redirection(21, 0x51).unwrap();
    chip.set_ioapic_redirection(19, LEVEL | 0x52).unwrap();

    // Level line with resample: trigger asserts, the guest's EOI deasserts and signals the
    // resample eventfd.
    let level = chip.legacy_line(20, TriggerMode::Level).unwrap();
    let resample = level.resample_event().expect("resample eventfd");
    level.trigger().unwrap();
    guest.expect_vector(0x50);
    assert_eq!(wait_eventfd(resample), 1);
    // Deasserted at EOI, so a new trigger is a new interrupt.
    level.trigger().unwrap();
    guest.expect_vector(0x50);
    assert_eq!(wait_eventfd(resample), 1);
    // The irqfd itself, written by a worker thread.
    let worker = {
        let level = level.clone();
        thread::spawn(move || level.event().unwrap().write(1).unwrap())
    };
    worker.join().unwrap();
    guest.expect_vector(0x50);
    assert_eq!(wait_eventfd(resample), 1);

    // Edge line.
    let edge = chip.legacy_line(21, TriggerMode::Edge).unwrap();
    edge.trigger().unwrap();
    guest.expect_vector(0x51);

    // set_level holds the line: the IOAPIC delivers again after each EOI until released.
    let held = chip.legacy_line(19, TriggerMode::Level).unwrap();
    held.set_level(true).unwrap();
    guest.expect_vector(0x52);
    guest.expect_vector(0x52);
    held.set_level(false).unwrap();
    // Deliveries already under way may still arrive; the edge marker comes after them.
    edge.trigger().unwrap();
    loop {
        match guest.next() {
            (OUT_PORT, 0x52) => continue,
            (OUT_PORT, 0x51) => break,
            other => panic!("unexpected guest event {other:?}"),
        }
    }
    // Dropped lines deliver nothing (their irqfds are gone).
    let level_event = level.event().unwrap().try_clone().unwrap();
    drop(level);
    level_event.write(1).unwrap();
    assert_eq!(guest.stop(), vec![], "unexpected deliveries");
}

#[test]
fn kvm_msi_delivery_x2apic_extended_destination() {
    if !vmkit_testkit::kvm_available("kvm_msi_delivery_x2apic_extended_destination") {
        return;
    }
    // APIC ID 300 = 0x12c: needs the x2APIC API (32-bit IDs).
    const APIC_ID: u32 = 300;
    let low = u64::from(APIC_ID & 0xff) << 12;
    let ext = u64::from(APIC_ID >> 8) << 5;
    let ext_dest = |vector: u8| MsiMessage {
        address: 0xfee0_0000 | low | ext,
        data: u32::from(vector),
    };
    let mut guest = Guest::start(u64::from(APIC_ID), true, &[0x40, 0x41], ext_dest(STOP));
    let chip = guest.chip.clone();
    let g = chip.create_msi_vectors(3).unwrap();

    // Extended destination ID in address bits 11:5 (what Linux uses with
    // KVM_FEATURE_MSI_EXT_DEST_ID).
    assert_eq!(ext_dest(0x40).x86_destination(), APIC_ID);
    g.configure(0, ext_dest(0x40)).unwrap();
    // KVM's x2APIC format: destination bits 31:8 in the address high word.
    let x2 = MsiMessage {
        address: (u64::from(APIC_ID & !0xff) << 32) | 0xfee0_0000 | low,
        data: 0x41,
    };
    assert_eq!(x2.x86_destination(), APIC_ID);
    g.configure(1, x2).unwrap();
    // Only the low 8 bits: APIC ID 0x2c, which does not exist.
    g.configure(2, xapic_msg((APIC_ID & 0xff) as u8, 0x40))
        .unwrap();
    for i in 0..3 {
        g.set_masked(i, false).unwrap();
    }

    g.trigger(0).unwrap();
    guest.expect_vector(0x40);
    g.trigger(1).unwrap();
    guest.expect_vector(0x41);
    g.trigger(2).unwrap();
    g.trigger(1).unwrap();
    guest.expect_vector(0x41);
    assert_eq!(guest.stop(), vec![], "unexpected deliveries");
}
