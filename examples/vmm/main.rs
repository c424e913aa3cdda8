// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The example VMM: a complete x86_64 KVM machine assembled from vmkit's crates.
//!
//! `cargo run --release --example vmm -- --cpus 64 --memory 1G` boots the embedded test guest
//! with 64 vCPUs, prints its report (COM1 goes to stdout) and exits with the guest's exit
//! code. `run` reads as the recipe: memory, interrupt controller, CPUs, devices, boot, run.
//!
//! Exit status: the guest's exit-port code; 0 when the guest powers off or resets;
//! [`EXIT_GUEST_FAILED`] when it triple-faults, crashes or KVM cannot continue it;
//! [`EXIT_VMM_ERROR`] when the VMM could not build the machine (the message says why).

mod args;
mod virtio;

use std::io::Cursor;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_ioctls::Kvm;
use vmkit::boot::{self, acpi::AcpiConfig, BootProtocol, KernelOptions, MmioGap};
use vmkit::device::{Bus, InterruptManager, TriggerMode};
use vmkit::devices::serial::{SerialInput, SerialOutput, COM1_IRQ};
use vmkit::devices::{AcpiPm, Cmos, ExitPort, PostPort, Serial, I8042};
use vmkit::irq::{self, KvmIrqChip};
use vmkit::memory::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmkit::memory::{self, RamConfig, SlotTable};
use vmkit::vcpu::{
    BootRegs, CpuidConfig, CpuidPolicy, Irqchip, Topology, Vcpu, VcpuConfig, VcpuManager,
    VmController, VmStop,
};

use args::{Args, SerialTarget};

/// The VMM could not build or run the machine.
const EXIT_VMM_ERROR: u8 = 125;
/// The guest failed in a way that has no exit code (triple fault, crash, KVM error).
const EXIT_GUEST_FAILED: u8 = 124;
/// The IOAPIC's APIC ID in the MP table and MADT (after the CPUs' IDs in most layouts).
const IOAPIC_ID: u8 = 0xfe;

type Result<T> = std::result::Result<T, String>;

/// Adds what was being done to an error.
trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_VMM_ERROR);
        }
    };
    match run(&args, start) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

