// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Boots the embedded guest under KVM with a minimal VMM written right here (kvm-ioctls, one
//! thread per vCPU, in-kernel irqchip, PIO exits for COM1 / POST / exit port), through both
//! entry points, on one and on several vCPUs, and through its panic and exception paths.
//! Needs /dev/kvm (tests are named `kvm_*`).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_segment, kvm_userspace_memory_region, CpuId,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmkit_guest::abi::{self, PostCode};
use vmkit_guest::{inspect_elf, parse_report, BootProtocol, ReportError};

const MEM_SIZE: usize = 128 << 20;
const START_INFO: u64 = 0x6000;
const MEMMAP: u64 = 0x6100;
const CMDLINE_PVH: u64 = 0x7000;
const BOOT_PARAMS: u64 = 0x7000;
const CMDLINE_LINUX: u64 = 0x6000;
const GDT: u64 = 0x500;
const PML4: u64 = 0x9000;
const RSDP: u64 = 0xE_0000;
/// Give up on a guest after this long (a hung guest must not hang the test run).
const WATCHDOG: Duration = Duration::from_secs(60);

struct GuestMem {
    ptr: *mut u8,
}

// SAFETY: the mapping is plain anonymous memory shared with KVM; tests only write it before
// the vCPUs run.
unsafe impl Send for GuestMem {}
// SAFETY: see above.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    fn new() -> GuestMem {
        // SAFETY: anonymous private mapping; checked for failure below.
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
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest memory");
        GuestMem { ptr: ptr.cast() }
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        let a = addr as usize;
        assert!(a + bytes.len() <= MEM_SIZE, "write beyond guest memory");
        // SAFETY: bounds checked above; the mapping lives as long as `self`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(a), bytes.len()) }
    }

    fn write_u16(&self, addr: u64, v: u16) {
        self.write(addr, &v.to_le_bytes());
    }
    fn write_u32(&self, addr: u64, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }
    fn write_u64(&self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    fn checksum_fix(&self, addr: u64, len: usize, at: u64) {
        self.write(at, &[0]);
        // SAFETY: the range was written just before, inside the mapping.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.add(addr as usize), len) };
        let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        self.write(at, &[0u8.wrapping_sub(sum)]);
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

#[derive(Default)]
struct Shared {
    serial: Vec<u8>,
    posts: Vec<(u8, Duration)>,
    exit: Option<Result<u8, String>>,
}

struct Machine {
    /// Ignore writes to the exit port and the i8042 reset (to test the triple-fault fallback).
    deaf: bool,
    _kvm: Kvm,
    vm: VmFd,
    mem: Arc<GuestMem>,
    vcpus: Vec<VcpuFd>,
    entry64: u64,
    pvh_entry: u32,
}

fn machine(ncpus: u32) -> Machine {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    let _ = vm.set_tss_address(0xFFFB_D000);
    vm.create_irq_chip().expect("in-kernel irqchip");
    let mem = Arc::new(GuestMem::new());
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the region is our live anonymous mapping of MEM_SIZE bytes, kept alive by `mem`
    // for as long as the VM (the Machine holds both).
    unsafe { vm.set_user_memory_region(region) }.expect("memory region");

    let image = vmkit_guest::elf();
    let info = inspect_elf(image).expect("valid guest ELF");
    for s in &info.segments {
        let start = s.offset as usize;
        mem.write(s.paddr, &image[start..start + s.filesz as usize]);
    }

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("supported CPUID");
    let mut vcpus = Vec::new();
    for id in 0..ncpus {
        let vcpu = vm.create_vcpu(u64::from(id)).expect("create vCPU");
        vcpu.set_cpuid2(&cpuid_for(&supported, id, ncpus))
            .expect("set CPUID");
        vcpus.push(vcpu);
    }
    Machine {
        deaf: false,
        _kvm: kvm,
        vm,
        mem,
        vcpus,
        entry64: info.entry,
        pvh_entry: info.pvh_entry.expect("PVH note"),
    }
}

/// The supported CPUID with this vCPU's APIC ID in leaves 1 and 0xB, and a leaf 0xB that
/// describes `ncpus` cores of one thread each.
fn cpuid_for(supported: &CpuId, id: u32, ncpus: u32) -> CpuId {
    let core_shift = 32 - (ncpus.max(1) - 1).leading_zeros();
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| e.function != 0xB && e.function != 0x1F)
        .copied()
        .collect();
    for e in entries.iter_mut() {
        if e.function == 1 {
            e.ebx = (e.ebx & 0x00FF_FFFF) | (id << 24);
        }
        if e.function == 0 && e.eax < 0xB {
            e.eax = 0xB;
        }
    }
    let leaf_b = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
        function: 0xB,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: id,
        ..Default::default()
    };
    entries.push(leaf_b(0, 0, 1, 1 << 8));
    entries.push(leaf_b(1, core_shift, ncpus, (2 << 8) | 1));
    entries.push(leaf_b(2, 0, 0, 2));
    CpuId::from_entries(&entries).expect("CPUID entries")
}

