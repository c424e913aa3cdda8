// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The device checks run after every CPU is online: PCI enumeration and BAR programming,
//! virtio devices on PCI and on MMIO (`virtio_mmio.device=` on the command line), their
//! interrupts (MSI-X entries and IOAPIC routes spread over the online CPUs), and the
//! report lines (formats in the host crate's `abi.rs`).

use crate::acpi::MadtInfo;
use crate::apic;
use crate::blk::Blk;
use crate::bootinfo::BootInfo;
use crate::cpu::{mmio_read, pause, rdtsc};
use crate::irq;
use crate::options::{parse_range, parse_u64, parse_virtio_mmio};
use crate::pci::{Access, Pci};
use crate::percpu::MAX_CPUS;
use crate::report::{self, Sink};
use crate::serial::Serial;
use crate::virtio::{self, MmioTransport, PciTransport, Transport};

/// Default MMIO window for BARs the guest assigns.
const PCI_MMIO_DEFAULT: (u64, u64) = (0xC000_0000, 0xE000_0000);
/// Default bytes verified on each virtio-blk disk.
const BLK_VERIFY_DEFAULT_MIB: u64 = 2;
/// Most virtio-mmio devices taken from the command line.
const MAX_MMIO: usize = 16;

/// Shared state of one run.
struct Ctx<'a> {
    boot: &'a BootInfo,
    tsc_khz: u64,
    /// Online APIC IDs usable as MSI/IOAPIC destinations (8-bit).
    dests: &'a [u32],
    next_dest: usize,
    ioapics: [(u64, u32); crate::acpi::MAX_IOAPICS],
    ioapic_count: usize,
    /// Interrupt entries programmed (MSI-X entries + IOAPIC routes).
    vectors: u32,
    /// Distinct destinations used (bitmap over positions in `dests`).
    targeted: [u64; 4],
    failures: u32,
    /// The first MSI-X capable virtio-rng (for the rotation test).
    rotation: Option<(Transport, u8)>,
}

impl Ctx<'_> {
    fn opt_u64(&self, key: &str, default: u64) -> u64 {
        self.boot.option(key).and_then(parse_u64).unwrap_or(default)
    }

    fn next_dest(&mut self) -> u32 {
        if self.dests.is_empty() {
            return apic::id();
        }
        let i = self.next_dest % self.dests.len();
        self.next_dest += 1;
        if i < 256 {
            self.targeted[i / 64] |= 1 << (i % 64);
        }
        self.dests[i]
    }

    /// Interrupts for a device with `queues` queues: MSI-X entries (PCI) or an IOAPIC route
    /// (MMIO). Returns (first IDT vector, vectors, MSI-X entries to use).
    fn setup_irqs(&mut self, pci: &Pci, t: &Transport, queues: u16) -> (u8, u32, u16) {
        match t {
            Transport::Pci(p) => {
                let Some(m) = p.msix else { return (0, 0, 0) };
                let entries = m.size.min(queues.max(1));
                let Some(first) = irq::alloc_vectors(u32::from(entries)) else {
                    return (0, 0, 0);
                };
                for e in 0..entries {
                    let dest = self.next_dest();
                    let v = first + e as u8;
                    if m.program(e, dest, v) {
                        irq::set_target(v, dest);
                        self.vectors += 1;
                    }
                }
                pci.msix_enable(p.bdf, &m);
                (first, u32::from(entries), entries)
            }
            Transport::Mmio(m) => {
                let Some(v) = irq::alloc_vectors(1) else {
                    return (0, 0, 0);
                };
                let dest = self.next_dest();
                irq::set_mmio_ack(v, m.base);
                if irq::ioapic_route(&self.ioapics[..self.ioapic_count], m.irq, v, dest) {
                    irq::set_target(v, dest);
                    self.vectors += 1;
                    (v, 1, 0)
                } else {
                    (0, 0, 0)
                }
            }
        }
    }
}

fn put_transport(s: &mut Serial, t: &Transport) {
    match t {
        Transport::Pci(p) => {
            report::field_str(s, "transport", b"pci");
            report::field_bdf(s, "addr", p.bdf.bus, p.bdf.dev, p.bdf.func);
        }
        Transport::Mmio(m) => {
            report::field_str(s, "transport", b"mmio");
            report::field_hex(s, "addr", m.base);
        }
    }
}