fn run(args: &Args, start: Instant) -> Result<u8> {
    if let Some(path) = &args.dump_guest {
        std::fs::write(path, vmkit::guest::elf())
            .context(|| format!("writing the test guest to {}", path.display()))?;
        return Ok(0);
    }

    // 1. KVM and the VM. The irqchip's VM-wide set-up must come before any vCPU exists.
    let kvm = Kvm::new().context(|| "cannot open /dev/kvm".into())?;
    let max_vcpus = kvm.get_max_vcpus();
    if args.cpus as usize > max_vcpus {
        return Err(format!(
            "--cpus {}: this host's KVM supports at most {max_vcpus} vCPUs",
            args.cpus
        ));
    }
    let vm = Arc::new(kvm.create_vm().context(|| "creating the VM".into())?);
    let irq_info = irq::setup_vm(&vm).context(|| "setting up the in-kernel irqchip".into())?;

    // 2. Guest memory: RAM around the 32-bit MMIO gap, registered as KVM slots. Registering
    //    1 GiB takes KVM milliseconds, and nothing before KVM_RUN needs the slots, so it runs
    //    on a helper thread while the vCPUs are created.
    let ram = RamConfig::new(args.memory)
        .transparent_huge_pages(true)
        .build()
        .context(|| format!("--memory {}", args.memory))?;
    let mem = ram.memory();
    let slots = {
        let (vm, mem) = (vm.clone(), mem.clone());
        std::thread::spawn(move || {
            let mut slots = SlotTable::new(vm);
            slots.register_memory(&mem, false).map(|_| slots)
        })
    };

    // 3. Interrupt routing (PIC, IOAPIC, MSI) on top of the in-kernel irqchip.
    let irqchip = KvmIrqChip::new(vm.clone(), irq_info).context(|| "GSI routing".into())?;

    // 4. CPUs: topology -> APIC IDs -> CPUID.
    let topology = topology(args)?;
    let mut cpuid_config =
        CpuidConfig::new(args.cpus, topology).remove_features(&args.remove_cpuid);
    cpuid_config.pv.msi_ext_dest_id &= irq_info.x2apic_api;
    let cpuid = CpuidPolicy::from_kvm(&kvm, &cpuid_config).context(|| "CPUID policy".into())?;
    let apic_ids = (0..args.cpus)
        .map(|i| cpuid.apic_id(i))
        .collect::<std::result::Result<Vec<u32>, _>>()
        .context(|| "APIC IDs".into())?;
    if apic_ids.iter().any(|&id| id > 254) && !irq_info.x2apic_api {
        return Err("APIC IDs above 254 need KVM_CAP_X2APIC_API, which this KVM lacks".into());
    }

    // 5. Platform devices on the port I/O bus. Their callbacks only ask the vCPU controller
    //    (created in step 7) to stop the VM.
    let controller: Arc<OnceLock<Arc<VmController>>> = Arc::new(OnceLock::new());
    let stop = {
        let controller = controller.clone();
        move |reason: VmStop| {
            if let Some(c) = controller.get() {
                c.request_stop(reason);
            }
        }
    };
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let serial = Arc::new(build_serial(args, &irqchip, stop.clone())?);
    pio.insert(serial.range(), serial.clone())
        .context(|| "COM1".into())?;
    let i8042 = Arc::new(I8042::new({
        let stop = stop.clone();
        move || stop(VmStop::Reset)
    }));
    for range in i8042.ranges() {
        pio.insert(range, i8042.clone())
            .context(|| "i8042".into())?;
    }
    let layout = ram.layout();
    let cmos = Arc::new(Cmos::new(layout.ram_below_4g(), layout.ram_above_4g()));
    pio.insert(cmos.range(), cmos).context(|| "CMOS".into())?;
    let exit_port = Arc::new(ExitPort::new({
        let stop = stop.clone();
        move |code| stop(VmStop::Exit(code))
    }));
    pio.insert(exit_port.range(), exit_port)
        .context(|| "exit port".into())?;
    let post = PostPort::new(start).print_to_stderr(args.timestamps);
    let post_log = post.log();
    let post = Arc::new(post);
    pio.insert(post.range(), post)
        .context(|| "POST port".into())?;
    let pm = Arc::new(AcpiPm::new({
        let stop = stop.clone();
        move || stop(VmStop::Shutdown)
    }));
    pio.insert(pm.range(), pm).context(|| "ACPI PM".into())?;

    // 5b. virtio devices (disks, console ports, entropy) on PCI or virtio-mmio; queue
    //     notifications go through KVM ioeventfds straight to the device workers.
    let ioevents = Arc::new(vmkit::irq::KvmIoEvents::new(vm.clone()));
    let virtio = virtio::attach(args, mem, &irqchip, ioevents, &pio, &mmio)?;
    for line in &virtio.summary {
        eprintln!("vmm: {line}");
    }

    // 6. Boot: kernel (or the embedded test guest), initramfs, MP table, ACPI, boot data.
    let gap = MmioGap::below_4g(memory::MMIO_GAP_START);
    let mut kernel_opts = KernelOptions::new(gap);
    kernel_opts.force_linux64 = args.boot_protocol.as_deref() == Some("linux64");
    let kernel = match &args.kernel {
        Some(path) => boot::load_kernel(mem, path, &kernel_opts),
        None => boot::load_kernel_from(
            mem,
            &mut Cursor::new(vmkit::guest::elf()),
            "the embedded test guest",
            &kernel_opts,
        ),
    }
    .map_err(|e| match e {
        boot::Error::KernelTooBig { .. } => {
            format!("--memory {} is too small: {e}", args.memory)
        }
        e => e.to_string(),
    })?;
    if args.boot_protocol.as_deref() == Some("pvh") && kernel.protocol != BootProtocol::Pvh {
        return Err(format!("--boot pvh: {} has no PVH entry note", kernel.name));
    }
    let initramfs = match &args.initramfs {
        Some(path) => {
            Some(boot::load_initramfs(mem, path, &kernel, gap).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    boot::mptable::write_mptable(mem, &apic_ids, IOAPIC_ID).context(|| "MP table".into())?;
    let mut acpi_config = AcpiConfig::new(apic_ids.clone(), IOAPIC_ID);
    acpi_config
        .devices
        .extend(virtio.acpi_devices.iter().cloned());
    let acpi = boot::acpi::write_acpi_tables(mem, &acpi_config).context(|| "ACPI tables".into())?;
    let mut cmdline = cmdline(args);
    for extra in &virtio.cmdline {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(extra);
    }
    let mut boot_config = boot::BootConfig::new(cmdline, gap);
    boot_config.extra_e820 = virtio.e820.clone();
    boot_config.initramfs = initramfs;
    boot_config.rsdp_addr = Some(acpi.rsdp_addr);
    let boot_info = boot::configure_boot(mem, &kernel, &boot_config).map_err(|e| e.to_string())?;
    let boot_regs = match boot_info.protocol {
        BootProtocol::Pvh => BootRegs::pvh(boot_info.entry, boot_info.boot_data_addr),
        BootProtocol::Linux64 => BootRegs::linux64(
            boot_info.entry,
            boot_info.boot_data_addr,
            boot_info.page_table_root,
        ),
    };

    // 7. vCPUs: create and configure all, give the BSP its boot registers, start the threads.
    //    The APs wait for the guest's INIT/SIPI in the in-kernel LAPIC.
    let x2apic = args.x2apic || apic_ids.iter().any(|&id| id > 254);
    let vcpu_config = Arc::new(
        VcpuConfig::new(&kvm, &vm, cpuid, Irqchip::InKernel)
            .context(|| "vCPU set-up".into())?
            .with_x2apic(x2apic),
    );
    let vcpus = create_vcpus(&vm, &vcpu_config, args.cpus)?;
    vcpus[0]
        .set_boot_regs(&boot_regs)
        .context(|| "boot registers".into())?;
    // Keep the slot table alive for as long as the VM runs: dropping it deletes the slots.
    let _slots = slots
        .join()
        .map_err(|_| "the memory registration thread panicked".to_owned())?
        .context(|| "registering guest memory with KVM".into())?;
    let mut manager =
        VcpuManager::spawn(vcpus, pio, mmio).context(|| "starting vCPU threads".into())?;
    // The cell is fresh, so this cannot fail; a second set would only mean a second VM.
    let _ = controller.set(manager.controller().clone());

    // 8. Run until the guest exits, powers off, resets, or fails.
    let reason = manager.wait();
    drop(manager);
    if args.timestamps {
        print_timing(&post_log, start);
        print_rss(mem);
    }
    Ok(match reason {
        VmStop::Exit(code) => (code & 0xff) as u8,
        VmStop::Shutdown | VmStop::Reset | VmStop::Requested => 0,
        other => {
            eprintln!("vmm: the guest stopped: {other}");
            EXIT_GUEST_FAILED
        }
    })
}

/// Creates and configures `count` vCPUs, spread over the host's CPUs (creating 64 vCPUs one
/// after the other takes about 15 ms of KVM time here).
fn create_vcpus(vm: &kvm_ioctls::VmFd, config: &Arc<VcpuConfig>, count: u32) -> Result<Vec<Vcpu>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, count.max(1) as usize) as u32;
    let make = |index: u32| -> Result<Vcpu> {
        let mut vcpu =
            Vcpu::new(vm, index, config.clone()).context(|| format!("creating vCPU {index}"))?;
        vcpu.configure()
            .context(|| format!("configuring vCPU {index}"))?;
        Ok(vcpu)
    };
    let mut slots: Vec<Option<Vcpu>> = (0..count).map(|_| None).collect();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let make = &make;
                s.spawn(move || -> Result<Vec<(u32, Vcpu)>> {
                    (w..count)
                        .step_by(workers as usize)
                        .map(|i| make(i).map(|v| (i, v)))
                        .collect()
                })
            })
            .collect();
        for h in handles {
            let created = h
                .join()
                .map_err(|_| "a vCPU creation thread panicked".to_owned())??;
            for (i, v) in created {
                slots[i as usize] = Some(v);
            }
        }
        Ok(())
    })?;
    Ok(slots.into_iter().flatten().collect())
}