fn flat_segment(selector: u16, code: bool, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long && code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn write_memmap(mem: &GuestMem) -> u32 {
    let entries = [
        (0u64, 0x9_FC00u64, 1u32),
        (0xF_0000, 0x1_0000, 2),
        (0x10_0000, MEM_SIZE as u64 - 0x10_0000, 1),
    ];
    for (i, (base, size, kind)) in entries.iter().enumerate() {
        let e = MEMMAP + 24 * i as u64;
        mem.write_u64(e, *base);
        mem.write_u64(e + 8, *size);
        mem.write_u32(e + 16, *kind);
    }
    entries.len() as u32
}

fn setup_pvh(m: &Machine, cmdline: &str, rsdp: u64) {
    let mem = &m.mem;
    mem.write(CMDLINE_PVH, cmdline.as_bytes());
    mem.write(CMDLINE_PVH + cmdline.len() as u64, &[0]);
    let n = write_memmap(mem);
    mem.write_u32(START_INFO, 0x336e_c578);
    mem.write_u32(START_INFO + 4, 1);
    mem.write_u64(START_INFO + 0x18, CMDLINE_PVH);
    mem.write_u64(START_INFO + 0x20, rsdp);
    mem.write_u64(START_INFO + 0x28, MEMMAP);
    mem.write_u32(START_INFO + 0x30, n);

    let vcpu = &m.vcpus[0];
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs = flat_segment(0x08, true, false);
    let data = flat_segment(0x10, false, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = u64::from(m.pvh_entry);
    regs.rbx = START_INFO;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("set regs");
}

fn setup_linux64(m: &Machine, cmdline: &str) {
    let mem = &m.mem;
    // VMM GDT: code at 0x10, data at 0x18 (as the Linux boot protocol describes).
    mem.write_u64(GDT + 0x10, 0x00AF_9B00_0000_FFFF);
    mem.write_u64(GDT + 0x18, 0x00CF_9300_0000_FFFF);
    // Identity map of 4 GiB: PML4 at 0x9000, PDPT at 0xA000, PDs at 0xB000..0xEFFF.
    mem.write_u64(PML4, 0xA000 | 3);
    for i in 0..4u64 {
        mem.write_u64(0xA000 + 8 * i, (0xB000 + 0x1000 * i) | 3);
        for j in 0..512u64 {
            mem.write_u64(0xB000 + 0x1000 * i + 8 * j, ((i * 512 + j) << 21) | 0x83);
        }
    }
    mem.write(CMDLINE_LINUX, cmdline.as_bytes());
    mem.write(CMDLINE_LINUX + cmdline.len() as u64, &[0]);
    mem.write_u16(BOOT_PARAMS + 0x1FE, 0xAA55);
    mem.write(BOOT_PARAMS + 0x202, b"HdrS");
    mem.write_u32(BOOT_PARAMS + 0x228, CMDLINE_LINUX as u32);
    mem.write_u32(BOOT_PARAMS + 0x238, cmdline.len() as u32 + 1);
    let e820 = [
        (0u64, 0x9_FC00u64),
        (0x10_0000, MEM_SIZE as u64 - 0x10_0000),
    ];
    mem.write(BOOT_PARAMS + 0x1E8, &[e820.len() as u8]);
    for (i, (base, size)) in e820.iter().enumerate() {
        let e = BOOT_PARAMS + 0x2D0 + 20 * i as u64;
        mem.write_u64(e, *base);
        mem.write_u64(e + 8, *size);
        mem.write_u32(e + 16, 1);
    }

    let vcpu = &m.vcpus[0];
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs = flat_segment(0x10, true, true);
    let data = flat_segment(0x18, false, true);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 0x1F;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.efer = 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = m.entry64;
    regs.rsi = BOOT_PARAMS;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("set regs");
}

/// ACPI 2.0 RSDP -> XSDT -> MADT listing `ncpus` enabled CPUs (APIC IDs 0..ncpus; the last one
/// as a Local x2APIC entry, the others as Local APIC entries) plus one disabled CPU.
fn write_acpi(mem: &GuestMem, ncpus: u32) {
    let xsdt = RSDP + 0x40;
    let madt = RSDP + 0x100;
    let header = |addr: u64, sig: &[u8; 4], len: u32| {
        mem.write(addr, sig);
        mem.write_u32(addr + 4, len);
        mem.write(addr + 8, &[1]);
        mem.write(addr + 10, b"VMKIT ");
    };
    let mut at = madt + 44;
    for id in 0..ncpus - 1 {
        mem.write(at, &[0, 8, id as u8, id as u8]);
        mem.write_u32(at + 4, 1);
        at += 8;
    }
    mem.write(at, &[0, 8, 0xFE, 0xF0]); // disabled (hot-pluggable) CPU 0xF0
    mem.write_u32(at + 4, 2);
    at += 8;
    mem.write(at, &[9, 16, 0, 0]);
    mem.write_u32(at + 4, ncpus - 1);
    mem.write_u32(at + 8, 1);
    mem.write_u32(at + 12, ncpus - 1);
    at += 16;
    let len = (at - madt) as u32;
    header(madt, b"APIC", len);
    mem.write_u32(madt + 36, 0xFEE0_0000);
    mem.checksum_fix(madt, len as usize, madt + 9);
    header(xsdt, b"XSDT", 44);
    mem.write_u64(xsdt + 36, madt);
    mem.checksum_fix(xsdt, 44, xsdt + 9);
    mem.write(RSDP, b"RSD PTR ");
    mem.write(RSDP + 9, b"VMKIT ");
    mem.write(RSDP + 15, &[2]);
    mem.write_u32(RSDP + 20, 36);
    mem.write_u64(RSDP + 24, xsdt);
    mem.checksum_fix(RSDP, 20, RSDP + 8);
    mem.checksum_fix(RSDP, 36, RSDP + 32);
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    // SAFETY: installs a handler that does nothing; its only purpose is to make a blocked
    // KVM_RUN return EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
}

fn vcpu_loop(
    vcpu: &mut VcpuFd,
    shared: &Mutex<Shared>,
    stop: &AtomicBool,
    start: Instant,
    deaf: bool,
) {
    let finish = |r: Result<u8, String>| {
        let mut s = shared.lock().expect("vCPU state lock");
        s.exit.get_or_insert(r);
        stop.store(true, Ordering::SeqCst);
    };
    while !stop.load(Ordering::SeqCst) {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => match port {
                abi::SERIAL_PORT => shared
                    .lock()
                    .expect("vCPU state lock")
                    .serial
                    .extend_from_slice(data),
                abi::POST_PORT => shared
                    .lock()
                    .expect("vCPU state lock")
                    .posts
                    .push((data[0], start.elapsed())),
                abi::EXIT_PORT if !deaf => return finish(Ok(data[0])),
                0x64 if data[0] == 0xFE && !deaf => return finish(Err("i8042 reset".into())),
                _ => {}
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                let v = if port == abi::SERIAL_PORT + 5 {
                    0x60
                } else {
                    0xFF
                };
                data.fill(v);
            }
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xFF),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Hlt) => return finish(Err("vCPU halted".into())),
            Ok(VcpuExit::Shutdown) => return finish(Err("triple fault (shutdown)".into())),
            Ok(other) => return finish(Err(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return finish(Err(format!("KVM_RUN failed: {e}"))),
        }
    }
}

struct Run {
    serial: String,
    posts: Vec<(u8, Duration)>,
    exit: Result<u8, String>,
}

impl Run {
    fn post_codes(&self) -> Vec<u8> {
        self.posts.iter().map(|p| p.0).collect()
    }
    fn at(&self, code: PostCode) -> Option<Duration> {
        self.posts.iter().find(|p| p.0 == code as u8).map(|p| p.1)
    }
}

fn run(m: Machine) -> Run {
    install_kick_handler();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut threads = Vec::new();
    let deaf = m.deaf;
    for mut vcpu in m.vcpus {
        let (shared, stop) = (shared.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            vcpu_loop(&mut vcpu, &shared, &stop, start, deaf)
        }));
    }
    while !stop.load(Ordering::SeqCst) && start.elapsed() < WATCHDOG {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::SeqCst);
    // Kick the vCPUs that are blocked in KVM_RUN (halted APs) until every thread is gone.
    for t in threads {
        use std::os::unix::thread::JoinHandleExt;
        while !t.is_finished() {
            // SAFETY: the thread is alive (not finished, not joined); SIGUSR1 has a no-op handler.
            unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1) };
            std::thread::sleep(Duration::from_millis(1));
        }
        t.join().expect("vCPU thread");
    }
    drop(m.vm);
    let s = std::mem::take(&mut *shared.lock().expect("vCPU state lock"));
    Run {
        serial: String::from_utf8_lossy(&s.serial).into_owned(),
        posts: s.posts,
        exit: s
            .exit
            .unwrap_or_else(|| Err(format!("no exit within {WATCHDOG:?}"))),
    }
}

