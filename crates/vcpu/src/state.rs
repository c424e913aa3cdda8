// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The complete, versioned state of one x86_64 vCPU.
//!
//! [`VcpuState`] is plain data with named fields (not a dump of KVM structures), encoded by
//! `vmkit-migration` as self-describing CBOR under the name `"vmkit-vcpu/x86_64"`, version 1.
//! Opaque blobs (the LAPIC page, the XSAVE area) are byte strings whose sizes
//! [`VcpuState::validate`] checks before anything reaches KVM.
//!
//! Saving ([`crate::Vcpu::save_state`]) reads, with the vCPU paused: CPUID, regs, sregs, FPU,
//! XSAVE, XCRs, LAPIC, MSRs, debug registers, MP state, vCPU events and the TSC frequency.
//!
//! Restoring ([`crate::Vcpu::restore_state`]) writes in this order, because later items
//! depend on earlier ones:
//!
//! 1. **CPUID** — KVM checks MSR writes, XCR0 and XSAVE contents against the guest's CPUID.
//! 2. **TSC frequency** (only if it differs from the vCPU's).
//! 3. **sregs** — CPU mode, control registers, EFER and the APIC base (which may switch the
//!    LAPIC to x2APIC mode and so changes how the LAPIC page is read).
//! 4. **regs** (after sregs: RIP/RFLAGS are interpreted in the restored mode).
//! 5. **FPU**, then **XSAVE** (a superset of it; both are written because some KVMs, this
//!    project's nested host among them, keep the `KVM_GET_FPU` view apart from XSAVE), then
//!    **XCRs**.
//! 6. **LAPIC** (after sregs, see 3; before MSRs, because `IA32_TSC_DEADLINE` is only
//!    accepted once the LAPIC timer is in TSC-deadline mode).
//! 7. **MSRs**.
//! 8. **debug registers**.
//! 9. **MP state**, then **vCPU events** last: pending exceptions/NMIs/SMIs are injected
//!    relative to everything above, and KVM refuses some MP states while an INIT is latched.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcr, kvm_xcrs, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_SUSPENDED,
};
use serde::{Deserialize, Serialize};
use vmkit_migration::{MigrationError, VersionedState};

use crate::lapic::LAPIC_STATE_SIZE;

/// Size of the legacy `kvm_xsave` region.
pub const XSAVE_LEGACY_SIZE: usize = 4096;
/// Largest XSAVE area accepted from a state (far above any CPU's, guards allocations).
pub const XSAVE_MAX_SIZE: usize = 1 << 20;
/// Largest MSR list accepted from a state.
pub const MAX_STATE_MSRS: usize = 4096;
/// Largest XCR list (`kvm_xcrs::xcrs`).
pub const MAX_XCRS: usize = 16;

/// Byte strings as CBOR byte strings (compact), accepting arrays of integers on input.
mod blob {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Bounded pre-allocation: the hint comes from the input.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    pub mod option {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        #[derive(Serialize, Deserialize)]
        struct Wrap(#[serde(with = "super")] Vec<u8>);

        pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(b) => s.serialize_some(&Wrap(b.clone())),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

/// General-purpose registers (`kvm_regs`).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache (`kvm_segment`).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    #[serde(rename = "type")]
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

/// A descriptor table register (GDTR/IDTR).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Special registers (`kvm_sregs`).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    /// Pending external interrupt bitmap (256 bits).
    pub interrupt_bitmap: [u64; 4],
}

/// Legacy x87/SSE state (`kvm_fpu`); superseded by [`VcpuState::xsave`] when present.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// One extended control register (XCR0, ...).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xcr {
    pub index: u32,
    pub value: u64,
}

/// One MSR value.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// One CPUID entry (`kvm_cpuid_entry2`).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Debug registers (`kvm_debugregs`).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub flags: u64,
}

