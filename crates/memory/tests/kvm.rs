// SPDX-License-Identifier: Apache-2.0 OR MIT
//! KVM tests: memory slots and dirty tracking with a real vCPU running a tiny real-mode
//! program. Every test needs /dev/kvm.

use std::sync::Arc;

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmkit_memory::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmkit_memory::{
    Backing, DirtyRange, Error, LayoutConfig, Ram, RamConfig, SlotTable, MMIO_GAP_END,
    MMIO_GAP_START,
};

const CODE: u64 = 0x1000;

/// Real-mode program: writes one byte to four pages, two of them above a small MMIO gap at
/// [0x10000, 0x20000), then halts.
const PROGRAM: &[u8] = &[
    0xC6, 0x06, 0x00, 0x30, 0xAA, // mov byte [0x3000], 0xAA        -> 0x03000
    0xC6, 0x06, 0x10, 0x50, 0xBB, // mov byte [0x5010], 0xBB        -> 0x05010
    0xB8, 0x00, 0x20, //             mov ax, 0x2000
    0x8E, 0xD8, //                   mov ds, ax
    0xC6, 0x06, 0xF0, 0x1F, 0xCC, // mov byte [0x1ff0], 0xCC        -> 0x21ff0
    0xB8, 0x00, 0x30, //             mov ax, 0x3000
    0x8E, 0xD8, //                   mov ds, ax
    0xC6, 0x06, 0x00, 0x00, 0xDD, // mov byte [0x0000], 0xDD        -> 0x30000
    0xF4, //                         hlt
];

/// (address written, value) by PROGRAM.
const WRITES: [(u64, u8); 4] = [
    (0x3000, 0xAA),
    (0x5010, 0xBB),
    (0x21ff0, 0xCC),
    (0x30000, 0xDD),
];

/// Pages PROGRAM dirties, as runs.
fn program_pages() -> Vec<DirtyRange> {
    [0x3000, 0x5000, 0x21000, 0x30000]
        .into_iter()
        .map(|a| DirtyRange {
            start: GuestAddress(a),
            pages: 1,
        })
        .collect()
}

fn small_gap_ram() -> Ram {
    RamConfig::new(1 << 20)
        .layout(LayoutConfig::new().mmio_gap(0x1_0000, 0x2_0000))
        .backing(Backing::Memfd)
        .build()
        .expect("guest RAM")
}

fn new_vm() -> (Kvm, Arc<VmFd>) {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    (kvm, Arc::new(vm))
}

/// Points the vCPU at CODE in real mode with flat segments at 0.
fn reset_vcpu(vcpu: &VcpuFd) {
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
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");
}

fn run_to_hlt(vcpu: &mut VcpuFd) {
    for _ in 0..100 {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => return,
            Ok(exit) => panic!("unexpected vCPU exit: {exit:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => panic!("KVM_RUN failed: {e}"),
        }
    }
    panic!("vCPU did not halt");
}

#[test]
fn kvm_guest_writes_are_logged_exactly() {
    if !vmkit_testkit::kvm_available("kvm_guest_writes_are_logged_exactly") {
        return;
    }
    let (_kvm, vm) = new_vm();
    let ram = small_gap_ram();
    let mem = ram.memory();
    let mut slots = SlotTable::new(vm.clone());
    let ids = slots.register_memory(mem, true).expect("register RAM");
    assert_eq!(ids, vec![0, 1]);
    let infos: Vec<_> = slots.slots().copied().collect();
    assert_eq!(infos.len(), 2);
    for (info, region) in infos.iter().zip(mem.iter()) {
        assert_eq!(info.guest_addr, region.start_addr());
        assert_eq!(info.size, region.len());
        assert_eq!(info.host_addr, region.as_ptr() as u64);
        assert!(info.dirty_log);
    }
    assert_eq!(infos[1].guest_addr, GuestAddress(0x2_0000));
    assert_eq!(
        slots.slot_at(GuestAddress(0x2_5000)).map(|s| s.slot),
        Some(1)
    );
    assert!(slots.slot_at(GuestAddress(0x1_5000)).is_none());

    // Loading the program is a VMM write: only vm-memory's bitmap sees it.
    mem.write_slice(PROGRAM, GuestAddress(CODE)).unwrap();
    assert!(slots.take_kvm_dirty_pages().unwrap().is_empty());
    let loaded = slots.take_dirty_pages(mem).unwrap();
    assert_eq!(
        loaded.ranges().collect::<Vec<_>>(),
        vec![DirtyRange {
            start: GuestAddress(CODE),
            pages: 1
        }]
    );

    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    reset_vcpu(&vcpu);
    run_to_hlt(&mut vcpu);
    for (addr, value) in WRITES {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(addr)).unwrap(),
            value,
            "{addr:#x}"
        );
    }

    // KVM logs guest writes only: the code page (fetched, never written) is not dirty.
    let dirty = slots.take_dirty_pages(mem).unwrap();
    assert_eq!(dirty.ranges().collect::<Vec<_>>(), program_pages());
    assert_eq!(dirty.count(), 4);
    assert!(!dirty.contains(GuestAddress(CODE)));
    // Reading cleared both logs.
    assert!(slots.take_dirty_pages(mem).unwrap().is_empty());

    // Running again dirties the same pages again (KVM re-protected them on clear).
    reset_vcpu(&vcpu);
    run_to_hlt(&mut vcpu);
    let again = slots.take_kvm_dirty_pages().unwrap();
    assert_eq!(again.ranges().collect::<Vec<_>>(), program_pages());
    assert!(slots.take_kvm_dirty_pages().unwrap().is_empty());
}