fn error_line(t: &Transport, device: u32, reason: &str) {
    let mut s = Serial::lock();
    report::begin(&mut s, report::VIRTIO_ERROR_PREFIX);
    put_transport(&mut s, t);
    report::field_dec(&mut s, "device", u64::from(device));
    report::field_str(&mut s, "reason", reason.as_bytes());
    report::end(&mut s);
}

/// Runs every device check; returns `false` if one failed (exit code 4).
pub fn run(
    boot: &BootInfo,
    madt: Option<&MadtInfo>,
    dma_start: u64,
    tsc_khz: u64,
    online: &[u32],
) -> bool {
    let mut dests = [0u32; 256];
    let mut nd = 0;
    for &id in online.iter().filter(|&&id| id <= 0xFF).take(256) {
        dests[nd] = id;
        nd += 1;
    }
    let mut ctx = Ctx {
        boot,
        tsc_khz,
        dests: &dests[..nd],
        next_dest: 0,
        ioapics: [(0, 0); crate::acpi::MAX_IOAPICS],
        ioapic_count: 0,
        vectors: 0,
        targeted: [0; 4],
        failures: 0,
        rotation: None,
    };
    if let Some(m) = madt {
        for io in &m.ioapics[..m.ioapic_count] {
            ctx.ioapics[ctx.ioapic_count] = (u64::from(io.address), io.gsi_base);
            ctx.ioapic_count += 1;
        }
    }
    // Device memory: RAM after the per-CPU blocks, 2 MiB aligned.
    let start = (dma_start + 0x1F_FFFF) & !0x1F_FFFF;
    let ram = boot.ram_at(start).unwrap_or(0);
    crate::dma::init(start, start.saturating_add(ram));

    // PCI.
    let mem = crate::IdentityMem;
    // ECAM: the MCFG table, else `vmkit.pci_ecam=<base>` (buses 0..=255; for platforms that
    // describe ECAM only in the DSDT, like QEMU's microvm), else the legacy ports.
    let ecam = crate::acpi::find_ecam(&mem, boot.rsdp).or_else(|| {
        boot.option("vmkit.pci_ecam")
            .and_then(parse_u64)
            .map(|base| crate::acpi::Ecam {
                base,
                start_bus: 0,
                end_bus: 255,
            })
    });
    let access = match ecam {
        Some(e)
            if e.base
                .checked_add((u64::from(e.end_bus) + 1) << 20)
                .is_some_and(|x| x <= 1 << 32) =>
        {
            Access::Ecam {
                base: e.base,
                start_bus: e.start_bus,
                end_bus: e.end_bus,
            }
        }
        _ => Access::Legacy,
    };
    // SAFETY: only the BSP runs this, once.
    let pci = unsafe { &mut *core::ptr::addr_of_mut!(PCI) };
    pci.access = access;
    pci.enumerate();
    let (wstart, wend) = boot
        .option("vmkit.pci_mmio")
        .and_then(parse_range)
        .unwrap_or(PCI_MMIO_DEFAULT);
    let reassign = boot.option("vmkit.pci_reassign") == Some(b"1");
    let stats = pci.program_bars(wstart, wend, reassign);
    {
        let mut s = Serial::lock();
        report::begin(&mut s, report::PCI_PREFIX);
        match access {
            Access::Ecam { base, .. } => {
                report::field_str(&mut s, "access", b"ecam");
                report::field_hex(&mut s, "ecam", base);
            }
            Access::Legacy => {
                report::field_str(&mut s, "access", b"legacy");
                report::field_str(&mut s, "ecam", b"-");
            }
        }
        report::field_dec(&mut s, "buses", u64::from(pci.buses));
        report::field_dec(&mut s, "devices", pci.count as u64 + u64::from(pci.dropped));
        report::field_dec(&mut s, "assigned", u64::from(stats.assigned));
        report::field_dec(&mut s, "relocated", u64::from(stats.relocated));
        report::field_dec(&mut s, "failed", u64::from(stats.failed));
        report::end(&mut s);
        for f in pci.functions() {
            report::begin(&mut s, report::PCI_DEV_PREFIX);
            report::field_bdf(&mut s, "bdf", f.bdf.bus, f.bdf.dev, f.bdf.func);
            s.put_str(" id=");
            put_hex4(&mut s, f.vendor);
            s.put_str(":");
            put_hex4(&mut s, f.device);
            report::field_hex(&mut s, "class", u64::from(f.class));
            let mem: u64 = f
                .bars
                .iter()
                .filter(|b| {
                    matches!(
                        b.kind,
                        crate::pci::BarKind::Mem32 | crate::pci::BarKind::Mem64
                    )
                })
                .map(|b| b.size)
                .sum();
            report::field_dec(&mut s, "bar_bytes", mem);
            report::end(&mut s);
        }
    }
    if stats.failed > 0 {
        ctx.failures += 1;
    }

    // virtio over PCI.
    for k in 0..pci.count {
        let f = pci.functions[k];
        let Some(ty) = virtio::pci_device_type(&f) else {
            continue;
        };
        let t = match PciTransport::new(pci, &f) {
            Ok(p) => Transport::Pci(p),
            Err(e) => {
                let t = Transport::Pci(PciTransport::for_report(f.bdf));
                error_line(&t, ty, e);
                ctx.failures += 1;
                continue;
            }
        };
        drive(&mut ctx, pci, &t, ty);
    }
    // virtio over MMIO.
    let mut mmio = [(0u64, 0u32); MAX_MMIO];
    let mut nm = 0;
    for v in boot
        .options("virtio_mmio.device")
        .filter_map(parse_virtio_mmio)
    {
        if nm < MAX_MMIO {
            mmio[nm] = (v.base, v.irq);
            nm += 1;
        }
    }
    for &(base, irq_no) in &mmio[..nm] {
        let t = Transport::Mmio(MmioTransport { base, irq: irq_no });
        match MmioTransport::probe(base) {
            Ok(0) => {}
            Ok(ty) => drive(&mut ctx, pci, &t, ty),
            Err(e) => {
                error_line(&t, 0, e);
                ctx.failures += 1;
            }
        }
    }
    if ctx.vectors > 0 {
        msix_line(&mut ctx);
    }
    ctx.failures == 0
}