fn topology(args: &Args) -> Result<Topology> {
    let sockets = args.sockets.unwrap_or(1);
    let per_socket = args.cpus.div_ceil(sockets.max(1));
    let threads = args.threads_per_core.max(1);
    let cores = per_socket.div_ceil(threads);
    Topology::new(sockets, cores, threads).context(|| {
        format!(
            "topology of {} vCPUs in {sockets} socket(s), {threads} thread(s) per core",
            args.cpus
        )
    })
}

fn cmdline(args: &Args) -> String {
    match (&args.cmdline, &args.kernel) {
        (Some(c), _) => c.clone(),
        // The defaults a Linux guest needs on this kind of host (see README, Known limitations).
        (None, Some(_)) => {
            "console=ttyS0 reboot=k panic=1 i8042.noaux clearcpuid=cx16 noxsave".into()
        }
        (None, None) => String::new(),
    }
}

fn build_serial(
    args: &Args,
    irqchip: &KvmIrqChip,
    stop: impl Fn(VmStop) + Send + Sync + Clone + 'static,
) -> Result<Serial> {
    let line = irqchip
        .legacy_line(COM1_IRQ, TriggerMode::Edge)
        .context(|| "COM1 interrupt".into())?;
    let (output, input) = match &args.serial {
        SerialTarget::Stdout => (SerialOutput::Stdout, SerialInput::Stdin),
        SerialTarget::File(p) => (SerialOutput::File(p.clone()), SerialInput::None),
        SerialTarget::Socket(p) => (SerialOutput::Socket(p.clone()), SerialInput::None),
    };
    let mut builder = Serial::builder(line).output(output).input(input);
    if let Some(text) = args.stop_on.clone() {
        let seen = Arc::new(Mutex::new(false));
        builder = builder.on_line(move |line: &str| {
            let mut seen = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !*seen && line.contains(&text) {
                *seen = true;
                stop(VmStop::Exit(0));
            }
        });
    }
    builder.build().context(|| "COM1".into())
}

