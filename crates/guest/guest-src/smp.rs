// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Application-processor bring-up: SIPI trampoline, INIT/SIPI, per-AP records, parking.
//!
//! Sequence (BSP, [`bring_up`]): record itself, size the AP area (one per-CPU block per
//! expected AP, carved from RAM after the image), copy the trampoline to [`TRAMPOLINE_ADDR`],
//! broadcast INIT and one STARTUP (no textbook 10 ms wait: KVM queues INIT and SIPI and handles
//! them in order), then poll. CPUs still missing after [`FIRST_RESEND_MS`] get a per-ID
//! STARTUP again, then every [`RESEND_MS`], until [`TIMEOUT_MS`]. A STARTUP sent to a CPU that
//! is already running is ignored by the CPU, so re-sending is harmless.
//!
//! Each AP (real mode at 0x8000 -> protected mode -> long mode on the boot page tables, in
//! `vmkit_ap_entry64`) takes a CPU index with an atomic increment, uses the stack of that
//! index's per-CPU block, loads the GDT/TSS/IDT, enables its LAPIC in the BSP's mode, records
//! its APIC ID and CPUID topology, counts itself online and parks. An AP beyond the prepared
//! slots counts itself in `vmkit_ap_extra` and halts without touching memory.
//!
//! Parking ([`park`]): with interrupts off the AP checks its job mailbox, then waits with
//! `sti; hlt` (race-free: an IPI already pending wakes the `hlt`; see
//! `percpu::wait_for_interrupt`). [`post_job`] stores a job and sends the [`WAKE_VECTOR`] IPI.

use crate::apic;
use crate::bootinfo::BootInfo;
use crate::cpu::{
    cli, cpuid, max_basic_leaf, pause, rdtsc, CR0_LONG_MODE, CR4_BOOT, EFER_LME, GDT_CODE32,
    GDT_KERNEL_CS, GDT_KERNEL_DS, MSR_EFER,
};
use crate::idt::WAKE_VECTOR;
use crate::percpu::{vmkit_ap_area, wait_for_interrupt, BLOCK_SHIFT, BLOCK_SIZE, MAX_CPUS};
use crate::physmem::ApicIdSet;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// Physical address the SIPI trampoline is copied to (STARTUP vector 0x08).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
/// STARTUP vector (`TRAMPOLINE_ADDR >> 12`).
pub const SIPI_VECTOR: u8 = (TRAMPOLINE_ADDR >> 12) as u8;
/// Room reserved for the trampoline (0x8000..0x8FFF).
const TRAMPOLINE_MAX: usize = 4096;
/// First per-ID STARTUP re-send to missing CPUs, after this many ms.
pub const FIRST_RESEND_MS: u64 = 20;
/// Later re-sends, every this many ms.
pub const RESEND_MS: u64 = 100;
/// Give up waiting for missing CPUs after this many ms.
pub const TIMEOUT_MS: u64 = 2000;
/// Slots prepared beyond the expected AP count, for CPUs the firmware tables did not list.
const SLACK_SLOTS: usize = 16;

