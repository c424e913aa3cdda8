// SPDX-License-Identifier: Apache-2.0 OR MIT
//! vCPU tests against the real `/dev/kvm`, with hand-assembled guest code.
//!
//! Every test is named `kvm_*` and starts with `vmkit_testkit::kvm_available`.

// Test-only crate: helpers panic on unexpected errors by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod guest;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use common::*;
use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use vmkit_device::{Bus, BusDevice, BusRange};
use vmkit_migration::Restore;
use vmkit_vcpu::regs::GdtLayout;
use vmkit_vcpu::{
    BootRegs, Irqchip, Topology, Vcpu, VcpuExitAction, VcpuManager, VcpuRestoreArgs, VcpuState,
    VmStop,
};

fn pvh() -> BootRegs {
    BootRegs::Pvh {
        entry: CODE,
        start_info: 0x6000,
        gdt: GdtLayout::standard(GDT, 0x520),
    }
}

#[test]
fn kvm_pio_dispatch_and_pvh_entry() {
    if !vmkit_testkit::kvm_available("kvm_pio_dispatch_and_pvh_entry") {
        return;
    }
    let t = TestVm::new(Irqchip::None);
    t.write(CODE, guest::PVH_IO);
    t.write(0x2000, b"abc");
    let config = t.config(1, Topology::flat(1).unwrap());
    let mut vcpu = t.vcpus(&config).remove(0);
    vcpu.set_boot_regs(&pvh()).unwrap();
    let (pio, rec, exit) = pio_bus();
    let mmio = Bus::new();
    let action = run_until_exit(&mut vcpu, &pio, &mmio, &exit);
    assert_eq!(action, VcpuExitAction::Stop(VmStop::Exit(0x2a)));

    let a = rec.accesses();
    let acc = |write, offset, data: &[u8]| Access {
        write,
        offset,
        data: data.to_vec(),
    };
    let expected = vec![
        acc(true, 0, &[0x42]),                       // out al at 0x3f8
        acc(false, 0, &[0x5a]),                      // in al
        acc(true, 1, &[0x5a]),                       // echo at 0x3f9
        acc(true, 2, &0x1234_5678u32.to_le_bytes()), // out eax at 0x3fa
        acc(false, 2, &[0x5a, 0x5b]),                // in ax at 0x3fa
        acc(true, 1, &[0x5a, 0x5b]),                 // out ax at 0x3f9
        acc(true, 0, &[0xff; 4]),                    // unmapped port 0x80 read as all ones
        acc(true, 1, b"a"),                          // rep outsb: one access per byte
        acc(true, 1, b"b"),
        acc(true, 1, b"c"),
        acc(true, 4, &0x6000u32.to_le_bytes()), // EBX = start_info
        acc(true, 4, &0x08u16.to_le_bytes()),   // CS
        acc(true, 4, &0x18u16.to_le_bytes()),   // DS
        acc(true, 4, &0x18u16.to_le_bytes()),   // SS
    ];
    assert_eq!(&a[..expected.len()], &expected[..]);
    let cr0 = u32::from_le_bytes(a[expected.len()].data.clone().try_into().unwrap());
    assert_eq!(cr0 & 0x8000_0011, 0x11, "CR0: PE|ET, paging off");
    assert_eq!(a.len(), expected.len() + 1);
}

#[test]
fn kvm_mmio_dispatch() {
    if !vmkit_testkit::kvm_available("kvm_mmio_dispatch") {
        return;
    }
    let t = TestVm::new(Irqchip::None);
    t.write(CODE, guest::MMIO);
    let config = t.config(1, Topology::flat(1).unwrap());
    let mut vcpu = t.vcpus(&config).remove(0);
    vcpu.set_boot_regs(&pvh()).unwrap();
    let (pio, rec, exit) = pio_bus();
    let mmio = Bus::new();
    let dev = Arc::new(Recorder::default());
    mmio.insert(BusRange::new(0xd000_0000, 0x1000).unwrap(), dev.clone())
        .unwrap();
    let action = run_until_exit(&mut vcpu, &pio, &mmio, &exit);
    assert!(
        matches!(action, VcpuExitAction::Stop(VmStop::Exit(_))),
        "{action:?}"
    );

    let m = dev.accesses();
    assert_eq!(
        m,
        vec![
            Access {
                write: true,
                offset: 0,
                data: 0xdead_beefu32.to_le_bytes().to_vec()
            },
            Access {
                write: false,
                offset: 0x10,
                data: vec![0x5a, 0x5b, 0x5c, 0x5d]
            },
            Access {
                write: true,
                offset: 0x20,
                data: vec![0x34, 0x12]
            },
            Access {
                write: false,
                offset: 1,
                data: vec![0x5a]
            },
        ]
    );
    let p = rec.writes();
    assert_eq!(
        p[0].data,
        vec![0x5a, 0x5b, 0x5c, 0x5d],
        "MMIO read data reached the guest"
    );
    assert_eq!(p[1].data, vec![0x5a]);
    assert_eq!(p[2].data, vec![0xff; 4], "unmapped MMIO reads as all ones");
    assert_eq!(p.len(), 3);
}