fn report_timings(name: &str, r: &Run) {
    if let Some(line) = r.serial.lines().find(|l| l.contains("VMKIT-GUEST debug")) {
        eprintln!("{name}: {line}");
    }
    let entry = r.at(PostCode::Entry).unwrap_or_default();
    let main = r.at(PostCode::Main).unwrap_or_default();
    let online = r.at(PostCode::AllOnline).unwrap_or_default();
    let exit = r.at(PostCode::Exit).unwrap_or_default();
    eprintln!(
        "{name}: POST 0x10 at {entry:?}, 0x20 at {main:?}, 0x30 at {online:?} (bring-up {:?}), 0x40 at {exit:?}",
        online.saturating_sub(main)
    );
}

#[test]
fn kvm_pvh_boot_one_vcpu() {
    if !vmkit_testkit::kvm_available("kvm_pvh_boot_one_vcpu") {
        return;
    }
    let m = machine(1);
    setup_pvh(&m, "console=ttyS0 vmkit.debug=1", 0);
    let r = run(m);
    assert_eq!(r.exit, Ok(abi::EXIT_OK), "serial:\n{}", r.serial);
    let report = parse_report(&r.serial).expect("report");
    assert_eq!(report.boot, BootProtocol::Pvh);
    assert_eq!(report.cmdline, "console=ttyS0 vmkit.debug=1");
    assert_eq!((report.cpus, report.expected), (1, 1));
    assert_eq!(report.apic_ids, vec![0]);
    assert!(report.consistent);
    assert_eq!(
        report.debug.get("cpu_source").map(String::as_str),
        Some("none")
    );
    assert_eq!(r.post_codes(), vec![0x10, 0x20, 0x30, 0x40]);
    report_timings("pvh/1", &r);
}