core::arch::global_asm!(
    r#"
    /* SIPI trampoline template: copied to {base}, entered in real mode with CS=0x0800, IP=0.
       Uses only its own page (GDT inside it) and the image's page tables. */
    .section .trampoline, "a"
    .balign 16
    .global vmkit_trampoline_start
    .code16
vmkit_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (vmkit_tramp_gdtr - vmkit_trampoline_start)
    movl $0x33, %eax
    movl %eax, %cr0
    ljmpl ${code32}, $(vmkit_tramp32 - vmkit_trampoline_start + {base})
    .code32
vmkit_tramp32:
    movl ${ds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %cr4, %eax
    orl ${cr4}, %eax
    movl %eax, %cr4
    movl $vmkit_pml4, %eax
    movl %eax, %cr3
    movl ${efer}, %ecx
    rdmsr
    orl ${lme}, %eax
    wrmsr
    movl ${cr0}, %eax
    movl %eax, %cr0
    ljmpl ${cs}, $vmkit_ap_entry64
    .balign 8
vmkit_tramp_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cf9b000000ffff
vmkit_tramp_gdt_end:
vmkit_tramp_gdtr:
    .word vmkit_tramp_gdt_end - vmkit_tramp_gdt - 1
    .long vmkit_tramp_gdt - vmkit_trampoline_start + {base}
    .global vmkit_trampoline_end
vmkit_trampoline_end:

    /* AP long-mode entry (in the image). */
    .text
    .code64
    .balign 16
vmkit_ap_entry64:
    movl ${ds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %eax
    lock xaddl %eax, vmkit_ap_next(%rip)
    cmpl vmkit_ap_slots(%rip), %eax
    jae 9f
    leal 1(%rax), %edi
    movq %rdi, %rsp
    shlq ${shift}, %rsp
    addq vmkit_ap_area(%rip), %rsp
    lgdt vmkit_gdt_ptr(%rip)
    pushq ${cs}
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  xorl %ebp, %ebp
    call vmkit_ap_main
    ud2
9:  lock incl vmkit_ap_extra(%rip)
8:  cli
    hlt
    jmp 8b
"#,
    base = const TRAMPOLINE_ADDR,
    code32 = const GDT_CODE32,
    ds = const GDT_KERNEL_DS,
    cs = const GDT_KERNEL_CS,
    cr4 = const CR4_BOOT,
    cr0 = const CR0_LONG_MODE,
    efer = const MSR_EFER,
    lme = const EFER_LME,
    shift = const BLOCK_SHIFT,
    options(att_syntax)
);

extern "C" {
    static vmkit_trampoline_start: u8;
    static vmkit_trampoline_end: u8;
    static __image_end: u8;
}

/// Next AP slot (taken with `lock xadd` by the AP entry code).
#[no_mangle]
#[allow(non_upper_case_globals)]
static vmkit_ap_next: AtomicU32 = AtomicU32::new(0);
/// Number of AP slots (per-CPU blocks) prepared.
#[no_mangle]
#[allow(non_upper_case_globals)]
static vmkit_ap_slots: AtomicU32 = AtomicU32::new(0);
/// APs that started but found no slot.
#[no_mangle]
#[allow(non_upper_case_globals)]
static vmkit_ap_extra: AtomicU32 = AtomicU32::new(0);

/// The APIC topology one CPU sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// APIC ID read from the LAPIC (ID register / x2APIC ID MSR).
    pub apic_id: u32,
    /// x2APIC ID from CPUID leaf 0xB (`None` without leaf 0xB).
    pub x2apic_id: Option<u32>,
    /// Initial APIC ID from CPUID leaf 1 (EBX[31:24]).
    pub initial_apic_id: u32,
    /// Width of the SMT level of the APIC ID (leaf 0xB).
    pub smt_bits: u32,
    /// Width of the core level above SMT (leaf 0xB).
    pub core_bits: u32,
}

impl Topology {
    /// Reads this CPU's topology (its LAPIC must be enabled in the system's mode).
    pub fn read() -> Topology {
        let initial_apic_id = cpuid(1, 0).ebx >> 24;
        let mut t = Topology {
            apic_id: apic::id(),
            x2apic_id: None,
            initial_apic_id,
            smt_bits: 0,
            core_bits: 0,
        };
        if max_basic_leaf() >= 0xB && cpuid(0xB, 0).ebx & 0xFFFF != 0 {
            let (mut smt_shift, mut core_shift) = (0u32, None);
            for sub in 0..8 {
                let r = cpuid(0xB, sub);
                let level_type = (r.ecx >> 8) & 0xFF;
                if level_type == 0 {
                    break;
                }
                if sub == 0 {
                    t.x2apic_id = Some(r.edx);
                }
                match level_type {
                    1 => smt_shift = r.eax & 0x1F,
                    2 => core_shift = Some(r.eax & 0x1F),
                    _ => {}
                }
            }
            t.smt_bits = smt_shift;
            t.core_bits = core_shift.map_or(0, |c| c.saturating_sub(smt_shift));
        }
        t
    }

    /// `true` if CPUID's view (x2APIC ID, initial APIC ID) matches the LAPIC ID.
    pub fn consistent(&self) -> bool {
        self.x2apic_id.is_none_or(|x| x == self.apic_id)
            && self.initial_apic_id == self.apic_id & 0xFF
    }
}

/// A job for a parked CPU: `f(arg)`.
pub type Job = extern "C" fn(u64);

/// What one CPU recorded about itself. Only integer atomics (any bit pattern is valid): the
/// table lives in `.noinit` and the BSP clears the records it will use ([`CpuRecord::clear`]).
struct CpuRecord {
    /// `FLAG_VALID | FLAG_X2APIC_ID`, initial APIC ID in bits 8..16, SMT width in 16..24,
    /// core width in 24..32.
    info: AtomicU32,
    apic_id: AtomicU32,
    x2apic_id: AtomicU32,
    job: AtomicU64,
    job_arg: AtomicU64,
}

const FLAG_VALID: u32 = 1;
const FLAG_X2APIC_ID: u32 = 2;

impl CpuRecord {
    const fn new() -> Self {
        CpuRecord {
            info: AtomicU32::new(0),
            apic_id: AtomicU32::new(0),
            x2apic_id: AtomicU32::new(0),
            job: AtomicU64::new(0),
            job_arg: AtomicU64::new(0),
        }
    }

    fn clear(&self) {
        self.info.store(0, Ordering::Relaxed);
        self.job.store(0, Ordering::Relaxed);
    }

    fn valid(&self) -> bool {
        self.info.load(Ordering::Acquire) & FLAG_VALID != 0
    }

    fn topology(&self) -> Option<Topology> {
        let info = self.info.load(Ordering::Acquire);
        if info & FLAG_VALID == 0 {
            return None;
        }
        Some(Topology {
            apic_id: self.apic_id.load(Ordering::Relaxed),
            x2apic_id: (info & FLAG_X2APIC_ID != 0).then(|| self.x2apic_id.load(Ordering::Relaxed)),
            initial_apic_id: (info >> 8) & 0xFF,
            smt_bits: (info >> 16) & 0xFF,
            core_bits: info >> 24,
        })
    }
}

#[link_section = ".noinit.cpus"]
static CPUS: [CpuRecord; MAX_CPUS] = [const { CpuRecord::new() }; MAX_CPUS];

/// The expected APIC IDs (set by the BSP before any AP starts, read-only afterwards).
static EXPECTED: AtomicPtr<ApicIdSet<MAX_CPUS>> = AtomicPtr::new(core::ptr::null_mut());
static NO_CPUS: ApicIdSet<MAX_CPUS> = ApicIdSet::new();
static SEEN: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Expected APs (not the BSP) that came online.
static SEEN_APS: AtomicU32 = AtomicU32::new(0);
static BSP_APIC_ID: AtomicU32 = AtomicU32::new(0);
/// Number of expected APs (the one that completes the count wakes the BSP).
static AP_TARGET: AtomicU32 = AtomicU32::new(0);

/// The expected APIC IDs (empty before [`bring_up`]).
pub fn expected() -> &'static ApicIdSet<MAX_CPUS> {
    let p = EXPECTED.load(Ordering::Acquire);
    if p.is_null() {
        &NO_CPUS
    } else {
        // SAFETY: set once by `bring_up` from a `&'static` that is never written afterwards.
        unsafe { &*p }
    }
}