#[test]
fn kvm_linux64_entry() {
    if !vmkit_testkit::kvm_available("kvm_linux64_entry") {
        return;
    }
    let t = TestVm::new(Irqchip::InKernel);
    t.write(CODE, guest::LINUX64);
    let config = t.config(1, Topology::flat(1).unwrap());
    let mut vcpu = t.vcpus(&config).remove(0);
    vcpu.set_boot_regs(&linux64()).unwrap();
    let (pio, rec, exit) = pio_bus();
    let mmio = Bus::new();
    let dev = Arc::new(Recorder::default());
    mmio.insert(BusRange::new(0xd000_0000, 0x1000).unwrap(), dev.clone())
        .unwrap();
    let action = run_until_exit(&mut vcpu, &pio, &mmio, &exit);
    assert_eq!(action, VcpuExitAction::Stop(VmStop::Exit(0)));
    let w = rec.writes();
    assert_eq!(w[0].data, 0x7000u32.to_le_bytes(), "RSI = boot_params");
    assert_eq!(w[1].data, 0x1122_3344u32.to_le_bytes(), "64-bit arithmetic");
    assert_eq!(w[2].data, 0x10u16.to_le_bytes(), "CS = 0x10");
    assert_eq!(w[3].data, (PML4 as u32).to_le_bytes(), "CR3 = PML4");
    assert_eq!(
        dev.writes()[0].data,
        0x0102_0304_0506_0708u64.to_le_bytes(),
        "8-byte MMIO write"
    );
    let sregs = vcpu.fd().get_sregs().unwrap();
    assert_eq!(sregs.efer & 0x500, 0x500, "LME|LMA");
}

#[test]
fn kvm_triple_fault_stops_the_vm() {
    if !vmkit_testkit::kvm_available("kvm_triple_fault_stops_the_vm") {
        return;
    }
    let t = TestVm::new(Irqchip::InKernel);
    t.write(CODE, guest::UD2);
    let config = t.config(1, Topology::flat(1).unwrap());
    let vcpus = t.vcpus(&config);
    vcpus[0].set_boot_regs(&pvh()).unwrap();
    let (pio, _rec, _exit) = pio_bus();
    let mut m = VcpuManager::spawn(vcpus, pio, Arc::new(Bus::new())).unwrap();
    let stop = m.wait();
    assert_eq!(stop, VmStop::TripleFault { vcpu: 0 });
    assert!(stop.is_reset());
}

#[test]
fn kvm_emulation_failure_is_reported() {
    if !vmkit_testkit::kvm_available("kvm_emulation_failure_is_reported") {
        return;
    }
    // cmpxchg16b on MMIO: KVM's emulator refuses 16-byte cmpxchg.
    let t = TestVm::new(Irqchip::None);
    t.write(CODE, guest::CMPXCHG16B_MMIO);
    let config = t.config(1, Topology::flat(1).unwrap());
    let mut vcpu = t.vcpus(&config).remove(0);
    vcpu.set_boot_regs(&BootRegs::linux64(CODE, 0, PML4))
        .unwrap();
    let (pio, _rec, exit) = pio_bus();
    let action = run_until_exit(&mut vcpu, &pio, &Bus::new(), &exit);
    let VcpuExitAction::Stop(VmStop::Error(msg)) = action else {
        panic!("expected an emulation error, got {action:?}");
    };
    assert!(msg.contains("internal error"), "{msg}");
    assert!(msg.contains("vCPU 0"), "{msg}");
    assert!(msg.contains(&format!("rip {:#x}", CODE + 0xd)), "{msg}");
}

