// SPDX-License-Identifier: Apache-2.0 OR MIT
//! A tiny VM for the KVM tests: anonymous memory, a GDT, identity page tables, test devices.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};
use vmkit_device::{Bus, BusDevice, BusRange};
use vmkit_vcpu::regs::BOOT_GDT;
use vmkit_vcpu::{
    CpuidConfig, CpuidPolicy, Irqchip, Topology, Vcpu, VcpuConfig, VcpuExitAction, VmController,
    VmStop,
};

/// Guest RAM size.
pub const MEM_SIZE: usize = 4 << 20;
/// Where test code is loaded (PVH / Linux64 entry).
pub const CODE: u64 = 0x1000;
/// GDT and IDT addresses (as vmkit's boot code uses).
pub const GDT: u64 = 0x500;
/// PML4 of the identity page tables.
pub const PML4: u64 = 0x9000;

pub struct TestVm {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    pub irqchip: Irqchip,
    mem: *mut u8,
}

impl TestVm {
    pub fn new(irqchip: Irqchip) -> Self {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        // SAFETY: anonymous private mapping of MEM_SIZE bytes, checked below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED, "mmap guest memory");
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem as u64,
            flags: 0,
        };
        // SAFETY: the mapping outlives the VM (unmapped in Drop after the VM fd is closed
        // by the last Arc owner... the test keeps `TestVm` alive while vCPUs run).
        unsafe { vm.set_user_memory_region(region) }.expect("set memory region");
        if irqchip == Irqchip::InKernel {
            vm.create_irq_chip().expect("create irqchip");
        }
        let t = Self {
            kvm,
            vm: Arc::new(vm),
            irqchip,
            mem: mem.cast(),
        };
        let mut gdt = Vec::new();
        for d in BOOT_GDT {
            gdt.extend_from_slice(&d.to_le_bytes());
        }
        t.write(GDT, &gdt);
        t.setup_page_tables();
        t
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        let addr = addr as usize;
        assert!(addr + bytes.len() <= MEM_SIZE);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.mem.add(addr), bytes.len()) };
    }

    pub fn read_u32(&self, addr: u64) -> u32 {
        assert!(addr as usize + 4 <= MEM_SIZE);
        // SAFETY: in bounds; volatile because the guest writes it concurrently.
        unsafe { std::ptr::read_volatile(self.mem.add(addr as usize).cast::<u32>()) }
    }

    pub fn write_u32(&self, addr: u64, v: u32) {
        assert!(addr as usize + 4 <= MEM_SIZE);
        // SAFETY: in bounds; volatile because the guest reads it concurrently.
        unsafe { std::ptr::write_volatile(self.mem.add(addr as usize).cast::<u32>(), v) }
    }

    pub fn copy_memory_from(&self, other: &TestVm) {
        // SAFETY: both mappings are MEM_SIZE bytes and distinct.
        unsafe { std::ptr::copy_nonoverlapping(other.mem, self.mem, MEM_SIZE) };
    }

    /// Identity-maps the first 4 GiB with 2 MiB pages: PML4 at 0x9000, PDPT at 0xa000,
    /// four page directories at 0xb000..0xf000.
    fn setup_page_tables(&self) {
        let pdpt = PML4 + 0x1000;
        let pd = PML4 + 0x2000;
        self.write(PML4, &(pdpt | 0x3).to_le_bytes());
        for i in 0..4u64 {
            self.write(pdpt + i * 8, &((pd + i * 0x1000) | 0x3).to_le_bytes());
            for j in 0..512u64 {
                let addr = (i << 30) | (j << 21);
                self.write(pd + i * 0x1000 + j * 8, &(addr | 0x83).to_le_bytes());
            }
        }
    }

    pub fn config(&self, vcpus: u32, topology: Topology) -> Arc<VcpuConfig> {
        let cpuid = CpuidPolicy::from_kvm(&self.kvm, &CpuidConfig::new(vcpus, topology))
            .expect("CPUID policy");
        Arc::new(VcpuConfig::new(&self.kvm, &self.vm, cpuid, self.irqchip).expect("vCPU config"))
    }

    /// One configured vCPU per index.
    pub fn vcpus(&self, config: &Arc<VcpuConfig>) -> Vec<Vcpu> {
        (0..config.vcpu_count())
            .map(|i| {
                let mut v = Vcpu::new(&self.vm, i, config.clone()).expect("create vCPU");
                v.configure().expect("configure vCPU");
                v
            })
            .collect()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this size. KVM keeps no reference
        // beyond the VM fd, and vCPUs are stopped before a TestVm goes away.
        unsafe { libc::munmap(self.mem.cast(), MEM_SIZE) };
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Records every access; reads return 0x5a, 0x5b, ...
#[derive(Default)]
pub struct Recorder {
    log: Mutex<Vec<Access>>,
}

impl Recorder {
    pub fn accesses(&self) -> Vec<Access> {
        self.log.lock().unwrap().clone()
    }

    pub fn writes(&self) -> Vec<Access> {
        self.accesses().into_iter().filter(|a| a.write).collect()
    }

    /// The 4-byte writes as u32 values.
    pub fn u32_writes(&self) -> Vec<u32> {
        self.writes()
            .iter()
            .filter(|a| a.data.len() == 4)
            .map(|a| u32::from_le_bytes(a.data.clone().try_into().unwrap()))
            .collect()
    }
}

impl BusDevice for Recorder {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0x5a + i as u8;
        }
        self.log.lock().unwrap().push(Access {
            write: false,
            offset,
            data: data.to_vec(),
        });
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        self.log.lock().unwrap().push(Access {
            write: true,
            offset,
            data: data.to_vec(),
        });
    }
}