fn record(cpu: usize, t: &Topology) {
    let Some(r) = CPUS.get(cpu) else { return };
    r.apic_id.store(t.apic_id, Ordering::Relaxed);
    r.x2apic_id
        .store(t.x2apic_id.unwrap_or(0), Ordering::Relaxed);
    let info = FLAG_VALID
        | if t.x2apic_id.is_some() {
            FLAG_X2APIC_ID
        } else {
            0
        }
        | ((t.initial_apic_id & 0xFF) << 8)
        | ((t.smt_bits & 0xFF) << 16)
        | ((t.core_bits & 0xFF) << 24);
    r.info.store(info, Ordering::Release);
    if let Some(p) = expected().position(t.apic_id) {
        let bsp = BSP_APIC_ID.load(Ordering::Relaxed);
        if !SEEN[p].swap(true, Ordering::AcqRel)
            && t.apic_id != bsp
            && SEEN_APS.fetch_add(1, Ordering::AcqRel) + 1 == AP_TARGET.load(Ordering::Relaxed)
        {
            // The last expected AP wakes the BSP (halted in `bring_up`).
            apic::send_fixed(bsp, WAKE_VECTOR);
        }
    }
}

#[no_mangle]
extern "C" fn vmkit_ap_main(cpu: u32) -> ! {
    let cpu = cpu as usize;
    crate::gdt::load_tss(cpu);
    crate::idt::load();
    apic::init_ap();
    record(cpu, &Topology::read());
    park(cpu)
}