#[test]
fn kvm_hlt_without_irqchip_halts_the_vm() {
    if !vmkit_testkit::kvm_available("kvm_hlt_without_irqchip_halts_the_vm") {
        return;
    }
    let t = TestVm::new(Irqchip::None);
    t.write(CODE, &[0xf4]); // hlt
    let config = t.config(2, Topology::flat(2).unwrap());
    let vcpus = t.vcpus(&config);
    for v in &vcpus {
        v.set_boot_regs(&pvh()).unwrap();
    }
    let (pio, _rec, _exit) = pio_bus();
    let mut m = VcpuManager::spawn(vcpus, pio, Arc::new(Bus::new())).unwrap();
    assert_eq!(m.wait(), VmStop::Halted);
}

/// Waits (without a deadline) until the guest counter at 0x3000 exceeds `above`; fails if
/// the VM stops meanwhile.
fn wait_counter_above(t: &TestVm, m: &VcpuManager, above: u32) -> u32 {
    loop {
        let c = t.read_u32(0x3000);
        if c > above {
            return c;
        }
        if let Some(stop) = m.controller().stop_reason() {
            panic!("the VM stopped while the guest should count: {stop}");
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn linux64() -> BootRegs {
    BootRegs::Linux64 {
        entry: CODE,
        boot_params: 0x7000,
        pml4: PML4,
        gdt: GdtLayout::standard(GDT, 0x520),
    }
}

#[test]
fn kvm_pause_resume_kick_while_spinning() {
    if !vmkit_testkit::kvm_available("kvm_pause_resume_kick_while_spinning") {
        return;
    }
    let t = TestVm::new(Irqchip::InKernel);
    t.write(CODE, guest::SPIN);
    let config = t.config(1, Topology::flat(1).unwrap());
    let vcpus = t.vcpus(&config);
    vcpus[0].set_boot_regs(&linux64()).unwrap();
    let (pio, rec, exit) = pio_bus();
    let mut m = VcpuManager::spawn(vcpus, pio, Arc::new(Bus::new())).unwrap();
    let ctl = m.controller().clone();
    exit.attach(ctl.clone());

    let c0 = wait_counter_above(&t, &m, 0);
    for _ in 0..3 {
        ctl.pause().unwrap();
        assert!(ctl.is_paused());
        let c1 = t.read_u32(0x3000);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(t.read_u32(0x3000), c1, "a paused guest does not run");
        let states = m.save_states().unwrap();
        assert_eq!(states.len(), 1);
        assert!(states[0].regs.rbx >= u64::from(c1));
        ctl.pause().unwrap(); // idempotent
        ctl.resume();
        wait_counter_above(&t, &m, c1);
    }
    // Kicks alone do not stop the guest.
    for _ in 0..10 {
        ctl.kick(0);
    }
    let c2 = wait_counter_above(&t, &m, c0);
    wait_counter_above(&t, &m, c2);
    assert!(matches!(
        m.save_states(),
        Err(vmkit_vcpu::VcpuError::NotPaused(_))
    ));

    // Let the guest report and exit through the exit port (a device on the vCPU thread).
    t.write_u32(0x3004, 1);
    assert_eq!(m.wait(), VmStop::Exit(7));
    let w = rec.u32_writes();
    assert!(w[0] > c2, "counter {} after {c2}", w[0]);
    assert_eq!(&w[1..], &[0xcafe, 0x5566_7788]);
    assert_eq!(ctl.stop_reason(), Some(VmStop::Exit(7)));
}

/// Collects 4-byte writes at one port (APIC IDs).
#[derive(Default)]
struct IdCollector {
    ids: Mutex<Vec<u32>>,
    cond: std::sync::Condvar,
}

impl BusDevice for IdCollector {
    fn read(&self, _: u64, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _: u64, _: u64, data: &[u8]) {
        if let Ok(b) = <[u8; 4]>::try_from(data) {
            self.ids.lock().unwrap().push(u32::from_le_bytes(b));
            self.cond.notify_all();
        }
    }
}

#[test]
fn kvm_64_vcpus_report_their_apic_ids() {
    if !vmkit_testkit::kvm_available("kvm_64_vcpus_report_their_apic_ids") {
        return;
    }
    let t = TestVm::new(Irqchip::InKernel);
    t.write(CODE, guest::APIC_ID);
    // 2 sockets x 11 cores x 3 threads: APIC IDs are sparse (2 thread bits, 4 core bits).
    let topo = Topology::new(2, 11, 3).unwrap();
    let config = t.config(64, topo);
    let vcpus = t.vcpus(&config);
    assert_eq!(vcpus.len(), 64);
    for v in &vcpus {
        v.set_boot_regs(&pvh()).unwrap();
    }
    let expected: BTreeSet<u32> = (0..64).map(|i| topo.apic_id(i).unwrap()).collect();
    assert_eq!(expected.len(), 64);
    assert_eq!(
        vcpus.iter().map(|v| v.apic_id()).collect::<BTreeSet<_>>(),
        expected
    );

    let pio = Arc::new(Bus::new());
    let ids = Arc::new(IdCollector::default());
    pio.insert(BusRange::new(0x510, 4).unwrap(), ids.clone())
        .unwrap();
    let mut m = VcpuManager::spawn(vcpus, pio, Arc::new(Bus::new())).unwrap();
    {
        let mut got = ids.ids.lock().unwrap();
        while got.len() < 64 {
            got = ids.cond.wait(got).unwrap();
        }
        assert_eq!(got.iter().copied().collect::<BTreeSet<_>>(), expected);
    }
    // Every vCPU now sits in HLT inside KVM: pausing must kick all of them out.
    m.pause().unwrap();
    let states = m.save_states().unwrap();
    assert_eq!(states.len(), 64);
    for (i, s) in states.iter().enumerate() {
        assert_eq!(s.apic_id, topo.apic_id(i as u32).unwrap());
        // Parked either in HLT (inside KVM) or just before it, in the cli/hlt loop.
        assert!(
            s.mp_state == KVM_MP_STATE_HALTED || s.mp_state == KVM_MP_STATE_RUNNABLE,
            "vCPU {i}: MP state {}",
            s.mp_state
        );
        assert!(
            (CODE + 0x10..=CODE + 0x14).contains(&s.regs.rip),
            "vCPU {i}: rip {:#x}",
            s.regs.rip
        );
    }
    m.resume();
    m.request_stop(VmStop::Exit(0));
    assert_eq!(m.wait(), VmStop::Exit(0));
}

#[test]
fn kvm_cpuid_topology_seen_by_the_guest() {
    if !vmkit_testkit::kvm_available("kvm_cpuid_topology_seen_by_the_guest") {
        return;
    }
    let t = TestVm::new(Irqchip::None);
    t.write(CODE, guest::CPUID);
    let topo = Topology::new(2, 3, 2).unwrap();
    let config = t.config(12, topo);
    let policy = config.cpuid().clone();
    for (i, mut vcpu) in t.vcpus(&config).into_iter().enumerate() {
        let i = i as u32;
        vcpu.set_boot_regs(&pvh()).unwrap();
        let (pio, rec, exit) = pio_bus();
        assert_eq!(
            run_until_exit(&mut vcpu, &pio, &Bus::new(), &exit),
            VcpuExitAction::Halted
        );
        let w = rec.u32_writes();
        assert_eq!(w.len(), 17, "vCPU {i}");
        let id = topo.apic_id(i).unwrap();
        let (socket, core, thread) = topo.coordinates(i);
        assert_eq!(w[0] >> 24, id, "vCPU {i}: leaf 1 EBX[31:24]");
        assert_eq!((w[0] >> 16) & 0xff, 8, "addressable IDs per package");
        // Leaf 0xB subleaf 0 (SMT) and 1 (core), leaf 0x1F subleaf 1.
        assert_eq!(&w[1..5], &[1, 2, 0x100, id], "vCPU {i}: 0xB.0");
        assert_eq!(&w[5..9], &[3, 6, 0x201, id], "vCPU {i}: 0xB.1");
        assert_eq!(&w[9..13], &[3, 6, 0x201, id], "vCPU {i}: 0x1F.1");
        // The guest's own decoding of the x2APIC ID.
        assert_eq!((id >> 3, (id >> 1) & 3, id & 1), (socket, core, thread));
        if policy.is_amd() {
            assert_eq!(
                &w[13..16],
                &[id, (1 << 8) | core, socket],
                "vCPU {i}: 0x8000001E"
            );
        }
    }
}

const XMM0: [u8; 16] = *b"vmkit xmm0 value";

fn spin_vm(t: &TestVm) -> (VcpuManager, Arc<Recorder>, Arc<ExitPort>) {
    t.write(CODE, guest::SPIN);
    // vCPU 0 spins; vCPU 1 is an AP waiting for INIT/SIPI.
    let config = t.config(2, Topology::flat(2).unwrap());
    let vcpus = t.vcpus(&config);
    vcpus[0].set_boot_regs(&linux64()).unwrap();
    let (pio, rec, exit) = pio_bus();
    let m = VcpuManager::spawn(vcpus, pio, Arc::new(Bus::new())).unwrap();
    exit.attach(m.controller().clone());
    (m, rec, exit)
}

#[test]
fn kvm_state_save_restore_into_a_fresh_vm() {
    if !vmkit_testkit::kvm_available("kvm_state_save_restore_into_a_fresh_vm") {
        return;
    }
    let a = TestVm::new(Irqchip::InKernel);
    let (m, _rec, _exit) = spin_vm(&a);
    wait_counter_above(&a, &m, 1000);
    m.pause().unwrap();
    let states = m.save_states().unwrap();
    drop(m); // stops and joins VM A's threads
    assert_eq!(
        states[1].mp_state, KVM_MP_STATE_UNINITIALIZED,
        "AP still waits for SIPI"
    );
    let saved_rbx = states[0].regs.rbx;
    assert!(saved_rbx > 1000);
    assert!(states[0].xsave.is_some() && states[0].lapic.is_some());
    assert!(states[0]
        .msrs
        .iter()
        .any(|m| m.index == 0xc000_0102 && m.data == 0xcafe));
    assert!(states[0].msrs.iter().all(|m| m.index != 0x10a));

    // This host's nested KVM loses the guest's SSE registers once a vCPU has run for a while
    // (with or without kicks), and the guest cannot execute SSE instructions here at all; so
    // the XSAVE path is checked by planting XMM0 (offset 160 of the XSAVE area) in the saved
    // state and reading it back from the restored vCPU.
    let mut states = states;
    let area = states[0].xsave.as_mut().unwrap();
    area[160..176].copy_from_slice(&XMM0);
    area[512] |= 2; // XSTATE_BV: SSE state present

    // Through the versioned encoding, as a snapshot file would.
    let encoded: Vec<Vec<u8>> = states.iter().map(|s| s.encode().unwrap()).collect();
    let decoded: Vec<VcpuState> = encoded
        .iter()
        .map(|b| VcpuState::decode(b).unwrap())
        .collect();
    assert_eq!(decoded, states);

    let b = TestVm::new(Irqchip::InKernel);
    b.copy_memory_from(&a);
    drop(a);
    b.write_u32(0x3004, 1); // ask the guest to report once it runs again
    let config = b.config(2, Topology::flat(2).unwrap());
    let v0 = Vcpu::restore(
        VcpuRestoreArgs {
            vm: b.vm.clone(),
            config: config.clone(),
        },
        &decoded[0],
    )
    .unwrap();
    let v1 = Vcpu::restore_new(&b.vm, config, &decoded[1]).unwrap();
    assert_eq!(v0.save_state().unwrap().regs, states[0].regs);
    assert_eq!(
        v0.fd().get_fpu().unwrap().xmm[0],
        XMM0,
        "XMM0 restored through XSAVE"
    );
    let (pio, rec, exit) = pio_bus();
    let mut m = VcpuManager::spawn(vec![v0, v1], pio, Arc::new(Bus::new())).unwrap();
    exit.attach(m.controller().clone());
    assert_eq!(m.wait(), VmStop::Exit(7));
    let w = rec.u32_writes();
    assert!(
        u64::from(w[0]) == saved_rbx || u64::from(w[0]) == saved_rbx + 1,
        "counter continued from {saved_rbx}: {}",
        w[0]
    );
    assert_eq!(&w[1..], &[0xcafe, 0x5566_7788], "MSR and R12 survived");
    let after = m.into_vcpus();
    assert_eq!(
        after[1].save_state().unwrap().mp_state,
        KVM_MP_STATE_UNINITIALIZED
    );
}

#[test]
fn kvm_restore_through_a_paused_manager() {
    if !vmkit_testkit::kvm_available("kvm_restore_through_a_paused_manager") {
        return;
    }
    let a = TestVm::new(Irqchip::InKernel);
    let (m, _rec, _exit) = spin_vm(&a);
    wait_counter_above(&a, &m, 10);
    m.pause().unwrap();
    let states = m.save_states().unwrap();
    drop(m);

    let b = TestVm::new(Irqchip::InKernel);
    b.copy_memory_from(&a);
    b.write_u32(0x3004, 1);
    let config = b.config(2, Topology::flat(2).unwrap());
    let vcpus: Vec<Vcpu> = (0..2)
        .map(|i| Vcpu::new(&b.vm, i, config.clone()).unwrap())
        .collect();
    let (pio, rec, exit) = pio_bus();
    let mut m = VcpuManager::spawn_paused(vcpus, pio, Arc::new(Bus::new())).unwrap();
    exit.attach(m.controller().clone());
    // Returns once both threads are parked.
    m.pause().unwrap();
    // A state for the wrong vCPU is refused with a clear error.
    let mut wrong = states[0].clone();
    wrong.apic_id = 9;
    let err = m.restore_states(&[wrong, states[1].clone()]).unwrap_err();
    assert!(err.to_string().contains("APIC ID"), "{err}");
    m.restore_states(&states).unwrap();
    m.resume();
    assert_eq!(m.wait(), VmStop::Exit(7));
    assert_eq!(&rec.u32_writes()[1..], &[0xcafe, 0x5566_7788]);
}

#[test]
fn kvm_fpu_state_is_saved_through_xsave() {
    if !vmkit_testkit::kvm_available("kvm_fpu_state_is_saved_through_xsave") {
        return;
    }
    let t = TestVm::new(Irqchip::InKernel);
    let config = t.config(1, Topology::flat(1).unwrap());
    let mut vcpu = t.vcpus(&config).remove(0);
    vcpu.set_boot_regs(&linux64()).unwrap();
    let boot = vcpu.save_state().unwrap();
    let xs = boot.xsave.as_ref().unwrap();
    assert_eq!(u16::from_le_bytes([xs[0], xs[1]]), 0x37f, "boot FCW");
    // (This host's KVM_GET_FPU reports MXCSR as 0; the XSAVE area has the real value.)
    assert_eq!(
        u32::from_le_bytes(xs[24..28].try_into().unwrap()),
        0x1f80,
        "boot MXCSR"
    );
    assert_eq!(Some(xs.len()), config.xsave_size());
    // Plant XMM0 in both the legacy FPU view and the XSAVE area, restore, read back.
    let mut st = boot.clone();
    st.fpu.xmm[0] = XMM0;
    let area = st.xsave.as_mut().unwrap();
    area[160..176].copy_from_slice(&XMM0);
    area[512] |= 2; // XSTATE_BV: SSE state present
    vcpu.restore_state(&st).unwrap();
    let after = vcpu.save_state().unwrap();
    assert_eq!(after.fpu.xmm[0], XMM0);
    assert_eq!(
        &after.xsave.as_ref().unwrap()[160..176],
        &XMM0,
        "XMM0 in the XSAVE legacy area"
    );
    assert_eq!(vcpu.fd().get_fpu().unwrap().xmm[0], XMM0);
}

#[test]
fn kvm_pause_from_vcpu_thread_is_refused() {
    if !vmkit_testkit::kvm_available("kvm_pause_from_vcpu_thread_is_refused") {
        return;
    }
    struct Pauser(
        Mutex<Option<Arc<vmkit_vcpu::VmController>>>,
        Mutex<Option<String>>,
    );
    impl BusDevice for Pauser {
        fn read(&self, _: u64, _: u64, d: &mut [u8]) {
            d.fill(0)
        }
        fn write(&self, _: u64, _: u64, _: &[u8]) {
            let ctl = self.0.lock().unwrap().clone().unwrap();
            *self.1.lock().unwrap() = Some(ctl.pause().unwrap_err().to_string());
            ctl.request_stop(VmStop::Exit(3));
        }
    }
    let t = TestVm::new(Irqchip::InKernel);
    t.write(CODE, &[0xe6, 0x80, 0xf4]); // out %al, $0x80; hlt
    let config = t.config(1, Topology::flat(1).unwrap());
    let vcpus = t.vcpus(&config);
    vcpus[0].set_boot_regs(&pvh()).unwrap();
    let pio = Arc::new(Bus::new());
    let dev = Arc::new(Pauser(Mutex::new(None), Mutex::new(None)));
    pio.insert(BusRange::new(0x80, 1).unwrap(), dev.clone())
        .unwrap();
    let mut m = VcpuManager::spawn_paused(vcpus, pio, Arc::new(Bus::new())).unwrap();
    *dev.0.lock().unwrap() = Some(m.controller().clone());
    m.resume();
    assert_eq!(m.wait(), VmStop::Exit(3));
    let msg = dev.1.lock().unwrap().clone().unwrap();
    assert!(msg.contains("vCPU thread"), "{msg}");
}