/// Pending and injected events (`kvm_vcpu_events`).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuEvents {
    pub exception_injected: u8,
    pub exception_nr: u8,
    pub exception_has_error_code: u8,
    pub exception_pending: u8,
    pub exception_error_code: u32,
    pub interrupt_injected: u8,
    pub interrupt_nr: u8,
    pub interrupt_soft: u8,
    pub interrupt_shadow: u8,
    pub nmi_injected: u8,
    pub nmi_pending: u8,
    pub nmi_masked: u8,
    pub sipi_vector: u32,
    /// `KVM_VCPUEVENT_VALID_*` flags as read.
    pub flags: u32,
    pub smi_smm: u8,
    pub smi_pending: u8,
    pub smi_inside_nmi: u8,
    pub smi_latched_init: u8,
    pub triple_fault_pending: u8,
    pub exception_has_payload: u8,
    pub exception_payload: u64,
}

/// The complete state of one vCPU (see the module documentation for what and in which
/// order it is restored).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index in the VM.
    pub index: u32,
    /// APIC ID (= KVM vCPU id).
    pub apic_id: u32,
    /// CPUID entries as set on the vCPU.
    pub cpuid: Vec<CpuidEntry>,
    /// General-purpose registers.
    pub regs: Regs,
    /// Special registers.
    pub sregs: Sregs,
    /// Legacy FPU state.
    pub fpu: Fpu,
    /// XSAVE area (4096 bytes, or `KVM_CAP_XSAVE2` bytes), if KVM has XSAVE.
    #[serde(default, with = "blob::option")]
    pub xsave: Option<Vec<u8>>,
    /// Extended control registers, if KVM has XCRs.
    #[serde(default)]
    pub xcrs: Option<Vec<Xcr>>,
    /// MSR values.
    pub msrs: Vec<MsrEntry>,
    /// In-kernel LAPIC register page (1024 bytes), if the VM has an in-kernel irqchip.
    #[serde(default, with = "blob::option")]
    pub lapic: Option<Vec<u8>>,
    /// Debug registers.
    #[serde(default)]
    pub debug_regs: Option<DebugRegs>,
    /// `KVM_MP_STATE_*`.
    pub mp_state: u32,
    /// Pending events.
    pub events: VcpuEvents,
    /// Guest TSC frequency in kHz, when KVM reports it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

impl VersionedState for VcpuState {
    const NAME: &'static str = "vmkit-vcpu/x86_64";
    const VERSION: u16 = 1;
}

fn invalid(reason: String) -> MigrationError {
    MigrationError::InvalidState {
        name: VcpuState::NAME,
        reason,
    }
}

