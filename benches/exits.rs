// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Exit round-trip harness: how much our vCPU run loop and Bus add to a KVM exit.
//!
//! `cargo bench --bench exits` (needs `/dev/kvm`). A real-mode guest loops on one port write
//! (`out 0x80, al`) or one MMIO write (to an address outside guest RAM). The same guest runs
//! (a) under `vmkit_vcpu::VcpuManager` — the vCPU thread, its control checks, `Vcpu::run_once`
//! and the `Bus` dispatch to a device that counts accesses and stops the VM after N — and
//! (b) under a bare `kvm-ioctls` loop that calls `VcpuFd::run` and counts the exits itself
//! (the floor). Rounds are interleaved; the harness prints ns per exit (median of rounds),
//! the ratio vmkit/bare, and JSON. `VMKIT_BENCH_EXITS` sets exits per round (default 100000).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmkit::device::{Bus, BusDevice, BusRange};
use vmkit::vcpu::{
    CpuidConfig, CpuidPolicy, Irqchip, Topology, Vcpu, VcpuConfig, VcpuManager, VmController,
    VmStop,
};

const MEM_SIZE: usize = 0x10000;
const CODE_ADDR: u64 = 0x1000;
/// `out 0x80, al; jmp $-2`
const PIO_LOOP: &[u8] = &[0xe6, 0x80, 0xeb, 0xfc];
/// `mov [0x0000], al; jmp $-4` with DS = 0x1000, i.e. a write to 0x10000 (outside RAM).
const MMIO_LOOP: &[u8] = &[0x88, 0x06, 0x00, 0x00, 0xeb, 0xfa];
const MMIO_ADDR: u64 = 0x10000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Pio,
    Mmio,
}

struct Guest {
    vm: VmFd,
    _mem: *mut u8,
}

/// A VM with 64 KiB of RAM holding the loop for `kind`.
fn guest(kvm: &Kvm, kind: Kind) -> Guest {
    let vm = kvm.create_vm().expect("create VM");
    vm.create_irq_chip().expect("irqchip");
    // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED, "mmap guest RAM");
    let mem = mem.cast::<u8>();
    let code = match kind {
        Kind::Pio => PIO_LOOP,
        Kind::Mmio => MMIO_LOOP,
    };
    // SAFETY: the mapping is MEM_SIZE bytes and the code fits at CODE_ADDR.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), mem.add(CODE_ADDR as usize), code.len())
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the mapping outlives the VM (it is leaked with the Guest; benches are short).
    unsafe { vm.set_user_memory_region(region) }.expect("memory slot");
    Guest { vm, _mem: mem }
}

fn real_mode(fd: &VcpuFd) {
    let mut sregs = fd.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = MMIO_ADDR;
    sregs.ds.selector = (MMIO_ADDR >> 4) as u16;
    fd.set_sregs(&sregs).expect("set sregs");
    let mut regs = fd.get_regs().expect("regs");
    regs.rip = CODE_ADDR;
    regs.rflags = 2;
    fd.set_regs(&regs).expect("set regs");
}

/// Counts accesses and stops the VM after `limit`.
struct Counter {
    seen: AtomicU64,
    limit: u64,
    controller: OnceLock<Arc<VmController>>,
}

impl Counter {
    fn hit(&self) {
        if self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.limit {
            if let Some(c) = self.controller.get() {
                c.request_stop(VmStop::Exit(0));
            }
        }
    }
}

impl BusDevice for Counter {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {
        self.hit();
    }
}

fn run_vmkit(kvm: &Kvm, kind: Kind, exits: u64) -> Duration {
    let g = guest(kvm, kind);
    let cpuid = CpuidPolicy::from_kvm(
        kvm,
        &CpuidConfig::new(1, Topology::flat(1).expect("topology")),
    )
    .expect("cpuid");
    let config = Arc::new(VcpuConfig::new(kvm, &g.vm, cpuid, Irqchip::InKernel).expect("config"));
    let mut vcpu = Vcpu::new(&g.vm, 0, config).expect("vcpu");
    vcpu.configure().expect("configure");
    real_mode(vcpu.fd());
    let counter = Arc::new(Counter {
        seen: AtomicU64::new(0),
        limit: exits,
        controller: OnceLock::new(),
    });
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    match kind {
        Kind::Pio => pio.insert(BusRange::new(0x80, 1).expect("range"), counter.clone()),
        Kind::Mmio => mmio.insert(BusRange::new(MMIO_ADDR, 8).expect("range"), counter.clone()),
    }
    .expect("insert");
    let start = Instant::now();
    let mut manager = VcpuManager::spawn_paused(vec![vcpu], pio, mmio).expect("spawn");
    let _ = counter.controller.set(manager.controller().clone());
    manager.controller().resume();
    let reason = manager.wait();
    let elapsed = start.elapsed();
    assert_eq!(reason, VmStop::Exit(0), "the VM stops after {exits} exits");
    elapsed
}

fn run_bare(kvm: &Kvm, kind: Kind, exits: u64) -> Duration {
    let g = guest(kvm, kind);
    let mut fd = g.vm.create_vcpu(0).expect("vcpu");
    real_mode(&fd);
    let start = Instant::now();
    let mut seen = 0u64;
    let handle = std::thread::spawn(move || {
        while seen < exits {
            match fd.run().expect("KVM_RUN") {
                VcpuExit::IoOut(0x80, _) if kind == Kind::Pio => seen += 1,
                VcpuExit::MmioWrite(MMIO_ADDR, _) if kind == Kind::Mmio => seen += 1,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    });
    handle.join().expect("bare loop");
    start.elapsed()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Ok(kvm) = Kvm::new() else {
        eprintln!("exits bench: /dev/kvm cannot be opened; nothing to measure");
        return;
    };
    let exits: u64 = std::env::var("VMKIT_BENCH_EXITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rounds = 7;
    let mut json = Vec::new();
    println!(
        "{:>5} {:>16} {:>16} {:>8}",
        "exit", "vmkit ns/exit", "bare ns/exit", "ratio"
    );
    for kind in [Kind::Pio, Kind::Mmio] {
        let mut ours = Vec::new();
        let mut bare = Vec::new();
        for _ in 0..rounds {
            ours.push(run_vmkit(&kvm, kind, exits).as_nanos() as f64 / exits as f64);
            bare.push(run_bare(&kvm, kind, exits).as_nanos() as f64 / exits as f64);
        }
        ours.sort_by(f64::total_cmp);
        bare.sort_by(f64::total_cmp);
        let (o, b) = (ours[rounds / 2], bare[rounds / 2]);
        let name = format!("{kind:?}").to_lowercase();
        println!("{name:>5} {o:>16.1} {b:>16.1} {:>8.3}", o / b);
        json.push(format!(
            "{{\"exit\":\"{name}\",\"exits_per_round\":{exits},\"rounds\":{rounds},\"vmkit_ns\":{o:.1},\"bare_ns\":{b:.1},\"ratio\":{:.4}}}",
            o / b
        ));
    }
    println!("{{\"exits\":[{}]}}", json.join(","));
}