static mut PCI: Pci = Pci::new(Access::Legacy);

fn put_hex4(s: &mut Serial, v: u16) {
    for k in (0..4).rev() {
        s.put(&[b"0123456789abcdef"[usize::from((v >> (4 * k)) & 0xF)]]);
    }
}

fn drive(ctx: &mut Ctx<'_>, pci: &Pci, t: &Transport, ty: u32) {
    let outcome = match ty {
        virtio::TYPE_BLOCK => drive_blk(ctx, pci, t),
        virtio::TYPE_CONSOLE => drive_console(ctx, pci, t),
        virtio::TYPE_RNG => drive_rng(ctx, pci, t),
        _ => return,
    };
    if let Err(e) = outcome {
        t.fail();
        error_line(t, ty, e);
        ctx.failures += 1;
    }
}

fn drive_blk(ctx: &mut Ctx<'_>, pci: &Pci, t: &Transport) -> Result<(), virtio::Error> {
    let (first, nvec, entries) = ctx.setup_irqs(pci, t, Blk::queue_hint(t));
    let qsize = ctx.opt_u64("vmkit.blk_queue_size", 256).clamp(4, 1024) as u16;
    let mut blk = Blk::new(t, qsize, entries)?;
    // `vmkit.blk_verify_mib=0`: the whole disk.
    let verify_bytes = match ctx.opt_u64("vmkit.blk_verify_mib", BLK_VERIFY_DEFAULT_MIB) {
        0 => u64::MAX,
        mib => mib.saturating_mul(1 << 20),
    };
    let v = blk.verify(verify_bytes, ctx.tsc_khz)?;
    let ok = v.bad_sectors == 0 && v.io_errors == 0 && v.flush != Some(false);
    let read_only = blk.features & crate::blk::F_RO != 0;
    {
        let mut s = Serial::lock();
        report::begin(&mut s, report::BLK_PREFIX);
        put_transport(&mut s, t);
        report::field_dec(&mut s, "queues", blk.nq as u64);
        report::field_dec(&mut s, "capacity", blk.capacity);
        let verdict: &[u8] = if read_only {
            b"skipped"
        } else if ok {
            b"ok"
        } else {
            b"fail"
        };
        report::field_str(&mut s, "verify", verdict);
        report::field_dec(&mut s, "bytes", v.bytes);
        report::field_dec(&mut s, "bad_sectors", v.bad_sectors);
        report::field_dec(&mut s, "io_errors", v.io_errors);
        let flush: &[u8] = match v.flush {
            Some(true) => b"ok",
            Some(false) => b"fail",
            None => b"unsupported",
        };
        report::field_str(&mut s, "flush", flush);
        report::field_dec(&mut s, "irqs", irq::count_range(first, nvec));
        report::field_dec(
            &mut s,
            "us",
            v.ticks.saturating_mul(1000) / ctx.tsc_khz.max(1),
        );
        report::end(&mut s);
    }
    if !ok {
        ctx.failures += 1;
    }
    if ctx.boot.option("vmkit.blk_bench") == Some(b"1") {
        let qd = ctx.opt_u64("vmkit.blk_qd", 16).clamp(1, 256) as usize;
        let bs = ctx.opt_u64("vmkit.blk_bs", 65536).clamp(512, 1 << 20) as u32;
        let ms = ctx.opt_u64("vmkit.blk_bench_ms", 500).clamp(1, 60_000);
        let b = blk.bench(qd, bs, ms, ctx.tsc_khz)?;
        let mut s = Serial::lock();
        report::begin(&mut s, report::BLK_BENCH_PREFIX);
        put_transport(&mut s, t);
        report::field_dec(&mut s, "queues", blk.nq as u64);
        report::field_dec(&mut s, "qd", b.qd as u64);
        report::field_dec(&mut s, "bs", u64::from(b.bs));
        report::field_dec(&mut s, "ms", ms);
        report::field_centi(&mut s, "seq_write_mibps", b.seq_write);
        report::field_centi(&mut s, "seq_read_mibps", b.seq_read);
        report::field_dec(&mut s, "rand_read_iops", b.rand_iops);
        report::field_dec(&mut s, "rand_bs", u64::from(crate::blk::RAND_BS));
        report::field_dec(&mut s, "io_errors", b.io_errors);
        report::end(&mut s);
        if b.io_errors > 0 {
            ctx.failures += 1;
        }
    }
    Ok(())
}