#[test]
fn kvm_linux64_boot_one_vcpu() {
    if !vmkit_testkit::kvm_available("kvm_linux64_boot_one_vcpu") {
        return;
    }
    let m = machine(1);
    setup_linux64(&m, "root=/dev/vda \"quoted\"");
    let r = run(m);
    assert_eq!(r.exit, Ok(abi::EXIT_OK), "serial:\n{}", r.serial);
    let report = parse_report(&r.serial).expect("report");
    assert_eq!(report.boot, BootProtocol::Linux64);
    assert_eq!(report.cmdline, "root=/dev/vda ?quoted?");
    assert_eq!((report.cpus, report.expected, report.exit_code), (1, 1, 0));
    assert_eq!(r.post_codes(), vec![0x10, 0x20, 0x30, 0x40]);
    report_timings("linux64/1", &r);
}

fn smp_boot(name: &str, n: u32) {
    let m = machine(n);
    write_acpi(&m.mem, n);
    setup_pvh(&m, "vmkit.debug=1", RSDP);
    let r = run(m);
    assert_eq!(r.exit, Ok(abi::EXIT_OK), "serial:\n{}", r.serial);
    let report = parse_report(&r.serial).expect("report");
    assert_eq!(
        (report.cpus, report.expected),
        (n, n),
        "serial:\n{}",
        r.serial
    );
    assert_eq!(report.apic_ids, (0..n).collect::<Vec<_>>());
    assert!(report.consistent);
    assert!(report.x2apic, "KVM offers x2APIC, the guest must use it");
    let core_bits = 32 - (n - 1).leading_zeros();
    assert_eq!((report.smt_bits, report.core_bits), (0, core_bits));
    assert_eq!(
        report.debug.get("cpu_source").map(String::as_str),
        Some("acpi")
    );
    let jobs = format!("{}/{}", n - 1, n - 1);
    assert_eq!(
        report.debug.get("jobs"),
        Some(&jobs),
        "every parked AP runs a job"
    );
    assert_eq!(r.post_codes(), vec![0x10, 0x20, 0x30, 0x40]);
    report_timings(name, &r);
}

