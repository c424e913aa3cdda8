// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Application-processor bring-up: SIPI trampoline, INIT/SIPI, per-AP records, parking.
//!
//! Everything here is shaped by the cost of a guest instruction on an emulating KVM (this
//! development host's: ~0.5 us per instruction, several us per CPUID or MSR access, all vCPUs
//! sharing two host cores): the APs' path is as short as it can be, and the BSP does nothing
//! on the way to "all online" that can wait until after it.
//!
//! Sequence:
//! - [`send_init`] (BSP, first thing in main): broadcast INIT. Each AP's host thread handles
//!   it (a vCPU reset) while the BSP reads the boot information and the firmware tables,
//!   instead of between the BSP's INIT and STARTUP.
//! - [`start_aps`] (BSP, once it has the CPU list): size the AP area (one per-CPU block per
//!   expected AP, carved from RAM after the image), fill the APIC ID -> position table the
//!   APs look themselves up in (unless the IDs are the dense 0, 1, 2, ...), copy the
//!   trampoline to [`TRAMPOLINE_ADDR`], broadcast one STARTUP (no textbook 10 ms wait: KVM
//!   queues INIT and SIPI and handles them in order).
//! - [`record_bsp`] (BSP, while the APs start): its own record.
//! - [`wait_online`] (BSP): sleep in `hlt` until the last expected AP wakes it with an IPI.
//!   CPUs still missing after [`FIRST_RESEND_MS`] get a per-ID STARTUP again, then every
//!   [`RESEND_MS`], until [`TIMEOUT_MS`]. A STARTUP sent to a CPU that is already running is
//!   ignored by the CPU, so re-sending is harmless. [`finish_wait`] stops the timer.
//! - [`collect`] (BSP, after POST 0x30): check every record, build the online ID set.
//!
//! Each AP goes from real mode at 0x8000 straight to long mode (PAE, page tables, EFER.LME,
//! then PE and PG in one CR0 write; the far jump loads the image's GDT code segment), takes a
//! CPU index with an atomic increment and the stack of that index's per-CPU block
//! (`vmkit_ap_entry64`), loads the IDT and its TSS, enables its LAPIC in the BSP's mode,
//! records its APIC ID and CPUID topology, counts itself online if it is expected and parks.
//! An AP beyond the prepared slots counts itself in `vmkit_ap_extra` and halts without
//! touching memory.
//!
//! Parking ([`park`]): with interrupts off the AP checks its job mailbox, then waits with
//! `sti; hlt` (race-free: an IPI already pending wakes the `hlt`; see
//! `percpu::wait_for_interrupt`). [`post_job`] stores a job and sends the [`WAKE_VECTOR`] IPI.

use crate::apic;
use crate::bootinfo::BootInfo;
use crate::cpu::{
    cli, cpuid, max_basic_leaf, pause, rdtsc, CR0_LONG_MODE, CR4_BOOT, EFER_LME, GDT_KERNEL_CS,
    GDT_KERNEL_DS, MSR_EFER,
};
use crate::gdt::GDT_BYTES;
use crate::idt::WAKE_VECTOR;
use crate::percpu::{vmkit_ap_area, wait_for_interrupt, BLOCK_SHIFT, BLOCK_SIZE, MAX_CPUS};
use crate::physmem::ApicIdSet;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU16, AtomicU32, AtomicU64, Ordering};

/// Physical address the SIPI trampoline is copied to (STARTUP vector 0x08).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
/// STARTUP vector (`TRAMPOLINE_ADDR >> 12`).
pub const SIPI_VECTOR: u8 = (TRAMPOLINE_ADDR >> 12) as u8;
/// Room reserved for the trampoline (0x8000..0x8FFF).
const TRAMPOLINE_MAX: usize = 4096;
/// First per-ID STARTUP re-send to missing CPUs, after this many ms. KVM does not lose
/// INIT/SIPI, so a CPU still missing is nearly always one that is slow (its host thread not
/// scheduled yet); re-sending early only adds exits. This leaves room for a loaded host.
pub const FIRST_RESEND_MS: u64 = 100;
/// Later re-sends, every this many ms.
pub const RESEND_MS: u64 = 100;
/// Give up waiting for missing CPUs after this many ms.
pub const TIMEOUT_MS: u64 = 2000;
/// Slots prepared beyond the expected AP count, for CPUs the firmware tables did not list.
const SLACK_SLOTS: usize = 16;
/// APIC IDs below this find their position in the expected set through [`POS_OF`] (one
/// load); larger ones by binary search.
const POS_TABLE_LEN: usize = 4096;