fn drive_console(ctx: &mut Ctx<'_>, pci: &Pci, t: &Transport) -> Result<(), virtio::Error> {
    // Queues: up to 2 + 2 * 32; share the MSI-X entries the function has.
    let (first, nvec, entries) = ctx.setup_irqs(pci, t, 66);
    let want: &[u8] = ctx.boot.option("vmkit.echo_port").unwrap_or(b"vmkit.echo");
    let timeout = ctx.opt_u64("vmkit.echo_timeout_ms", 3000);
    let e = crate::console::echo(t, want, entries, ctx.tsc_khz, timeout)?;
    let mut s = Serial::lock();
    report::begin(&mut s, report::CONSOLE_PREFIX);
    put_transport(&mut s, t);
    report::field_dec(&mut s, "port", u64::from(e.port));
    report::field_str(&mut s, "name", &e.name[..e.name_len]);
    report::field_dec(&mut s, "sent", u64::from(e.sent));
    report::field_dec(&mut s, "received", u64::from(e.received));
    report::field_str(&mut s, "echo", e.result.as_bytes());
    report::field_dec(&mut s, "irqs", irq::count_range(first, nvec));
    report::end(&mut s);
    // A console without the echo port is not a failure: only a port that does not echo.
    if e.result != "ok" && e.result != "no_port" {
        ctx.failures += 1;
    }
    Ok(())
}

/// Reads up to `len` bytes of entropy with one request; returns the bytes received.
fn rng_request(vq: &mut virtio::Virtqueue, buf: u64, len: u32, deadline: u64) -> Option<u32> {
    vq.add(&[(buf, len, true)])?;
    vq.kick();
    loop {
        if let Some((_, n)) = vq.poll() {
            return Some(n.min(len));
        }
        if rdtsc() > deadline {
            return None;
        }
        pause();
    }
}