/// Parks this CPU: runs jobs posted with [`post_job`], sleeps in `hlt` otherwise.
pub fn park(cpu: usize) -> ! {
    let Some(r) = CPUS.get(cpu) else {
        crate::cpu::halt_forever()
    };
    loop {
        cli();
        let job = r.job.swap(0, Ordering::Acquire);
        if job != 0 {
            let arg = r.job_arg.load(Ordering::Relaxed);
            // SAFETY: `job` was stored by `post_job` from a valid `Job` function pointer.
            let f: Job = unsafe { core::mem::transmute::<usize, Job>(job as usize) };
            f(arg);
            continue;
        }
        wait_for_interrupt(cpu);
    }
}

/// Hands `f(arg)` to the parked CPU with index `cpu` and wakes it. Returns `false` if that CPU
/// is not online or still has an unstarted job.
pub fn post_job(cpu: usize, f: Job, arg: u64) -> bool {
    let Some(r) = CPUS.get(cpu) else { return false };
    if cpu == 0 || !r.valid() || r.job.load(Ordering::Acquire) != 0 {
        return false;
    }
    r.job_arg.store(arg, Ordering::Relaxed);
    r.job.store(f as usize as u64, Ordering::Release);
    apic::send_fixed(r.apic_id.load(Ordering::Relaxed), WAKE_VECTOR);
    true
}

/// Result of [`bring_up`].
pub struct Outcome {
    /// CPUs online, BSP included (APs without a slot included).
    pub cpus: u32,
    /// APIC IDs of the CPUs that recorded themselves, ascending.
    pub ids: ApicIdSet<MAX_CPUS>,
    /// Every CPU's CPUID IDs match its LAPIC ID and the online set equals the expected set.
    pub consistent: bool,
    /// BSP's SMT width (leaf 0xB).
    pub smt_bits: u32,
    /// BSP's core width (leaf 0xB).
    pub core_bits: u32,
    /// All expected APs came online before the timeout.
    pub all_online: bool,
    /// TSC ticks from the first INIT to all online (or the timeout).
    pub elapsed_tsc: u64,
    /// Per-ID STARTUP re-sends.
    pub resends: u32,
    /// Highest CPU index that may hold a record.
    pub max_cpu: usize,
    /// The first CPU whose CPUID IDs disagree with its LAPIC ID (diagnostics).
    pub mismatch: Option<Topology>,
}

fn copy_trampoline() {
    let start = core::ptr::addr_of!(vmkit_trampoline_start);
    let end = core::ptr::addr_of!(vmkit_trampoline_end);
    let len = end as usize - start as usize;
    assert!(len <= TRAMPOLINE_MAX, "SIPI trampoline is {len} bytes");
    // SAFETY: 0x8000..0x8FFF is reserved for the guest's trampoline by the boot contract
    // (boot data lives at 0x6000/0x7000 and was copied out before this point); identity-mapped.
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDR as *mut u8, len) }
}