core::arch::global_asm!(
    r#"
    /* SIPI trampoline template: copied to {base}, entered in real mode with CS=0x0800, IP=0,
       interrupts off and DF clear (the INIT state). Goes straight to long mode: PAE and the
       image's page tables, EFER.LME (EFER is 0 after INIT: no read-modify-write), then PE
       and PG in one CR0 write, which lands in compatibility mode; the far jump loads the
       64-bit code segment of the image's GDT (the pseudo-descriptor below points at it). */
    .section .trampoline, "a"
    .balign 16
    .global vmkit_trampoline_start
    .code16
vmkit_trampoline_start:
    lgdtl %cs:(vmkit_tramp_gdtr - vmkit_trampoline_start)
    movl ${cr4}, %eax
    movl %eax, %cr4
    movl $vmkit_pml4, %eax
    movl %eax, %cr3
    movl ${efer}, %ecx
    movl ${lme}, %eax
    xorl %edx, %edx
    wrmsr
    movl ${cr0}, %eax
    movl %eax, %cr0
    ljmpl ${cs}, $vmkit_ap_entry64
    .balign 4
vmkit_tramp_gdtr:
    .word {gdt_bytes} - 1
    .long vmkit_gdt
    .global vmkit_trampoline_end
vmkit_trampoline_end:

    /* AP long-mode entry (in the image). Only SS is reloaded: in 64-bit mode DS/ES ignore
       their base and limit, and nothing uses FS/GS. */
    .text
    .code64
    .balign 16
vmkit_ap_entry64:
    movl ${ds}, %eax
    movl %eax, %ss
    movl $1, %eax
    lock xaddl %eax, vmkit_ap_next(%rip)
    cmpl vmkit_ap_slots(%rip), %eax
    jae 9f
    leal 1(%rax), %edi
    movq %rdi, %rsp
    shlq ${shift}, %rsp
    addq vmkit_ap_area(%rip), %rsp
    leaq -{block_size}(%rsp), %rsi
    call vmkit_ap_main
    ud2
9:  lock incl vmkit_ap_extra(%rip)
8:  cli
    hlt
    jmp 8b
"#,
    base = const TRAMPOLINE_ADDR,
    ds = const GDT_KERNEL_DS,
    cs = const GDT_KERNEL_CS,
    cr4 = const CR4_BOOT,
    cr0 = const CR0_LONG_MODE,
    efer = const MSR_EFER,
    lme = const EFER_LME,
    shift = const BLOCK_SHIFT,
    gdt_bytes = const GDT_BYTES,
    block_size = const BLOCK_SIZE,
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
    /// `max_leaf` is the highest basic CPUID leaf (the BSP reads it once for everyone).
    ///
    /// Leaf 0xB is walked from subleaf 0 up to the core level, the highest level that leaf
    /// defines (three CPUID instructions on a typical CPU; each is an exit).
    #[inline(always)]
    pub fn read(max_leaf: u32) -> Topology {
        let initial_apic_id = cpuid(1, 0).ebx >> 24;
        let mut t = Topology {
            apic_id: apic::id(),
            x2apic_id: None,
            initial_apic_id,
            smt_bits: 0,
            core_bits: 0,
        };
        if max_leaf < 0xB {
            return t;
        }
        let mut r = cpuid(0xB, 0);
        if r.ebx & 0xFFFF == 0 {
            return t;
        }
        let (mut smt_shift, mut core_shift) = (0u32, None);
        let mut sub = 0;
        loop {
            let level_type = (r.ecx >> 8) & 0xFF;
            if level_type == 0 {
                break;
            }
            if sub == 0 {
                t.x2apic_id = Some(r.edx);
            }
            match level_type {
                1 => smt_shift = r.eax & 0x1F,
                2 => {
                    core_shift = Some(r.eax & 0x1F);
                    break;
                }
                _ => {}
            }
            sub += 1;
            if sub == 8 {
                break;
            }
            r = cpuid(0xB, sub);
        }
        t.smt_bits = smt_shift;
        t.core_bits = core_shift.map_or(0, |c| c.saturating_sub(smt_shift));
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

/// What one CPU recorded about itself. Only integer atomics, all zero at boot (the table is
/// zero-initialised data, loaded with the image: nothing to clear at run time).
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

static CPUS: [CpuRecord; MAX_CPUS] = [const { CpuRecord::new() }; MAX_CPUS];

/// The expected APIC IDs (set by the BSP before any AP starts, read-only afterwards).
static EXPECTED: AtomicPtr<ApicIdSet<MAX_CPUS>> = AtomicPtr::new(core::ptr::null_mut());
static NO_CPUS: ApicIdSet<MAX_CPUS> = ApicIdSet::new();
/// `SEEN[p]`: the CPU with the `p`-th expected APIC ID has recorded itself.
static SEEN: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Expected APs (not the BSP) that came online.
static SEEN_APS: AtomicU32 = AtomicU32::new(0);
static BSP_APIC_ID: AtomicU32 = AtomicU32::new(0);
/// Number of expected APs (the one that completes the count wakes the BSP).
static AP_TARGET: AtomicU32 = AtomicU32::new(0);
/// Highest basic CPUID leaf (read once by the BSP).
static MAX_LEAF: AtomicU32 = AtomicU32::new(0);
/// `POS_OF[id]`: position of APIC ID `id` in the expected set, for `id < POS_TABLE_LEN`.
/// Written by the BSP for the expected IDs only (and only when they are not dense) and never
/// cleared: an entry is trusted only when the expected set has `id` at that position (a
/// sparse-set lookup), so whatever the other entries hold is harmless.
#[link_section = ".noinit.pos"]
static POS_OF: [AtomicU16; POS_TABLE_LEN] = [const { AtomicU16::new(0) }; POS_TABLE_LEN];

/// The expected APIC IDs (empty before [`start_aps`]).
pub fn expected() -> &'static ApicIdSet<MAX_CPUS> {
    let p = EXPECTED.load(Ordering::Acquire);
    if p.is_null() {
        &NO_CPUS
    } else {
        // SAFETY: set once by `start_aps` from a `&'static` that is never written afterwards.
        unsafe { &*p }
    }
}

/// Position of `id` in the expected set: `id` itself when the set has it there (the usual
/// dense numbering 0, 1, 2, ...), else through [`POS_OF`] (filled when the set is not dense),
/// else (large IDs) by binary search.
#[inline(always)]
fn position(id: u32) -> Option<usize> {
    let want = expected().as_slice();
    if want.get(id as usize) == Some(&id) {
        return Some(id as usize);
    }
    match POS_OF.get(id as usize) {
        Some(slot) => {
            let p = usize::from(slot.load(Ordering::Relaxed));
            (want.get(p) == Some(&id)).then_some(p)
        }
        None => want.binary_search(&id).ok(),
    }
}

#[inline(always)]
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
    if let Some(p) = position(t.apic_id) {
        let bsp = BSP_APIC_ID.load(Ordering::Relaxed);
        if !SEEN[p].swap(true, Ordering::AcqRel)
            && t.apic_id != bsp
            && SEEN_APS.fetch_add(1, Ordering::AcqRel) + 1 == AP_TARGET.load(Ordering::Relaxed)
        {
            // The last expected AP wakes the BSP (halted in `wait_online`).
            apic::send_fixed(bsp, WAKE_VECTOR);
        }
    }
}