impl VcpuState {
    /// Decodes an encoded state (any supported version) and validates it. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, MigrationError> {
        let state: Self = vmkit_migration::decode(bytes)?;
        state.validate()?;
        Ok(state)
    }

    /// Encodes the state (current version).
    pub fn encode(&self) -> Result<Vec<u8>, MigrationError> {
        vmkit_migration::encode(self)
    }

    /// Checks everything that could make the state unusable or dangerous to hand to KVM:
    /// blob sizes, list lengths, value ranges. Restore calls it; call it yourself before
    /// using a decoded state in any other way.
    pub fn validate(&self) -> Result<(), MigrationError> {
        if self.cpuid.is_empty() {
            return Err(invalid("no CPUID entries".into()));
        }
        if self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(invalid(format!(
                "{} CPUID entries, more than KVM's limit of {KVM_MAX_CPUID_ENTRIES}",
                self.cpuid.len()
            )));
        }
        if let Some(x) = &self.xsave {
            if x.len() < XSAVE_LEGACY_SIZE || x.len() > XSAVE_MAX_SIZE || x.len() % 4 != 0 {
                return Err(invalid(format!(
                    "XSAVE area of {} bytes; expected a multiple of 4 between {XSAVE_LEGACY_SIZE} and {XSAVE_MAX_SIZE}",
                    x.len()
                )));
            }
        }
        if let Some(x) = &self.xcrs {
            if x.len() > MAX_XCRS {
                return Err(invalid(format!("{} XCRs, at most {MAX_XCRS}", x.len())));
            }
        }
        if self.msrs.len() > MAX_STATE_MSRS {
            return Err(invalid(format!(
                "{} MSRs, at most {MAX_STATE_MSRS}",
                self.msrs.len()
            )));
        }
        if let Some(l) = &self.lapic {
            if l.len() != LAPIC_STATE_SIZE {
                return Err(invalid(format!(
                    "LAPIC page of {} bytes, expected {LAPIC_STATE_SIZE}",
                    l.len()
                )));
            }
        }
        if self.mp_state > KVM_MP_STATE_SUSPENDED {
            return Err(invalid(format!("unknown MP state {}", self.mp_state)));
        }
        for (name, seg) in [
            ("cs", &self.sregs.cs),
            ("ds", &self.sregs.ds),
            ("es", &self.sregs.es),
            ("fs", &self.sregs.fs),
            ("gs", &self.sregs.gs),
            ("ss", &self.sregs.ss),
            ("tr", &self.sregs.tr),
            ("ldt", &self.sregs.ldt),
        ] {
            if seg.type_ > 0xf
                || seg.dpl > 3
                || [
                    seg.present,
                    seg.db,
                    seg.s,
                    seg.l,
                    seg.g,
                    seg.avl,
                    seg.unusable,
                ]
                .iter()
                .any(|&b| b > 1)
            {
                return Err(invalid(format!(
                    "segment {name} has out-of-range fields: {seg:?}"
                )));
            }
        }
        Ok(())
    }

    /// The CPUID entries in KVM's form.
    pub fn kvm_cpuid(&self) -> Vec<kvm_cpuid_entry2> {
        self.cpuid.iter().map(|&e| e.into()).collect()
    }

    /// The MSRs in KVM's form.
    pub fn kvm_msrs(&self) -> Vec<kvm_msr_entry> {
        self.msrs.iter().map(|&e| e.into()).collect()
    }

    /// The XCRs in KVM's form (at most [`MAX_XCRS`] are used).
    pub fn kvm_xcrs(&self) -> Option<kvm_xcrs> {
        self.xcrs.as_ref().map(|list| xcrs_to_kvm(list))
    }

    /// The XSAVE area as 32-bit words, zero-padded to `size` bytes (the size KVM uses on the
    /// target). Fails if the saved area is larger than `size`.
    pub fn xsave_words(&self, size: usize) -> Result<Option<Vec<u32>>, MigrationError> {
        let Some(x) = &self.xsave else {
            return Ok(None);
        };
        if x.len() > size {
            return Err(invalid(format!(
                "XSAVE area of {} bytes is larger than the {size} bytes KVM uses here",
                x.len()
            )));
        }
        let mut words: Vec<u32> = x
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                for (d, s) in w.iter_mut().zip(c) {
                    *d = *s;
                }
                u32::from_le_bytes(w)
            })
            .collect();
        words.resize(size.div_ceil(4), 0);
        Ok(Some(words))
    }
}

/// Converts a list of XCRs into `kvm_xcrs`.
pub fn xcrs_to_kvm(list: &[Xcr]) -> kvm_xcrs {
    let mut k = kvm_xcrs::default();
    let n = list.len().min(MAX_XCRS);
    k.nr_xcrs = n as u32;
    for (dst, src) in k.xcrs.iter_mut().zip(list) {
        *dst = kvm_xcr {
            xcr: src.index,
            reserved: 0,
            value: src.value,
        };
    }
    k
}

/// Converts `kvm_xcrs` into a list (trusting at most [`MAX_XCRS`] entries).
pub fn xcrs_from_kvm(k: &kvm_xcrs) -> Vec<Xcr> {
    let n = (k.nr_xcrs as usize).min(MAX_XCRS);
    k.xcrs[..n]
        .iter()
        .map(|x| Xcr {
            index: x.xcr,
            value: x.value,
        })
        .collect()
}