/// Boot milestones from the POST log (the test guest writes 0x10 first thing, 0x30 when all
/// vCPUs are online, 0x40 before it exits), relative to the start of `main`.
fn print_timing(log: &vmkit::devices::post_port::PostLog, start: Instant) {
    let us = |code: u8| {
        log.first_time_of(code)
            .map_or("-".to_owned(), |d| d.as_micros().to_string())
    };
    eprintln!(
        "VMKIT-TIMING first_insn_us={} main_us={} online_us={} guest_exit_us={} vmm_exit_us={}",
        us(0x10),
        us(0x20),
        us(0x30),
        us(0x40),
        start.elapsed().as_micros()
    );
}

/// The VMM's resident memory excluding guest RAM: VmRSS minus the resident part of the guest
/// RAM mappings (from /proc/self/smaps).
fn print_rss(mem: &memory::GuestRam) {
    let ranges: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| {
            let start = r.as_ptr() as u64;
            (start, start + r.len())
        })
        .collect();
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let mut guest_kib = 0u64;
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    in_guest = ranges.iter().any(|&(s, e)| a >= s && b <= e);
                    continue;
                }
            }
        }
        if in_guest {
            if let Some(v) = line.strip_prefix("Rss:") {
                guest_kib += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let total = field("VmRSS:");
    eprintln!(
        "VMKIT-RSS total_kib={total} guest_kib={guest_kib} overhead_kib={} hwm_kib={}",
        total.saturating_sub(guest_kib),
        field("VmHWM:")
    );
}