/// AP main: `cpu` is the CPU index taken in `vmkit_ap_entry64`, `block` its per-CPU block
/// (the entry code has the address at hand: the stack top is the block's end).
#[no_mangle]
extern "C" fn vmkit_ap_main(cpu: u32, block: u64) -> ! {
    let cpu = cpu as usize;
    let timed = AP_TIMES.load(Ordering::Relaxed);
    if timed {
        note_time(&AP_START_TSC, cpu);
    }
    crate::idt::load();
    crate::gdt::install_tss(cpu, block);
    apic::init_ap();
    record(cpu, &Topology::read(MAX_LEAF.load(Ordering::Relaxed)));
    if timed {
        note_time(&AP_DONE_TSC, cpu);
    }
    park(cpu)
}

/// `vmkit.debug=1`: the APs note when they reach long mode and when they have recorded
/// themselves (two flag checks otherwise).
static AP_TIMES: AtomicBool = AtomicBool::new(false);
#[link_section = ".noinit.ap_times"]
static AP_START_TSC: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
#[link_section = ".noinit.ap_times"]
static AP_DONE_TSC: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn note_time(table: &[AtomicU64; MAX_CPUS], cpu: usize) {
    if let Some(t) = table.get(cpu) {
        t.store(rdtsc(), Ordering::Relaxed);
    }
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

/// APs started by [`start_aps`].
pub struct Started {
    /// Expected APs (the expected CPUs other than the BSP).
    aps: usize,
    /// AP slots (per-CPU blocks) prepared.
    slots: usize,
    /// TSC when the INIT was sent.
    start_tsc: u64,
}

/// Result of [`wait_online`].
pub struct Waited {
    /// All expected APs came online before the timeout.
    pub all_online: bool,
    /// TSC ticks from the INIT to all online (or the timeout).
    pub elapsed_tsc: u64,
    /// Per-ID STARTUP re-sends.
    pub resends: u32,
}

/// Result of [`collect`].
pub struct Outcome {
    /// CPUs online, BSP included (APs without a slot included).
    pub cpus: u32,
    /// Every CPU's CPUID IDs match its LAPIC ID and the online set equals the expected set.
    pub consistent: bool,
    /// Highest CPU index that may hold a record.
    pub max_cpu: usize,
    /// The first CPU whose CPUID IDs disagree with its LAPIC ID (diagnostics).
    pub mismatch: Option<Topology>,
}

fn copy_trampoline() {
    let start = core::ptr::addr_of!(vmkit_trampoline_start);
    let end = core::ptr::addr_of!(vmkit_trampoline_end);
    let len = end as usize - start as usize;
    if len > TRAMPOLINE_MAX {
        panic!("SIPI trampoline larger than its page");
    }
    // SAFETY: 0x8000..0x8FFF is reserved for the guest's trampoline by the boot contract
    // (boot data lives at 0x6000/0x7000 and was copied out before this point); identity-mapped.
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDR as *mut u8, len) }
}