#[test]
fn kvm_pvh_boot_smp_with_madt() {
    if !vmkit_testkit::kvm_available("kvm_pvh_boot_smp_with_madt") {
        return;
    }
    smp_boot("pvh/4", 4);
}

#[test]
fn kvm_pvh_boot_64_vcpus() {
    if !vmkit_testkit::kvm_available("kvm_pvh_boot_64_vcpus") {
        return;
    }
    smp_boot("pvh/64", 64);
}

#[test]
fn kvm_guest_reports_missing_cpus() {
    if !vmkit_testkit::kvm_available("kvm_guest_reports_missing_cpus") {
        return;
    }
    // The MADT lists 3 CPUs, the VM has 2: the guest must time out and report the shortfall.
    let m = machine(2);
    write_acpi(&m.mem, 3);
    setup_pvh(&m, "", RSDP);
    let r = run(m);
    assert_eq!(r.exit, Ok(abi::EXIT_MISMATCH), "serial:\n{}", r.serial);
    let report = parse_report(&r.serial).expect("report");
    assert_eq!((report.cpus, report.expected), (2, 3));
    assert_eq!(report.apic_ids, vec![0, 1]);
    assert!(!report.consistent);
    assert!(!r.post_codes().contains(&(PostCode::AllOnline as u8)));
}

#[test]
fn kvm_guest_panic_and_exception_paths() {
    if !vmkit_testkit::kvm_available("kvm_guest_panic_and_exception_paths") {
        return;
    }
    let m = machine(1);
    setup_pvh(&m, "vmkit.fault=panic", 0);
    let r = run(m);
    assert_eq!(r.exit, Ok(abi::EXIT_PANIC), "serial:\n{}", r.serial);
    match parse_report(&r.serial) {
        Err(ReportError::Panic(msg)) => assert!(msg.starts_with("fault injected"), "{msg}"),
        other => panic!("expected a panic report, got {other:?}"),
    }

    let m = machine(1);
    setup_linux64(&m, "vmkit.fault=ud2");
    let r = run(m);
    assert_eq!(r.exit, Ok(abi::EXIT_EXCEPTION), "serial:\n{}", r.serial);
    match parse_report(&r.serial) {
        Err(ReportError::Panic(msg)) => assert!(msg.starts_with("exception=6 rip=0x"), "{msg}"),
        other => panic!("expected an exception report, got {other:?}"),
    }
}

#[test]
fn kvm_exit_falls_back_to_triple_fault() {
    if !vmkit_testkit::kvm_available("kvm_exit_falls_back_to_triple_fault") {
        return;
    }
    // A VMM without exit port and i8042: the guest must still stop, by triple fault.
    let mut m = machine(1);
    m.deaf = true;
    setup_pvh(&m, "", 0);
    let r = run(m);
    assert_eq!(
        r.exit,
        Err("triple fault (shutdown)".to_string()),
        "serial:\n{}",
        r.serial
    );
    assert!(parse_report(&r.serial).expect("report").passed());
}