/// Starts every expected AP and waits for them (see the module docs).
pub fn bring_up(boot: &BootInfo, want: &'static ApicIdSet<MAX_CPUS>, tsc_khz: u64) -> Outcome {
    let bsp = Topology::read();
    BSP_APIC_ID.store(bsp.apic_id, Ordering::Relaxed);
    EXPECTED.store(want as *const _ as *mut _, Ordering::Release);

    let aps = want.len() - usize::from(want.position(bsp.apic_id).is_some());
    AP_TARGET.store(aps as u32, Ordering::Relaxed);
    // Per-CPU blocks right after the image, limited by the RAM the memory map shows there;
    // BLOCK_SIZE-aligned: the interrupt path finds a CPU's block from its IST stack.
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let area = (image_end + BLOCK_SIZE as u64 - 1) & !(BLOCK_SIZE as u64 - 1);
    let mut slots = if aps == 0 {
        0
    } else {
        (aps + SLACK_SLOTS).min(MAX_CPUS - 1)
    };
    if let Some(ram) = boot.ram_at(area) {
        slots = slots.min((ram / BLOCK_SIZE as u64) as usize);
    }
    for r in CPUS.iter().take(slots + 1) {
        r.clear();
    }
    record(0, &bsp);

    let ms = |n: u64| n.saturating_mul(tsc_khz);
    let start = rdtsc();
    let mut resends = 0u32;
    let mut all_online = aps == 0;
    if aps > 0 {
        vmkit_ap_area.store(area, Ordering::Relaxed);
        copy_trampoline();
        // A locked exchange: a full barrier on x86 (`mfence` is not emulated by this host's
        // KVM), so the APs see the area, the slots and the trampoline.
        vmkit_ap_slots.swap(slots as u32, Ordering::SeqCst);

        apic::send_init_all_but_self();
        apic::send_sipi_all_but_self(SIPI_VECTOR);
        // The BSP sleeps while it waits, leaving the host CPUs to the APs: the last AP wakes
        // it with an IPI; the LAPIC timer wakes it for re-sends and the timeout.
        let deadline = start + ms(TIMEOUT_MS);
        let mut next_resend = start + ms(FIRST_RESEND_MS);
        loop {
            if SEEN_APS.load(Ordering::Acquire) as usize >= aps {
                all_online = true;
                break;
            }
            let now = rdtsc();
            if now >= deadline {
                break;
            }
            if now >= next_resend {
                for (p, id) in want.as_slice().iter().enumerate() {
                    if *id != bsp.apic_id && !SEEN[p].load(Ordering::Acquire) {
                        apic::send_sipi(*id, SIPI_VECTOR);
                        resends += 1;
                    }
                }
                next_resend = now + ms(RESEND_MS);
            }
            apic::arm_timer(now, next_resend.min(deadline) - now, tsc_khz);
            wait_for_interrupt(0);
        }
        apic::disarm_timer();
    }
    let elapsed_tsc = rdtsc().wrapping_sub(start);

    let mut ids = ApicIdSet::new();
    let mut consistent = true;
    let mut mismatch = None;
    let mut recorded = 0u32;
    let max_cpu = slots.min(MAX_CPUS - 1);
    for r in CPUS.iter().take(max_cpu + 1) {
        if let Some(t) = r.topology() {
            recorded += 1;
            ids.insert(t.apic_id);
            if !t.consistent() {
                consistent = false;
                mismatch = mismatch.or(Some(t));
            }
        }
    }
    let extra = vmkit_ap_extra.load(Ordering::Acquire);
    consistent &= extra == 0 && ids.len() as u32 == recorded && ids.as_slice() == want.as_slice();
    Outcome {
        cpus: recorded + extra,
        ids,
        consistent,
        smt_bits: bsp.smt_bits,
        core_bits: bsp.core_bits,
        all_online,
        elapsed_tsc,
        resends,
        max_cpu,
        mismatch,
    }
}

static JOBS_DONE: AtomicU32 = AtomicU32::new(0);

extern "C" fn count_job(_: u64) {
    JOBS_DONE.fetch_add(1, Ordering::AcqRel);
}

/// Hands a trivial job to every online AP and waits (up to `timeout_ms`) for all to run it.
/// Returns `(ran, posted)`. Exercises the park/wake path (`vmkit.debug=1`).
pub fn ping_aps(max_cpu: usize, tsc_khz: u64, timeout_ms: u64) -> (u32, u32) {
    let before = JOBS_DONE.load(Ordering::Acquire);
    let mut posted = 0u32;
    for cpu in 1..=max_cpu {
        if post_job(cpu, count_job, 0) {
            posted += 1;
        }
    }
    let start = rdtsc();
    while JOBS_DONE.load(Ordering::Acquire) - before < posted
        && rdtsc().wrapping_sub(start) < timeout_ms.saturating_mul(tsc_khz)
    {
        pause();
    }
    (JOBS_DONE.load(Ordering::Acquire) - before, posted)
}