/// Starts every expected AP (see the module docs). The caller must have enabled the BSP's
/// LAPIC ([`apic::init_bsp`]) and read everything it needs from low memory.
pub fn start_aps(boot: &BootInfo, want: &'static ApicIdSet<MAX_CPUS>) -> Started {
    let bsp_id = apic::id();
    BSP_APIC_ID.store(bsp_id, Ordering::Relaxed);
    EXPECTED.store(want as *const _ as *mut _, Ordering::Release);
    MAX_LEAF.store(max_basic_leaf(), Ordering::Relaxed);

    let aps = want.len() - usize::from(position(bsp_id).is_some());
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

    let start_tsc = rdtsc();
    if aps > 0 {
        // Sorted distinct IDs ending in `len - 1` are exactly 0..len: `position` finds them
        // without the table.
        let ids = want.as_slice();
        if ids
            .last()
            .is_some_and(|&last| last as usize != ids.len() - 1)
        {
            for (p, &id) in ids.iter().enumerate() {
                if let Some(slot) = POS_OF.get(id as usize) {
                    slot.store(p as u16, Ordering::Relaxed);
                }
            }
        }
        vmkit_ap_area.store(area, Ordering::Relaxed);
        copy_trampoline();
        // A locked exchange: a full barrier on x86 (`mfence` is not emulated by this host's
        // KVM), so the APs see the area, the slots, the tables and the trampoline.
        vmkit_ap_slots.swap(slots as u32, Ordering::SeqCst);
        // INIT went out earlier ([`send_init`]).
        apic::send_sipi_all_but_self(SIPI_VECTOR);
    }
    Started {
        aps,
        slots,
        start_tsc,
    }
}

impl Started {
    /// First byte after the per-CPU blocks prepared for the APs (the guest may use RAM from
    /// here on for other things, e.g. device buffers).
    pub fn area_end(&self) -> u64 {
        let image_end = core::ptr::addr_of!(__image_end) as u64;
        let area = (image_end + BLOCK_SIZE as u64 - 1) & !(BLOCK_SIZE as u64 - 1);
        area + (self.slots as u64) * BLOCK_SIZE as u64
    }
}

/// Sends INIT to every other CPU (the first half of starting them, see [`start_aps`]).
pub fn send_init() {
    apic::send_init_all_but_self();
}

/// Reads and records the BSP's own topology (CPU index 0). Call after [`start_aps`]: it
/// overlaps with the APs' start.
pub fn record_bsp() -> Topology {
    let bsp = Topology::read(MAX_LEAF.load(Ordering::Relaxed));
    record(0, &bsp);
    bsp
}

/// Waits until every expected AP is online, re-sending STARTUP to missing ones, or until
/// [`TIMEOUT_MS`]. The BSP sleeps while it waits, leaving the host CPUs to the APs: the last
/// AP wakes it with an IPI; the LAPIC timer wakes it for re-sends and the timeout.
pub fn wait_online(started: &Started, tsc_khz: u64) -> Waited {
    let aps = started.aps;
    let start = started.start_tsc;
    let ms = |n: u64| n.saturating_mul(tsc_khz);
    let mut resends = 0u32;
    let mut all_online = aps == 0;
    if aps > 0 {
        let want = expected();
        let bsp = BSP_APIC_ID.load(Ordering::Relaxed);
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
                    if *id != bsp && !SEEN[p].load(Ordering::Acquire) {
                        apic::send_sipi(*id, SIPI_VECTOR);
                        resends += 1;
                    }
                }
                next_resend = now + ms(RESEND_MS);
            }
            apic::arm_timer(now, next_resend.min(deadline) - now, tsc_khz);
            TIMER_ARMED.store(true, Ordering::Relaxed);
            wait_for_interrupt(0);
        }
    }
    Waited {
        all_online,
        elapsed_tsc: rdtsc().wrapping_sub(start),
        resends,
    }
}