fn drive_rng(ctx: &mut Ctx<'_>, pci: &Pci, t: &Transport) -> Result<(), virtio::Error> {
    let (first, nvec, entries) = ctx.setup_irqs(pci, t, 1);
    t.init(0)?;
    t.no_config_vector();
    let mut vq = t.setup_queue(0, 8, (entries > 0).then_some(0))?;
    t.driver_ok();
    let buf = crate::dma::alloc_zeroed(64, 64).ok_or("out_of_memory")?;
    let deadline = rdtsc() + ctx.tsc_khz.saturating_mul(2000);
    let mut total = 0u32;
    let (mut first_byte, mut varied) = (None, false);
    for _ in 0..4 {
        let Some(n) = rng_request(&mut vq, buf, 64, deadline) else {
            break;
        };
        for k in 0..u64::from(n) {
            let b: u8 = mmio_read(buf + k);
            match first_byte {
                None => first_byte = Some(b),
                Some(f) => varied |= f != b,
            }
        }
        total += n;
        t.ack();
        if total >= 64 {
            break;
        }
    }
    let ok = total > 0 && varied;
    {
        let mut s = Serial::lock();
        report::begin(&mut s, report::RNG_PREFIX);
        put_transport(&mut s, t);
        report::field_dec(&mut s, "bytes", u64::from(total));
        report::field_dec(&mut s, "ok", u64::from(ok));
        report::field_dec(&mut s, "irqs", irq::count_range(first, nvec));
        report::end(&mut s);
    }
    if !ok {
        ctx.failures += 1;
    }
    if ctx.rotation.is_none() && entries > 0 && matches!(t, Transport::Pci(_)) {
        rotate(ctx, t, &mut vq, buf, first);
    }
    Ok(())
}

/// Interrupt rotation: the rng's MSI-X entry is pointed at each online CPU in turn and one
/// request is made; the interrupt must arrive on that CPU.
fn rotate(ctx: &mut Ctx<'_>, t: &Transport, vq: &mut virtio::Virtqueue, buf: u64, vector: u8) {
    let Transport::Pci(p) = t else { return };
    let Some(m) = p.msix else { return };
    ctx.rotation = Some((*t, vector));
    let me = apic::id();
    let (mut tried, mut hit) = (0u32, 0u32);
    for &dest in ctx.dests {
        tried += 1;
        if !m.program(0, dest, vector) {
            continue;
        }
        irq::set_target(vector, dest);
        let before = irq::count(vector);
        let wrong = irq::wrong_cpu();
        // Generous: with many vCPUs on few host CPUs a halted AP may wait long for its
        // host thread; a late interrupt would land after the entry moved on.
        let deadline = rdtsc() + ctx.tsc_khz.saturating_mul(2000);
        if rng_request(vq, buf, 1, deadline).is_none() {
            continue;
        }
        loop {
            if irq::count(vector) != before {
                break;
            }
            if rdtsc() > deadline {
                break;
            }
            if dest == me {
                irq::wait_bsp(ctx.tsc_khz.saturating_mul(10), ctx.tsc_khz);
            } else {
                pause();
            }
        }
        if irq::count(vector) != before && irq::wrong_cpu() == wrong {
            hit += 1;
        }
    }
    ROTATION
        .0
        .store(tried, core::sync::atomic::Ordering::Relaxed);
    ROTATION.1.store(hit, core::sync::atomic::Ordering::Relaxed);
    // Leave the entry where it started (the first destination).
    if let Some(&d) = ctx.dests.first() {
        m.program(0, d, vector);
        irq::set_target(vector, d);
    }
}

static ROTATION: (core::sync::atomic::AtomicU32, core::sync::atomic::AtomicU32) = (
    core::sync::atomic::AtomicU32::new(0),
    core::sync::atomic::AtomicU32::new(0),
);

fn msix_line(ctx: &mut Ctx<'_>) {
    // Let interrupts still pending for the BSP arrive (and be counted).
    for _ in 0..4 {
        irq::wait_bsp(ctx.tsc_khz.saturating_mul(2), ctx.tsc_khz);
    }
    let cpus_hit = (0..MAX_CPUS).filter(|&c| irq::cpu_count(c) > 0).count();
    let total: u64 = (0..MAX_CPUS).map(|c| u64::from(irq::cpu_count(c))).sum();
    let targeted: u32 = ctx.targeted.iter().map(|w| w.count_ones()).sum();
    let mut s = Serial::lock();
    report::begin(&mut s, report::MSIX_PREFIX);
    report::field_dec(&mut s, "vectors", u64::from(ctx.vectors));
    report::field_dec(&mut s, "cpus", ctx.dests.len() as u64);
    report::field_dec(&mut s, "cpus_targeted", u64::from(targeted));
    report::field_dec(&mut s, "cpus_hit", cpus_hit as u64);
    report::field_dec(&mut s, "interrupts", total);
    report::field_dec(&mut s, "wrong_cpu", u64::from(irq::wrong_cpu()));
    let o = core::sync::atomic::Ordering::Relaxed;
    report::field_dec(&mut s, "rotation_cpus", u64::from(ROTATION.0.load(o)));
    report::field_dec(&mut s, "rotation_hit", u64::from(ROTATION.1.load(o)));
    report::end(&mut s);
}