/// Port 0xf4: a write stops the VM with the written byte as exit code.
#[derive(Default)]
pub struct ExitPort {
    code: AtomicI32,
    controller: Mutex<Option<Arc<VmController>>>,
}

impl ExitPort {
    pub const PORT: u64 = 0xf4;

    /// The code written, if any.
    pub fn code(&self) -> Option<i32> {
        match self.code.load(Ordering::SeqCst) {
            i32::MIN => None,
            c => Some(c),
        }
    }

    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            code: AtomicI32::new(i32::MIN),
            controller: Mutex::new(None),
        })
    }

    /// Connects the controller to stop; a code written before that stops the VM at once.
    pub fn attach(&self, ctl: Arc<VmController>) {
        let mut slot = self.controller.lock().unwrap();
        if let Some(code) = self.code() {
            ctl.request_stop(VmStop::Exit(code));
        }
        *slot = Some(ctl);
    }
}

impl BusDevice for ExitPort {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
        let code = i32::from(data.first().copied().unwrap_or(0));
        let ctl = self.controller.lock().unwrap();
        self.code.store(code, Ordering::SeqCst);
        if let Some(ctl) = ctl.as_ref() {
            ctl.request_stop(VmStop::Exit(code));
        }
    }
}

/// A PIO bus with a Recorder at 0x3f8..0x400 and an ExitPort at 0xf4.
pub fn pio_bus() -> (Arc<Bus>, Arc<Recorder>, Arc<ExitPort>) {
    let bus = Arc::new(Bus::new());
    let rec = Arc::new(Recorder::default());
    let exit = ExitPort::new();
    bus.insert(BusRange::new(0x3f8, 8).unwrap(), rec.clone())
        .unwrap();
    bus.insert(BusRange::new(ExitPort::PORT, 1).unwrap(), exit.clone())
        .unwrap();
    (bus, rec, exit)
}

/// Runs `vcpu` on the calling thread until the exit port is written or it halts.
pub fn run_until_exit(vcpu: &mut Vcpu, pio: &Bus, mmio: &Bus, exit: &ExitPort) -> VcpuExitAction {
    loop {
        match vcpu.run_once(pio, mmio) {
            VcpuExitAction::Handled | VcpuExitAction::Interrupted => {
                if let Some(code) = exit.code() {
                    return VcpuExitAction::Stop(VmStop::Exit(code));
                }
            }
            other => return other,
        }
    }
}