/// XSAVE words as little-endian bytes.
pub fn xsave_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

impl From<kvm_regs> for Regs {
    fn from(r: kvm_regs) -> Self {
        Self {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<Regs> for kvm_regs {
    fn from(r: Regs) -> Self {
        Self {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<kvm_segment> for Segment {
    fn from(s: kvm_segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
        }
    }
}

impl From<Segment> for kvm_segment {
    fn from(s: Segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
            padding: 0,
        }
    }
}

impl From<kvm_dtable> for DescriptorTable {
    fn from(d: kvm_dtable) -> Self {
        Self {
            base: d.base,
            limit: d.limit,
        }
    }
}

impl From<DescriptorTable> for kvm_dtable {
    fn from(d: DescriptorTable) -> Self {
        Self {
            base: d.base,
            limit: d.limit,
            padding: [0; 3],
        }
    }
}

impl From<kvm_sregs> for Sregs {
    fn from(s: kvm_sregs) -> Self {
        Self {
            cs: s.cs.into(),
            ds: s.ds.into(),
            es: s.es.into(),
            fs: s.fs.into(),
            gs: s.gs.into(),
            ss: s.ss.into(),
            tr: s.tr.into(),
            ldt: s.ldt.into(),
            gdt: s.gdt.into(),
            idt: s.idt.into(),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

impl From<Sregs> for kvm_sregs {
    fn from(s: Sregs) -> Self {
        Self {
            cs: s.cs.into(),
            ds: s.ds.into(),
            es: s.es.into(),
            fs: s.fs.into(),
            gs: s.gs.into(),
            ss: s.ss.into(),
            tr: s.tr.into(),
            ldt: s.ldt.into(),
            gdt: s.gdt.into(),
            idt: s.idt.into(),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

impl From<kvm_fpu> for Fpu {
    fn from(f: kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<Fpu> for kvm_fpu {
    fn from(f: Fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            pad1: 0,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            pad2: 0,
        }
    }
}

impl From<kvm_msr_entry> for MsrEntry {
    fn from(e: kvm_msr_entry) -> Self {
        Self {
            index: e.index,
            data: e.data,
        }
    }
}

impl From<MsrEntry> for kvm_msr_entry {
    fn from(e: MsrEntry) -> Self {
        crate::msr::entry(e.index, e.data)
    }
}

impl From<kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: CpuidEntry) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            padding: [0; 3],
        }
    }
}

impl From<kvm_debugregs> for DebugRegs {
    fn from(d: kvm_debugregs) -> Self {
        Self {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
            flags: d.flags,
        }
    }
}

impl From<DebugRegs> for kvm_debugregs {
    fn from(d: DebugRegs) -> Self {
        Self {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
            flags: d.flags,
            reserved: [0; 9],
        }
    }
}

impl From<kvm_vcpu_events> for VcpuEvents {
    fn from(e: kvm_vcpu_events) -> Self {
        Self {
            exception_injected: e.exception.injected,
            exception_nr: e.exception.nr,
            exception_has_error_code: e.exception.has_error_code,
            exception_pending: e.exception.pending,
            exception_error_code: e.exception.error_code,
            interrupt_injected: e.interrupt.injected,
            interrupt_nr: e.interrupt.nr,
            interrupt_soft: e.interrupt.soft,
            interrupt_shadow: e.interrupt.shadow,
            nmi_injected: e.nmi.injected,
            nmi_pending: e.nmi.pending,
            nmi_masked: e.nmi.masked,
            sipi_vector: e.sipi_vector,
            flags: e.flags,
            smi_smm: e.smi.smm,
            smi_pending: e.smi.pending,
            smi_inside_nmi: e.smi.smm_inside_nmi,
            smi_latched_init: e.smi.latched_init,
            triple_fault_pending: e.triple_fault.pending,
            exception_has_payload: e.exception_has_payload,
            exception_payload: e.exception_payload,
        }
    }
}

impl From<VcpuEvents> for kvm_vcpu_events {
    fn from(e: VcpuEvents) -> Self {
        let mut k = kvm_vcpu_events::default();
        k.exception.injected = e.exception_injected;
        k.exception.nr = e.exception_nr;
        k.exception.has_error_code = e.exception_has_error_code;
        k.exception.pending = e.exception_pending;
        k.exception.error_code = e.exception_error_code;
        k.interrupt.injected = e.interrupt_injected;
        k.interrupt.nr = e.interrupt_nr;
        k.interrupt.soft = e.interrupt_soft;
        k.interrupt.shadow = e.interrupt_shadow;
        k.nmi.injected = e.nmi_injected;
        k.nmi.pending = e.nmi_pending;
        k.nmi.masked = e.nmi_masked;
        k.sipi_vector = e.sipi_vector;
        k.flags = e.flags;
        k.smi.smm = e.smi_smm;
        k.smi.pending = e.smi_pending;
        k.smi.smm_inside_nmi = e.smi_inside_nmi;
        k.smi.latched_init = e.smi_latched_init;
        k.triple_fault.pending = e.triple_fault_pending;
        k.exception_has_payload = e.exception_has_payload;
        k.exception_payload = e.exception_payload;
        k
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A deterministic, fully populated state.
    pub(crate) fn sample() -> VcpuState {
        let seg = |sel: u16, ty: u8| Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: sel,
            type_: ty,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
        };
        let mut fpu = Fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[0] = [0xab; 16];
        let mut xsave = vec![0u8; XSAVE_LEGACY_SIZE];
        xsave[0] = 0x7f;
        xsave[24] = 0x80;
        let mut lapic = vec![0u8; LAPIC_STATE_SIZE];
        lapic[0x30] = 0x14;
        VcpuState {
            index: 3,
            apic_id: 4,
            cpuid: vec![CpuidEntry {
                function: 0,
                eax: 0x1f,
                ebx: 0x6874_7541,
                ..Default::default()
            }],
            regs: Regs {
                rip: 0x1000,
                rflags: 2,
                rbx: 7,
                ..Default::default()
            },
            sregs: Sregs {
                cs: seg(8, 0xb),
                ds: seg(0x18, 3),
                es: seg(0x18, 3),
                fs: seg(0x18, 3),
                gs: seg(0x18, 3),
                ss: seg(0x18, 3),
                cr0: 0x11,
                apic_base: 0xfee0_0800,
                ..Default::default()
            },
            fpu,
            xsave: Some(xsave),
            xcrs: Some(vec![Xcr { index: 0, value: 7 }]),
            msrs: vec![MsrEntry {
                index: 0x10,
                data: 12345,
            }],
            lapic: Some(lapic),
            debug_regs: Some(DebugRegs {
                dr6: 0xffff_0ff0,
                dr7: 0x400,
                ..Default::default()
            }),
            mp_state: 0,
            events: VcpuEvents {
                flags: 0xd,
                ..Default::default()
            },
            tsc_khz: Some(2_596_136),
        }
    }

    #[test]
    fn round_trip_through_the_versioned_encoding() {
        let s = sample();
        let bytes = s.encode().unwrap();
        assert_eq!(VcpuState::decode(&bytes).unwrap(), s);
        let bare = VcpuState {
            xsave: None,
            xcrs: None,
            lapic: None,
            debug_regs: None,
            tsc_khz: None,
            ..sample()
        };
        assert_eq!(VcpuState::decode(&bare.encode().unwrap()).unwrap(), bare);
    }

    #[test]
    fn blobs_are_byte_strings() {
        let bytes = sample().encode().unwrap();
        // A 1024-byte LAPIC page as an array of integers would take >1 KiB on its own; as a
        // byte string the whole state stays well below 4096 + 1024 + 1 KiB.
        assert!(
            bytes.len() < XSAVE_LEGACY_SIZE + LAPIC_STATE_SIZE + 3000,
            "{}",
            bytes.len()
        );
    }

    #[test]
    fn validate_rejects_bad_sizes() {
        let bad = [
            VcpuState {
                lapic: Some(vec![0; 1023]),
                ..sample()
            },
            VcpuState {
                xsave: Some(vec![0; 4095]),
                ..sample()
            },
            VcpuState {
                xsave: Some(vec![0; 4098]),
                ..sample()
            },
            VcpuState {
                xsave: Some(vec![0; XSAVE_MAX_SIZE + 4]),
                ..sample()
            },
            VcpuState {
                xcrs: Some(vec![Xcr::default(); 17]),
                ..sample()
            },
            VcpuState {
                cpuid: vec![],
                ..sample()
            },
            VcpuState {
                cpuid: vec![CpuidEntry::default(); 257],
                ..sample()
            },
            VcpuState {
                msrs: vec![MsrEntry::default(); MAX_STATE_MSRS + 1],
                ..sample()
            },
            VcpuState {
                mp_state: 11,
                ..sample()
            },
        ];
        for (i, s) in bad.iter().enumerate() {
            assert!(s.validate().is_err(), "case {i}");
            assert!(VcpuState::decode(&s.encode().unwrap()).is_err(), "case {i}");
        }
        let mut s = sample();
        s.sregs.cs.dpl = 4;
        assert!(s.validate().is_err());
    }

    #[test]
    fn xsave_padding_and_limits() {
        let s = sample();
        let w = s.xsave_words(8192).unwrap().unwrap();
        assert_eq!(w.len(), 2048);
        assert_eq!(w[0], 0x7f);
        assert_eq!(w[6], 0x80);
        assert!(w[1024..].iter().all(|&x| x == 0));
        assert!(s.xsave_words(2048).is_err());
        assert_eq!(xsave_bytes(&w[..1024]), s.xsave.clone().unwrap());
    }

    #[test]
    fn kvm_conversions_round_trip() {
        let s = sample();
        let k: kvm_sregs = s.sregs.into();
        assert_eq!(Sregs::from(k), s.sregs);
        let k: kvm_regs = s.regs.into();
        assert_eq!(Regs::from(k), s.regs);
        let k: kvm_fpu = s.fpu.into();
        assert_eq!(Fpu::from(k), s.fpu);
        let ev = VcpuEvents {
            exception_injected: 1,
            exception_nr: 14,
            exception_error_code: 2,
            nmi_pending: 1,
            sipi_vector: 9,
            smi_latched_init: 1,
            exception_payload: 0xdead,
            ..Default::default()
        };
        let k: kvm_vcpu_events = ev.into();
        assert_eq!(VcpuEvents::from(k), ev);
        let x = xcrs_to_kvm(&[Xcr { index: 0, value: 7 }]);
        assert_eq!(xcrs_from_kvm(&x), vec![Xcr { index: 0, value: 7 }]);
        let mut k = kvm_xcrs {
            nr_xcrs: 1000,
            ..Default::default()
        };
        k.xcrs[0].value = 1;
        assert_eq!(xcrs_from_kvm(&k).len(), MAX_XCRS);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Ok(s) = VcpuState::decode(&bytes) {
                let _ = s.xsave_words(4096);
                let _ = s.kvm_xcrs();
            }
        }

        #[test]
        fn mutated_encodings_never_panic(pos in 0usize..6000, val in proptest::num::u8::ANY) {
            let mut bytes = sample().encode().unwrap();
            let at = pos % bytes.len().max(1);
            if let Some(b) = bytes.get_mut(at) {
                *b = val;
            }
            if let Ok(s) = VcpuState::decode(&bytes) {
                let _ = s.xsave_words(4096);
            }
        }
    }
}