#[test]
fn kvm_dirty_logging_toggles() {
    if !vmkit_testkit::kvm_available("kvm_dirty_logging_toggles") {
        return;
    }
    let (_kvm, vm) = new_vm();
    let ram = small_gap_ram();
    let mem = ram.memory();
    let mut slots = SlotTable::new(vm.clone());
    slots.register_memory(mem, false).unwrap();
    assert!(slots.slots().all(|s| !s.dirty_log));
    mem.write_slice(PROGRAM, GuestAddress(CODE)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();

    // Logging off: the guest runs, KVM reports nothing.
    reset_vcpu(&vcpu);
    run_to_hlt(&mut vcpu);
    assert!(slots.take_kvm_dirty_pages().unwrap().is_empty());

    // Logging on for the low slot only: only its two pages show up.
    slots.set_dirty_logging(0, true).unwrap();
    assert!(slots.slot(0).unwrap().dirty_log);
    reset_vcpu(&vcpu);
    run_to_hlt(&mut vcpu);
    let low: Vec<_> = slots.take_kvm_dirty_pages().unwrap().ranges().collect();
    assert_eq!(low, program_pages()[..2].to_vec());

    // On everywhere: all four.
    slots.set_dirty_logging_all(true).unwrap();
    reset_vcpu(&vcpu);
    run_to_hlt(&mut vcpu);
    let all: Vec<_> = slots.take_kvm_dirty_pages().unwrap().ranges().collect();
    assert_eq!(all, program_pages());

    // Off again: nothing.
    slots.set_dirty_logging_all(false).unwrap();
    reset_vcpu(&vcpu);
    run_to_hlt(&mut vcpu);
    assert!(slots.take_kvm_dirty_pages().unwrap().is_empty());

    assert!(matches!(
        slots.set_dirty_logging(7, true),
        Err(Error::UnknownSlot(7))
    ));
}

#[test]
fn kvm_slot_bookkeeping_and_removal() {
    if !vmkit_testkit::kvm_available("kvm_slot_bookkeeping_and_removal") {
        return;
    }
    let (_kvm, vm) = new_vm();
    let ram = small_gap_ram();
    let mut slots = SlotTable::with_first_slot(vm.clone(), 3);
    assert!(slots.slot_limit() >= 32);
    assert_eq!(
        slots.register_memory(ram.memory(), true).unwrap(),
        vec![3, 4]
    );

    // The same memory again overlaps; the failed call leaves the table unchanged.
    let err = slots.register_memory(ram.memory(), true).unwrap_err();
    assert!(matches!(err, Error::SlotOverlap { slot: 3, .. }), "{err}");
    assert_eq!(slots.slots().count(), 2);

    let removed = slots.remove(3).unwrap();
    assert_eq!(removed.guest_addr, GuestAddress(0));
    assert!(matches!(slots.remove(3), Err(Error::UnknownSlot(3))));
    assert_eq!(slots.slots().map(|s| s.slot).collect::<Vec<_>>(), vec![4]);
    // The freed id is reused.
    let low = ram.memory().iter().next().unwrap();
    assert_eq!(slots.register_region(low, false).unwrap(), 3);

    // Atomicity: of another RAM's two regions, the second overlaps slot 4, so neither is added.
    let other = RamConfig::new(0x3_0000)
        .layout(LayoutConfig::new().mmio_gap(0x1_0000, 0x2_0000))
        .build()
        .unwrap();
    slots.remove(3).unwrap();
    let err = slots.register_memory(other.memory(), false).unwrap_err();
    assert!(matches!(err, Error::SlotOverlap { slot: 4, .. }), "{err}");
    assert_eq!(slots.slots().map(|s| s.slot).collect::<Vec<_>>(), vec![4]);

    // Dropping the table deletes the slots from KVM: the range is free again for a new table.
    drop(slots);
    let mut again = SlotTable::new(vm);
    assert_eq!(
        again.register_memory(ram.memory(), true).unwrap(),
        vec![0, 1]
    );
}

#[test]
fn kvm_default_gap_slots_above_4g() {
    if !vmkit_testkit::kvm_available("kvm_default_gap_slots_above_4g") {
        return;
    }
    let (_kvm, vm) = new_vm();
    // 5 GiB of address space, only touched pages are ever allocated.
    let ram = RamConfig::new(5 << 30)
        .backing(Backing::Memfd)
        .noreserve(true)
        .build()
        .unwrap();
    let mem = ram.memory();
    let mut slots = SlotTable::new(vm);
    slots.register_memory(mem, true).unwrap();
    let infos: Vec<_> = slots.slots().map(|s| (s.guest_addr.0, s.size)).collect();
    assert_eq!(
        infos,
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START)
        ]
    );
    assert!(slots.take_dirty_pages(mem).unwrap().is_empty());
    mem.write_obj(1u64, GuestAddress(MMIO_GAP_END + 0x4_2008))
        .unwrap();
    mem.write_obj(1u64, GuestAddress(MMIO_GAP_START - 8))
        .unwrap();
    let dirty = slots.take_dirty_pages(mem).unwrap();
    assert_eq!(
        dirty.pages().collect::<Vec<_>>(),
        vec![
            GuestAddress(MMIO_GAP_START - 0x1000),
            GuestAddress(MMIO_GAP_END + 0x4_2000)
        ]
    );
    assert!(slots.take_dirty_pages(mem).unwrap().is_empty());
}