/// The BSP armed its LAPIC timer in [`wait_online`].
static TIMER_ARMED: AtomicBool = AtomicBool::new(false);

/// Stops the timer [`wait_online`] may have left armed (kept out of the way to POST 0x30;
/// interrupts stay off until then, so a late tick is only a pending interrupt).
pub fn finish_wait() {
    if TIMER_ARMED.swap(false, Ordering::Relaxed) {
        apic::disarm_timer();
    }
}

/// Makes the APs note their start and record times (`vmkit.debug=1`); call before
/// [`start_aps`].
pub fn time_aps() {
    AP_TIMES.store(true, Ordering::Relaxed);
}

/// AP timings noted after [`time_aps`], in TSC ticks from the STARTUP broadcast.
pub struct ApTimes {
    /// First AP to reach long mode.
    pub first_start: u64,
    /// Last AP to reach long mode.
    pub last_start: u64,
    /// Mean time from reaching long mode to having recorded itself.
    pub mean_run: u64,
}

/// Summarises the AP timings ([`time_aps`]) of the APs that recorded themselves.
pub fn ap_times(started: &Started, max_cpu: usize) -> Option<ApTimes> {
    let (mut first, mut last, mut run, mut n) = (u64::MAX, 0u64, 0u64, 0u64);
    for cpu in 1..=max_cpu.min(MAX_CPUS - 1) {
        if !CPUS[cpu].valid() {
            continue;
        }
        let start = AP_START_TSC[cpu]
            .load(Ordering::Relaxed)
            .wrapping_sub(started.start_tsc);
        let done = AP_DONE_TSC[cpu]
            .load(Ordering::Relaxed)
            .wrapping_sub(started.start_tsc);
        first = first.min(start);
        last = last.max(start);
        run += done.wrapping_sub(start);
        n += 1;
    }
    (n > 0).then(|| ApTimes {
        first_start: first,
        last_start: last,
        mean_run: run / n,
    })
}

/// Checks every record and fills `ids` with the APIC IDs of the CPUs that recorded
/// themselves, ascending. Run after [`wait_online`].
pub fn collect(started: &Started, ids: &mut ApicIdSet<MAX_CPUS>) -> Outcome {
    let want = expected();
    // Records exist for index 0 (the BSP) and the AP slots taken; the rest are still zero.
    let taken = vmkit_ap_next.load(Ordering::Acquire) as usize;
    let max_cpu = taken.min(started.slots).min(MAX_CPUS - 1);
    let mut consistent = true;
    let mut mismatch = None;
    let mut recorded = 0u32;
    let mut unexpected = false;
    for r in CPUS.iter().take(max_cpu + 1) {
        if let Some(t) = r.topology() {
            recorded += 1;
            unexpected |= position(t.apic_id).is_none();
            if !t.consistent() {
                consistent = false;
                mismatch = mismatch.or(Some(t));
            }
        }
    }
    // The expected IDs that recorded themselves, in ascending order (cheap appends), then any
    // unexpected ones (rare: sorted inserts).
    ids.clear();
    for (p, &id) in want.as_slice().iter().enumerate() {
        if SEEN[p].load(Ordering::Acquire) {
            ids.insert(id);
        }
    }
    if unexpected {
        for r in CPUS.iter().take(max_cpu + 1) {
            if let Some(t) = r.topology() {
                if position(t.apic_id).is_none() {
                    ids.insert(t.apic_id);
                }
            }
        }
    }
    let extra = vmkit_ap_extra.load(Ordering::Acquire);
    // `ids` holds expected IDs only unless `unexpected`, so it equals the expected set
    // exactly when nothing unexpected came and no expected ID is missing. `recorded` counts
    // records, `ids` distinct IDs: they differ when two CPUs report the same APIC ID.
    consistent &=
        extra == 0 && ids.len() as u32 == recorded && !unexpected && ids.len() == want.len();
    Outcome {
        cpus: recorded + extra,
        consistent,
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
