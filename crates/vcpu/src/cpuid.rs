// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The CPUID policy: what each vCPU sees when it executes `cpuid`.
//!
//! A [`CpuidPolicy`] starts from the list KVM reports as supported
//! (`KVM_GET_SUPPORTED_CPUID`, read by [`HostCpuid::from_kvm`]) and shapes it once for the
//! whole VM ([`CpuidPolicy::new`]):
//!
//! - the CPU [`Topology`] (sockets, cores per socket, threads per core) in leaves 0x1, 0x4,
//!   0xB, 0x1F and the AMD leaves 0x80000001 (CmpLegacy), 0x80000008 (NC, ApicIdCoreIdSize),
//!   0x8000001D and 0x8000001E;
//! - the x2APIC and hypervisor bits (and TSC-deadline when KVM has `KVM_CAP_TSC_DEADLINE_TIMER`);
//! - the KVM paravirtual leaves 0x40000000/0x40000001, filtered by [`PvFeatures`];
//! - the removal of named features ([`FEATURES`], e.g. `"cx16"`, `"xsave"`).
//!
//! [`CpuidPolicy::entries_for`] then fills in the per-vCPU fields (initial APIC ID in leaf 0x1,
//! x2APIC ID in leaves 0xB/0x1F, extended APIC ID, core and node in 0x8000001E). All of this
//! is pure: the unit tests feed a synthetic supported list and need no `/dev/kvm`.
//!
//! APIC IDs follow the topology with power-of-two field widths, as on real hardware: the
//! thread number takes `ceil(log2(threads_per_core))` bits, the core number
//! `ceil(log2(cores_per_socket))` bits above it, and the socket number the rest. With 3 cores
//! per socket and 1 thread per core the APIC IDs are 0, 1, 2, 4, 5, 6, ...

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};

/// Errors from building a CPUID policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// A topology field is zero.
    #[error("CPU topology: {field} is 0; sockets, cores per socket and threads per core must all be at least 1")]
    ZeroTopologyField {
        /// The field that is zero.
        field: &'static str,
    },
    /// The topology product overflows (or exceeds the 32-bit APIC ID space).
    #[error("CPU topology {sockets} sockets x {cores} cores x {threads} threads is too large: APIC IDs would not fit in 32 bits")]
    TopologyTooLarge {
        /// Sockets.
        sockets: u32,
        /// Cores per socket.
        cores: u32,
        /// Threads per core.
        threads: u32,
    },
    /// The topology has fewer CPUs than there are vCPUs.
    #[error("CPU topology {sockets} sockets x {cores} cores x {threads} threads = {capacity} CPUs cannot hold {vcpus} vCPUs")]
    TopologyTooSmall {
        /// Sockets.
        sockets: u32,
        /// Cores per socket.
        cores: u32,
        /// Threads per core.
        threads: u32,
        /// Product of the three.
        capacity: u64,
        /// Requested vCPU count.
        vcpus: u32,
    },
    /// The vCPU count is zero.
    #[error("the vCPU count is 0; a VM needs at least one vCPU")]
    NoVcpus,
    /// A vCPU index outside `0..vcpu_count`.
    #[error("vCPU index {index} is out of range for a VM with {count} vCPUs")]
    VcpuOutOfRange {
        /// The index asked for.
        index: u32,
        /// Number of vCPUs of the policy.
        count: u32,
    },
    /// A named feature that is not in [`FEATURES`].
    #[error("unknown CPU feature {name:?}; known features: {known}")]
    UnknownFeature {
        /// The name given.
        name: String,
        /// Comma-separated list of known names.
        known: String,
    },
    /// The supported list lacks a leaf the policy cannot do without.
    #[error("the supported CPUID list has no leaf {0:#x}")]
    MissingLeaf(u32),
    /// More entries than KVM accepts.
    #[error("the CPUID list has {count} entries, more than KVM's limit of {max}")]
    TooManyEntries {
        /// Entries produced.
        count: usize,
        /// KVM's limit.
        max: usize,
    },
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupported(vmm_sys_util::errno::Error),
    /// The FAM wrapper for `KVM_SET_CPUID2` could not be built.
    #[error("cannot build the kvm_cpuid2 structure: {0}")]
    Fam(String),
}

/// How the vCPUs are arranged into sockets, cores and threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    /// Number of sockets (packages).
    pub sockets: u32,
    /// Cores in each socket.
    pub cores_per_socket: u32,
    /// Hardware threads in each core.
    pub threads_per_core: u32,
}

/// Number of bits needed to number `count` items (`ceil(log2(count))`, 0 for 0 or 1).
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

impl Topology {
    /// A validated topology (every field at least 1, all APIC IDs within 32 bits).
    pub fn new(
        sockets: u32,
        cores_per_socket: u32,
        threads_per_core: u32,
    ) -> Result<Self, CpuidError> {
        let t = Self {
            sockets,
            cores_per_socket,
            threads_per_core,
        };
        t.validate()?;
        Ok(t)
    }

    /// One socket with `vcpus` single-threaded cores (the usual VMM default).
    pub fn flat(vcpus: u32) -> Result<Self, CpuidError> {
        Self::new(1, vcpus, 1)
    }

    /// Checks every field is non-zero and the APIC ID space fits 32 bits.
    pub fn validate(&self) -> Result<(), CpuidError> {
        for (field, v) in [
            ("sockets", self.sockets),
            ("cores per socket", self.cores_per_socket),
            ("threads per core", self.threads_per_core),
        ] {
            if v == 0 {
                return Err(CpuidError::ZeroTopologyField { field });
            }
        }
        let socket_bits = bits_for(self.sockets);
        if self.thread_bits() + self.core_bits() + socket_bits > 32 {
            return Err(CpuidError::TopologyTooLarge {
                sockets: self.sockets,
                cores: self.cores_per_socket,
                threads: self.threads_per_core,
            });
        }
        Ok(())
    }

    /// Checks the topology is valid and has room for `vcpus` vCPUs (`product >= vcpus`).
    pub fn validate_for(&self, vcpus: u32) -> Result<(), CpuidError> {
        self.validate()?;
        if vcpus == 0 {
            return Err(CpuidError::NoVcpus);
        }
        let capacity = self.capacity();
        if capacity < u64::from(vcpus) {
            return Err(CpuidError::TopologyTooSmall {
                sockets: self.sockets,
                cores: self.cores_per_socket,
                threads: self.threads_per_core,
                capacity,
                vcpus,
            });
        }
        Ok(())
    }

    /// sockets x cores per socket x threads per core.
    pub fn capacity(&self) -> u64 {
        u64::from(self.sockets)
            * u64::from(self.cores_per_socket)
            * u64::from(self.threads_per_core)
    }

    /// Logical processors per socket (cores x threads).
    pub fn threads_per_socket(&self) -> u64 {
        u64::from(self.cores_per_socket) * u64::from(self.threads_per_core)
    }

    /// Width of the thread field of the APIC ID.
    pub fn thread_bits(&self) -> u32 {
        bits_for(self.threads_per_core)
    }

    /// Width of the core field of the APIC ID.
    pub fn core_bits(&self) -> u32 {
        bits_for(self.cores_per_socket)
    }

    /// (socket, core within socket, thread within core) of vCPU `index`.
    pub fn coordinates(&self, index: u32) -> (u32, u32, u32) {
        let threads = self.threads_per_core.max(1);
        let cores = self.cores_per_socket.max(1);
        let thread = index % threads;
        let core = (index / threads) % cores;
        let socket = index / threads / cores;
        (socket, core, thread)
    }

    /// The APIC ID of vCPU `index` (`socket | core | thread` bit fields).
    ///
    /// Fails when the ID does not fit 32 bits (an index far beyond the topology).
    pub fn apic_id(&self, index: u32) -> Result<u32, CpuidError> {
        let (socket, core, thread) = self.coordinates(index);
        let shift = self.thread_bits() + self.core_bits();
        let socket_part = u64::from(socket) << shift;
        let id = socket_part | u64::from(core) << self.thread_bits() | u64::from(thread);
        u32::try_from(id).map_err(|_| CpuidError::TopologyTooLarge {
            sockets: self.sockets,
            cores: self.cores_per_socket,
            threads: self.threads_per_core,
        })
    }
}

/// The KVM paravirtual features offered in leaf 0x40000001.
///
/// Only what KVM reports as supported is ever offered (except
/// [`PvFeatures::msi_ext_dest_id`], which is a property of the VMM, see there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvFeatures {
    /// Expose the KVM signature leaves at all. When `false`, leaves 0x40000000.. are removed
    /// and the other fields are ignored.
    pub enabled: bool,
    /// kvm-clock: `CLOCKSOURCE`, `CLOCKSOURCE2` and `CLOCKSOURCE_STABLE_BIT`.
    pub kvm_clock: bool,
    /// `NOP_IO_DELAY`: port 0x80 delays are unnecessary.
    pub nop_io_delay: bool,
    /// `PV_EOI`.
    pub pv_eoi: bool,
    /// `PV_UNHALT` (paravirtual spinlocks).
    pub pv_unhalt: bool,
    /// `PV_TLB_FLUSH`.
    pub pv_tlb_flush: bool,
    /// `PV_SEND_IPI`.
    pub pv_send_ipi: bool,
    /// `PV_SCHED_YIELD`.
    pub pv_sched_yield: bool,
    /// `POLL_CONTROL`.
    pub poll_control: bool,
    /// `STEAL_TIME`.
    pub steal_time: bool,
    /// `MSI_EXT_DEST_ID` (bit 15): the guest may put APIC ID bits 8..14 into MSI address
    /// bits 11..5, which lets it use x2APIC IDs above 255 without interrupt remapping.
    ///
    /// KVM does not report this bit: it describes the VMM's interrupt routing. KVM's MSI
    /// routes decode extended destination IDs; the in-kernel IOAPIC does not, so a guest with
    /// APIC IDs above 255 should route IOAPIC pins to CPUs below 256 (Linux does by default).
    pub msi_ext_dest_id: bool,
    /// Asynchronous page faults (`ASYNC_PF`, `ASYNC_PF_VMEXIT`, `ASYNC_PF_INT`). Off by default.
    pub async_pf: bool,
}

impl Default for PvFeatures {
    fn default() -> Self {
        Self {
            enabled: true,
            kvm_clock: true,
            nop_io_delay: true,
            pv_eoi: true,
            pv_unhalt: true,
            pv_tlb_flush: true,
            pv_send_ipi: true,
            pv_sched_yield: true,
            poll_control: true,
            steal_time: true,
            msi_ext_dest_id: true,
            async_pf: false,
        }
    }
}

/// KVM paravirtual feature bits of leaf 0x40000001 EAX (Linux `uapi/asm/kvm_para.h`).
pub mod kvm_feature {
    /// kvm-clock, old MSRs.
    pub const CLOCKSOURCE: u32 = 0;
    /// No delay needed on port 0x80.
    pub const NOP_IO_DELAY: u32 = 1;
    /// kvm-clock, new MSRs.
    pub const CLOCKSOURCE2: u32 = 3;
    /// Asynchronous page faults.
    pub const ASYNC_PF: u32 = 4;
    /// Steal time accounting.
    pub const STEAL_TIME: u32 = 5;
    /// Paravirtual end of interrupt.
    pub const PV_EOI: u32 = 6;
    /// Paravirtual unhalt (spinlocks).
    pub const PV_UNHALT: u32 = 7;
    /// Paravirtual TLB flush.
    pub const PV_TLB_FLUSH: u32 = 9;
    /// Async PF delivered as a VM exit (nested).
    pub const ASYNC_PF_VMEXIT: u32 = 10;
    /// Paravirtual IPIs.
    pub const PV_SEND_IPI: u32 = 11;
    /// Host-side halt polling control.
    pub const POLL_CONTROL: u32 = 12;
    /// Paravirtual yield to a preempted vCPU.
    pub const PV_SCHED_YIELD: u32 = 13;
    /// Async PF "page ready" as an interrupt.
    pub const ASYNC_PF_INT: u32 = 14;
    /// Extended destination ID in MSI addresses.
    pub const MSI_EXT_DEST_ID: u32 = 15;
    /// kvm-clock is stable (no per-CPU drift).
    pub const CLOCKSOURCE_STABLE_BIT: u32 = 24;
}

impl PvFeatures {
    /// The leaf 0x40000001 EAX bits this selection asks for.
    pub fn requested_mask(&self) -> u32 {
        use kvm_feature::*;
        let mut m = 0u32;
        let mut set = |on: bool, bits: &[u32]| {
            if on {
                for b in bits {
                    m |= 1 << b;
                }
            }
        };
        set(
            self.kvm_clock,
            &[CLOCKSOURCE, CLOCKSOURCE2, CLOCKSOURCE_STABLE_BIT],
        );
        set(self.nop_io_delay, &[NOP_IO_DELAY]);
        set(self.pv_eoi, &[PV_EOI]);
        set(self.pv_unhalt, &[PV_UNHALT]);
        set(self.pv_tlb_flush, &[PV_TLB_FLUSH]);
        set(self.pv_send_ipi, &[PV_SEND_IPI]);
        set(self.pv_sched_yield, &[PV_SCHED_YIELD]);
        set(self.poll_control, &[POLL_CONTROL]);
        set(self.steal_time, &[STEAL_TIME]);
        set(self.async_pf, &[ASYNC_PF, ASYNC_PF_VMEXIT, ASYNC_PF_INT]);
        m
    }
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidReg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// A named CPUID feature bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    /// Canonical name (lower case, `-` separated).
    pub name: &'static str,
    /// Leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input).
    pub subleaf: u32,
    /// Output register.
    pub reg: CpuidReg,
    /// Bit number.
    pub bit: u8,
    /// Features that cannot work without this one and are removed with it.
    pub implies: &'static [&'static str],
}

const fn feat(
    name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: CpuidReg,
    bit: u8,
    implies: &'static [&'static str],
) -> FeatureBit {
    FeatureBit {
        name,
        leaf,
        subleaf,
        reg,
        bit,
        implies,
    }
}

/// The named features that can be removed with [`CpuidConfig::remove`].
pub const FEATURES: &[FeatureBit] = {
    use CpuidReg::*;
    &[
        feat("monitor", 1, 0, Ecx, 3, &[]),
        feat("vmx", 1, 0, Ecx, 5, &[]),
        feat("fma", 1, 0, Ecx, 12, &[]),
        feat("cx16", 1, 0, Ecx, 13, &[]),
        feat("pdcm", 1, 0, Ecx, 15, &[]),
        feat("pcid", 1, 0, Ecx, 17, &[]),
        feat("sse4-2", 1, 0, Ecx, 20, &[]),
        feat("x2apic", 1, 0, Ecx, 21, &[]),
        feat("movbe", 1, 0, Ecx, 22, &[]),
        feat("popcnt", 1, 0, Ecx, 23, &[]),
        feat("tsc-deadline", 1, 0, Ecx, 24, &[]),
        feat("aes", 1, 0, Ecx, 25, &[]),
        feat(
            "xsave",
            1,
            0,
            Ecx,
            26,
            &["avx", "xsaveopt", "xsavec", "xsaves"],
        ),
        feat(
            "avx",
            1,
            0,
            Ecx,
            28,
            &["avx2", "fma", "f16c", "vaes", "vpclmulqdq"],
        ),
        feat("f16c", 1, 0, Ecx, 29, &[]),
        feat("rdrand", 1, 0, Ecx, 30, &[]),
        feat("hypervisor", 1, 0, Ecx, 31, &[]),
        feat("fsgsbase", 7, 0, Ebx, 0, &[]),
        feat("bmi1", 7, 0, Ebx, 3, &[]),
        feat("avx2", 7, 0, Ebx, 5, &["avx512f"]),
        feat("smep", 7, 0, Ebx, 7, &[]),
        feat("bmi2", 7, 0, Ebx, 8, &[]),
        feat("erms", 7, 0, Ebx, 9, &[]),
        feat("invpcid", 7, 0, Ebx, 10, &[]),
        feat(
            "avx512f",
            7,
            0,
            Ebx,
            16,
            &["avx512dq", "avx512cd", "avx512bw", "avx512vl"],
        ),
        feat("avx512dq", 7, 0, Ebx, 17, &[]),
        feat("rdseed", 7, 0, Ebx, 18, &[]),
        feat("smap", 7, 0, Ebx, 20, &[]),
        feat("clflushopt", 7, 0, Ebx, 23, &[]),
        feat("avx512cd", 7, 0, Ebx, 28, &[]),
        feat("sha-ni", 7, 0, Ebx, 29, &[]),
        feat("avx512bw", 7, 0, Ebx, 30, &[]),
        feat("avx512vl", 7, 0, Ebx, 31, &[]),
        feat("umip", 7, 0, Ecx, 2, &[]),
        feat("pku", 7, 0, Ecx, 3, &[]),
        feat("vaes", 7, 0, Ecx, 9, &[]),
        feat("vpclmulqdq", 7, 0, Ecx, 10, &[]),
        feat("la57", 7, 0, Ecx, 16, &[]),
        feat("rdpid", 7, 0, Ecx, 22, &[]),
        feat("arch-capabilities", 7, 0, Edx, 29, &[]),
        feat("xsaveopt", 0xd, 1, Eax, 0, &[]),
        feat("xsavec", 0xd, 1, Eax, 1, &[]),
        feat("xsaves", 0xd, 1, Eax, 3, &[]),
        feat("svm", 0x8000_0001, 0, Ecx, 2, &[]),
        feat("topoext", 0x8000_0001, 0, Ecx, 22, &[]),
        feat("pdpe1gb", 0x8000_0001, 0, Edx, 26, &[]),
        feat("rdtscp", 0x8000_0001, 0, Edx, 27, &[]),
    ]
};

/// Alternative spellings accepted by [`find_feature`] (after normalisation).
const ALIASES: &[(&str, &str)] = &[
    ("cmpxchg16b", "cx16"),
    ("tsc-deadline-timer", "tsc-deadline"),
    ("arch-capabilities-msr", "arch-capabilities"),
    ("sse4.2", "sse4-2"),
    ("sha", "sha-ni"),
    ("1gb-pages", "pdpe1gb"),
];

/// Looks up a feature by name: case-insensitive, `_` and `-` interchangeable, aliases such
/// as `cmpxchg16b` for `cx16` accepted.
pub fn find_feature(name: &str) -> Option<&'static FeatureBit> {
    let norm: String = name
        .trim()
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let canonical = ALIASES
        .iter()
        .find(|(alias, _)| *alias == norm)
        .map_or(norm.as_str(), |(_, c)| c);
    FEATURES.iter().find(|f| f.name == canonical)
}

fn unknown_feature(name: &str) -> CpuidError {
    let mut known: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
    known.sort_unstable();
    CpuidError::UnknownFeature {
        name: name.to_owned(),
        known: known.join(", "),
    }
}

/// Resolves names to feature bits, adding the features they imply (transitively).
pub fn resolve_features<S: AsRef<str>>(
    names: &[S],
) -> Result<Vec<&'static FeatureBit>, CpuidError> {
    let mut out: Vec<&'static FeatureBit> = Vec::new();
    let mut queue: Vec<&'static FeatureBit> = Vec::new();
    for n in names {
        queue.push(find_feature(n.as_ref()).ok_or_else(|| unknown_feature(n.as_ref()))?);
    }
    while let Some(f) = queue.pop() {
        if out.iter().any(|o| o.name == f.name) {
            continue;
        }
        out.push(f);
        for dep in f.implies {
            // Every `implies` name is in the table (checked by a unit test).
            if let Some(d) = find_feature(dep) {
                queue.push(d);
            }
        }
    }
    Ok(out)
}

/// What the host's KVM supports, as read once per host.
#[derive(Clone, Debug, Default)]
pub struct HostCpuid {
    /// `KVM_GET_SUPPORTED_CPUID`.
    pub entries: Vec<kvm_cpuid_entry2>,
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the in-kernel LAPIC emulates TSC-deadline mode (KVM does
    /// not always report the bit in the supported list).
    pub tsc_deadline_timer: bool,
}

impl HostCpuid {
    /// Reads the supported CPUID list and capabilities from KVM.
    pub fn from_kvm(kvm: &kvm_ioctls::Kvm) -> Result<Self, CpuidError> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(CpuidError::GetSupported)?;
        Ok(Self {
            entries: cpuid.as_slice().to_vec(),
            tsc_deadline_timer: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        })
    }
}

/// The user's choices for a CPUID policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidConfig {
    /// Number of vCPUs of the VM.
    pub vcpu_count: u32,
    /// How they are arranged.
    pub topology: Topology,
    /// Paravirtual features.
    pub pv: PvFeatures,
    /// Named features to hide from the guest (see [`FEATURES`]), e.g. `["cx16", "xsave"]`.
    pub remove: Vec<String>,
    /// Also describe the topology in leaf 0x1F (V2 extended topology), raising the maximum
    /// basic leaf to 0x1F if the host's is lower. Leaf 0xB is always described.
    pub leaf_0x1f: bool,
}

impl CpuidConfig {
    /// `vcpu_count` vCPUs in `topology`, default PV features, nothing removed, leaf 0x1F on.
    pub fn new(vcpu_count: u32, topology: Topology) -> Self {
        Self {
            vcpu_count,
            topology,
            pv: PvFeatures::default(),
            remove: Vec::new(),
            leaf_0x1f: true,
        }
    }

    /// `vcpu_count` single-threaded cores in one socket.
    pub fn flat(vcpu_count: u32) -> Result<Self, CpuidError> {
        Ok(Self::new(vcpu_count, Topology::flat(vcpu_count.max(1))?))
    }

    /// Adds named features to remove (builder style).
    pub fn remove_features<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.remove.extend(names.into_iter().map(Into::into));
        self
    }
}

/// Leaf numbers used by the shaping code.
mod leaf {
    pub const VENDOR: u32 = 0;
    pub const FEATURES: u32 = 1;
    pub const CACHE_PARAMS: u32 = 4;
    pub const EXT_TOPOLOGY: u32 = 0xb;
    pub const EXT_TOPOLOGY_V2: u32 = 0x1f;
    pub const KVM_SIGNATURE: u32 = 0x4000_0000;
    pub const KVM_FEATURES: u32 = 0x4000_0001;
    pub const HYPERVISOR_LAST: u32 = 0x4000_00ff;
    pub const EXT_FEATURES: u32 = 0x8000_0001;
    pub const AMD_SIZES: u32 = 0x8000_0008;
    pub const AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
    pub const AMD_EXT_APIC_ID: u32 = 0x8000_001e;
}

/// Leaf 1 bits we set or clear ourselves.
mod bits {
    pub const ECX_X2APIC: u32 = 1 << 21;
    pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
    pub const ECX_HYPERVISOR: u32 = 1 << 31;
    pub const EDX_HTT: u32 = 1 << 28;
    pub const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
}

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// A VM-wide CPUID policy from which each vCPU's CPUID is derived.
#[derive(Clone, Debug)]
pub struct CpuidPolicy {
    base: Vec<kvm_cpuid_entry2>,
    topology: Topology,
    vcpu_count: u32,
    amd: bool,
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: CpuidReg) -> &mut u32 {
    match reg {
        CpuidReg::Eax => &mut e.eax,
        CpuidReg::Ebx => &mut e.ebx,
        CpuidReg::Ecx => &mut e.ecx,
        CpuidReg::Edx => &mut e.edx,
    }
}

/// Whether `e` answers `cpuid(function, index)`.
fn matches(e: &kvm_cpuid_entry2, function: u32, index: u32) -> bool {
    e.function == function && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
}

/// The entry answering `cpuid(function, index)` in `entries`.
pub fn find_entry(
    entries: &[kvm_cpuid_entry2],
    function: u32,
    index: u32,
) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| matches(e, function, index))
}

fn find_mut(
    entries: &mut [kvm_cpuid_entry2],
    function: u32,
    index: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries.iter_mut().find(|e| matches(e, function, index))
}

fn set_field(value: u32, shift: u32, width: u32, field: u32) -> u32 {
    let mask = if width >= 32 {
        u32::MAX
    } else {
        (1u32 << width) - 1
    } << shift;
    (value & !mask) | ((field << shift) & mask)
}

fn topology_entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: 0,
        padding: [0; 3],
    }
}

impl CpuidPolicy {
    /// Reads KVM's supported CPUID and shapes it for `config`.
    pub fn from_kvm(kvm: &kvm_ioctls::Kvm, config: &CpuidConfig) -> Result<Self, CpuidError> {
        Self::new(&HostCpuid::from_kvm(kvm)?, config)
    }

    /// Shapes `host`'s supported CPUID for `config` (pure; no KVM needed).
    pub fn new(host: &HostCpuid, config: &CpuidConfig) -> Result<Self, CpuidError> {
        let topo = config.topology;
        topo.validate_for(config.vcpu_count)?;
        // The largest APIC ID must be representable (checked once here; later per-vCPU
        // lookups of indices below vcpu_count cannot fail).
        topo.apic_id(config.vcpu_count - 1)?;
        let removals = resolve_features(&config.remove)?;

        let mut e: Vec<kvm_cpuid_entry2> = host.entries.clone();
        let vendor =
            find_entry(&e, leaf::VENDOR, 0).ok_or(CpuidError::MissingLeaf(leaf::VENDOR))?;
        let amd = [vendor.ebx, vendor.edx, vendor.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163] // AuthenticAMD
            || [vendor.ebx, vendor.edx, vendor.ecx] == [0x6f67_7948, 0x6e65_476e, 0x656e_6975]; // HygonGenuine
        find_entry(&e, leaf::FEATURES, 0).ok_or(CpuidError::MissingLeaf(leaf::FEATURES))?;

        let thread_bits = topo.thread_bits();
        let core_bits = topo.core_bits();
        let pkg_bits = thread_bits + core_bits;
        let addressable_per_pkg: u64 = 1u64 << pkg_bits;
        let threads_per_pkg = topo.threads_per_socket();

        // Leaf 1: logical processor count, HTT, x2APIC, hypervisor, TSC deadline.
        if let Some(l1) = find_mut(&mut e, leaf::FEATURES, 0) {
            let count = addressable_per_pkg.min(0xff) as u32;
            l1.ebx = set_field(l1.ebx, 16, 8, count);
            if addressable_per_pkg > 1 {
                l1.edx |= bits::EDX_HTT;
            } else {
                l1.edx &= !bits::EDX_HTT;
            }
            l1.ecx |= bits::ECX_X2APIC | bits::ECX_HYPERVISOR;
            if host.tsc_deadline_timer {
                l1.ecx |= bits::ECX_TSC_DEADLINE;
            }
        }

        // Leaf 4: cores per package and threads sharing each cache.
        for c in e.iter_mut().filter(|c| c.function == leaf::CACHE_PARAMS) {
            if c.eax & 0x1f == 0 {
                continue; // no cache at this subleaf
            }
            let level = (c.eax >> 5) & 0x7;
            let cores_field = ((1u64 << core_bits) - 1).min(63) as u32;
            let sharing = if level <= 2 {
                (1u64 << thread_bits) - 1
            } else {
                addressable_per_pkg - 1
            };
            c.eax = set_field(c.eax, 26, 6, cores_field);
            c.eax = set_field(c.eax, 14, 12, sharing.min(0xfff) as u32);
        }

        // Leaves 0xB and 0x1F: rebuilt from scratch (EDX, the x2APIC ID, is per vCPU).
        let mut topo_leaves = vec![leaf::EXT_TOPOLOGY];
        if config.leaf_0x1f {
            topo_leaves.push(leaf::EXT_TOPOLOGY_V2);
        }
        e.retain(|c| c.function != leaf::EXT_TOPOLOGY && c.function != leaf::EXT_TOPOLOGY_V2);
        for &f in &topo_leaves {
            let smt_count = topo.threads_per_core.min(0xffff);
            let core_count = threads_per_pkg.min(0xffff) as u32;
            e.push(topology_entry(f, 0, thread_bits, smt_count, 1 << 8));
            e.push(topology_entry(f, 1, pkg_bits, core_count, 2 << 8 | 1));
            e.push(topology_entry(f, 2, 0, 0, 2));
        }
        let max_basic = *topo_leaves.iter().max().unwrap_or(&leaf::EXT_TOPOLOGY);
        if let Some(l0) = find_mut(&mut e, leaf::VENDOR, 0) {
            l0.eax = l0.eax.max(max_basic);
        }

        // AMD topology leaves.
        if amd {
            if let Some(x1) = find_mut(&mut e, leaf::EXT_FEATURES, 0) {
                if threads_per_pkg > 1 {
                    x1.ecx |= bits::AMD_ECX_CMP_LEGACY;
                } else {
                    x1.ecx &= !bits::AMD_ECX_CMP_LEGACY;
                }
            }
            if let Some(x8) = find_mut(&mut e, leaf::AMD_SIZES, 0) {
                let nc = (threads_per_pkg.min(256) - 1) as u32;
                x8.ecx = set_field(x8.ecx, 0, 8, nc);
                x8.ecx = set_field(x8.ecx, 12, 4, pkg_bits.min(15));
            }
            for c in e
                .iter_mut()
                .filter(|c| c.function == leaf::AMD_CACHE_TOPOLOGY)
            {
                if c.eax & 0x1f == 0 {
                    continue;
                }
                let level = (c.eax >> 5) & 0x7;
                let sharing = if level <= 2 {
                    u64::from(topo.threads_per_core) - 1
                } else {
                    threads_per_pkg - 1
                };
                c.eax = set_field(c.eax, 14, 12, sharing.min(0xfff) as u32);
            }
        }

        // KVM paravirtual leaves.
        if !config.pv.enabled {
            e.retain(|c| !(leaf::KVM_SIGNATURE..=leaf::HYPERVISOR_LAST).contains(&c.function));
        } else {
            let supported = find_entry(&e, leaf::KVM_FEATURES, 0).map(|c| c.eax);
            if let Some(sig) = find_mut(&mut e, leaf::KVM_SIGNATURE, 0) {
                sig.eax = leaf::KVM_FEATURES;
                [sig.ebx, sig.ecx, sig.edx] = KVM_SIGNATURE;
            }
            if let (Some(supported), Some(f)) = (supported, find_mut(&mut e, leaf::KVM_FEATURES, 0))
            {
                let mut eax = supported & config.pv.requested_mask();
                if config.pv.msi_ext_dest_id {
                    eax |= 1 << kvm_feature::MSI_EXT_DEST_ID;
                }
                f.eax = eax;
                f.ebx = 0;
                f.ecx = 0;
                f.edx = 0;
            }
            // Drop any further hypervisor leaves (we describe only the two above).
            e.retain(|c| !(leaf::KVM_FEATURES + 1..=leaf::HYPERVISOR_LAST).contains(&c.function));
        }

        // Named feature removal (last, so it also wins over the bits set above).
        for f in &removals {
            if let Some(c) = find_mut(&mut e, f.leaf, f.subleaf) {
                *reg_mut(c, f.reg) &= !(1u32 << f.bit);
            }
        }

        if e.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(CpuidError::TooManyEntries {
                count: e.len(),
                max: KVM_MAX_CPUID_ENTRIES,
            });
        }
        Ok(Self {
            base: e,
            topology: topo,
            vcpu_count: config.vcpu_count,
            amd,
        })
    }

    /// The topology.
    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// Number of vCPUs the policy was built for.
    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    /// Whether the CPU vendor is AMD (or Hygon), i.e. the AMD topology leaves were shaped.
    pub fn is_amd(&self) -> bool {
        self.amd
    }

    /// The VM-wide entries (per-vCPU fields not filled in).
    pub fn base_entries(&self) -> &[kvm_cpuid_entry2] {
        &self.base
    }

    fn check_index(&self, index: u32) -> Result<(), CpuidError> {
        if index >= self.vcpu_count {
            return Err(CpuidError::VcpuOutOfRange {
                index,
                count: self.vcpu_count,
            });
        }
        Ok(())
    }

    /// APIC ID of vCPU `index`.
    pub fn apic_id(&self, index: u32) -> Result<u32, CpuidError> {
        self.check_index(index)?;
        self.topology.apic_id(index)
    }

    /// The CPUID entries of vCPU `index` (pure).
    pub fn entries_for(&self, index: u32) -> Result<Vec<kvm_cpuid_entry2>, CpuidError> {
        let apic_id = self.apic_id(index)?;
        let (socket, core, _) = self.topology.coordinates(index);
        let mut e = self.base.clone();
        for c in e.iter_mut() {
            match c.function {
                leaf::FEATURES => c.ebx = set_field(c.ebx, 24, 8, apic_id & 0xff),
                leaf::EXT_TOPOLOGY | leaf::EXT_TOPOLOGY_V2 => c.edx = apic_id,
                leaf::AMD_EXT_APIC_ID if self.amd => {
                    c.eax = apic_id;
                    c.ebx = ((self.topology.threads_per_core.min(256) - 1) << 8) | (core & 0xff);
                    // One node per socket: NodesPerProcessor - 1 = 0, NodeId = socket.
                    c.ecx = socket & 0xff;
                    c.edx = 0;
                }
                _ => {}
            }
        }
        Ok(e)
    }

    /// The CPUID of vCPU `index` in the form `KVM_SET_CPUID2` takes.
    pub fn cpuid_for(&self, index: u32) -> Result<CpuId, CpuidError> {
        let entries = self.entries_for(index)?;
        CpuId::from_entries(&entries).map_err(|e| CpuidError::Fam(format!("{e:?}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn ent(function: u32, index: u32, flags: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            padding: [0; 3],
        }
    }

    /// A synthetic supported list modelled on this project's AMD EPYC host.
    pub(crate) fn amd_host() -> HostCpuid {
        HostCpuid {
            entries: vec![
                ent(0, 0, 0, [0x1c, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
                ent(
                    1,
                    0,
                    0,
                    [
                        0x00a1_0f11,
                        0x0102_0800,
                        0x8120_2000 | (1 << 13) | (1 << 23) | (1 << 26) | (1 << 28) | (1 << 30),
                        0x078b_fbff,
                    ],
                ),
                ent(4, 0, 1, [0, 0, 0, 0]),
                ent(
                    7,
                    0,
                    1,
                    [
                        1,
                        0x0180_0002 | (1 << 5) | (1 << 16) | (1 << 18) | (1 << 10),
                        0x104,
                        0x2000_0000,
                    ],
                ),
                ent(0xb, 0, 1, [0, 0, 0, 1]),
                ent(0xd, 0, 1, [0xe7, 0x980, 0x980, 0]),
                ent(0xd, 1, 1, [0xf, 0, 0, 0]),
                ent(
                    0x4000_0000,
                    0,
                    0,
                    [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
                ),
                ent(0x4000_0001, 0, 0, [0x0100_7efb, 0, 0, 0]),
                ent(
                    0x8000_0000,
                    0,
                    0,
                    [0x8000_0021, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
                ),
                ent(
                    0x8000_0001,
                    0,
                    0,
                    [0x00a1_0f11, 0x4000_0000, 0x0040_0393, 0x23d3_fbff],
                ),
                ent(0x8000_0008, 0, 0, [0x3030, 0x5002_0005, 0x7001, 0]),
                ent(0x8000_001d, 0, 1, [0x121, 0x01c0_003f, 0x3f, 0]),
                ent(0x8000_001d, 1, 1, [0x122, 0x01c0_003f, 0x3f, 0]),
                ent(0x8000_001d, 2, 1, [0x143, 0x01c0_003f, 0x7ff, 2]),
                ent(0x8000_001d, 3, 1, [0x4163, 0x03c0_003f, 0x7fff, 1]),
                ent(0x8000_001d, 4, 1, [0, 0, 0, 0]),
                ent(0x8000_001e, 0, 0, [0, 0, 0, 0]),
            ],
            tsc_deadline_timer: true,
        }
    }

    /// A synthetic Intel host with real leaf 4 cache descriptors and max leaf 0x1f.
    pub(crate) fn intel_host() -> HostCpuid {
        HostCpuid {
            entries: vec![
                ent(0, 0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
                ent(
                    1,
                    0,
                    0,
                    [
                        0x0005_0654,
                        0x0010_0800,
                        0x7ffa_fbbf & !(1 << 24) & !(1 << 31),
                        0xbfeb_fbff,
                    ],
                ),
                ent(4, 0, 1, [0x1c00_4121, 0x01c0_003f, 0x3f, 0]),
                ent(4, 1, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0]),
                ent(4, 2, 1, [0x1c00_4143, 0x03c0_003f, 0x3ff, 0]),
                ent(4, 3, 1, [0x1c03_c163, 0x0280_003f, 0x6fff, 6]),
                ent(4, 4, 1, [0, 0, 0, 0]),
                ent(
                    7,
                    0,
                    1,
                    [0, 0xd19f_4fbb, 0x0000_000c, 0xbc00_0400 | (1 << 29)],
                ),
                ent(0x1f, 0, 1, [1, 2, 0x100, 0]),
                ent(0x1f, 1, 1, [6, 0x30, 0x201, 0]),
                ent(
                    0x4000_0000,
                    0,
                    0,
                    [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
                ),
                ent(0x4000_0001, 0, 0, [0x0100_7efb, 0, 0, 0]),
                ent(0x8000_0000, 0, 0, [0x8000_0008, 0, 0, 0]),
                ent(0x8000_0001, 0, 0, [0, 0, 0x121, 0x2c10_0800]),
                ent(0x8000_0008, 0, 0, [0x302e, 0, 0, 0]),
            ],
            tsc_deadline_timer: true,
        }
    }

    fn get(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *find_entry(e, f, i).unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
    }

    #[test]
    fn topology_validation() {
        assert_eq!(
            Topology::new(0, 1, 1),
            Err(CpuidError::ZeroTopologyField { field: "sockets" })
        );
        assert_eq!(
            Topology::new(1, 0, 1),
            Err(CpuidError::ZeroTopologyField {
                field: "cores per socket"
            })
        );
        assert!(matches!(
            Topology::new(1, 1, 0),
            Err(CpuidError::ZeroTopologyField { .. })
        ));
        let t = Topology::new(2, 3, 1).unwrap();
        assert!(t.validate_for(6).is_ok());
        assert!(t.validate_for(4).is_ok(), "room for hotplug is allowed");
        let err = t.validate_for(7).unwrap_err();
        assert!(
            err.to_string().contains("6 CPUs cannot hold 7 vCPUs"),
            "{err}"
        );
        assert_eq!(t.validate_for(0), Err(CpuidError::NoVcpus));
        assert!(matches!(
            Topology::new(1 << 20, 1 << 10, 1 << 4),
            Err(CpuidError::TopologyTooLarge { .. })
        ));
    }

    #[test]
    fn apic_ids_use_power_of_two_fields() {
        let t = Topology::new(2, 3, 1).unwrap();
        let ids: Vec<u32> = (0..6).map(|i| t.apic_id(i).unwrap()).collect();
        assert_eq!(ids, vec![0, 1, 2, 4, 5, 6]);
        let t = Topology::new(2, 3, 2).unwrap();
        assert_eq!((t.thread_bits(), t.core_bits()), (1, 2));
        let ids: Vec<u32> = (0..12).map(|i| t.apic_id(i).unwrap()).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!(t.coordinates(7), (1, 0, 1));
        let flat = Topology::flat(288).unwrap();
        assert_eq!(flat.apic_id(287).unwrap(), 287);
        assert_eq!(flat.core_bits(), 9);
    }

    fn policy(host: &HostCpuid, n: u32, topo: Topology) -> CpuidPolicy {
        CpuidPolicy::new(host, &CpuidConfig::new(n, topo)).unwrap()
    }

    /// Checks the topology leaves of every vCPU against the topology.
    fn check_topology(host: &HostCpuid, n: u32, topo: Topology) {
        let p = policy(host, n, topo);
        let tb = topo.thread_bits();
        let cb = topo.core_bits();
        let mut seen = std::collections::HashSet::new();
        for i in 0..n {
            let e = p.entries_for(i).unwrap();
            let id = topo.apic_id(i).unwrap();
            assert!(seen.insert(id), "APIC ID {id} repeated");
            let l1 = get(&e, 1, 0);
            assert_eq!(l1.ebx >> 24, id & 0xff, "vCPU {i}: leaf 1 initial APIC ID");
            assert_eq!((l1.ebx >> 16) & 0xff, (1u32 << (tb + cb)).min(255));
            assert_ne!(l1.ecx & bits::ECX_X2APIC, 0);
            assert_ne!(l1.ecx & bits::ECX_HYPERVISOR, 0);
            assert_eq!(l1.edx & bits::EDX_HTT != 0, tb + cb > 0);
            for f in [0xb, 0x1f] {
                let s0 = get(&e, f, 0);
                let s1 = get(&e, f, 1);
                let s2 = get(&e, f, 2);
                assert_eq!(
                    (s0.eax, s0.ebx, s0.ecx, s0.edx),
                    (tb, topo.threads_per_core, 0x100, id)
                );
                assert_eq!(
                    (s1.eax, u64::from(s1.ebx), s1.ecx, s1.edx),
                    (tb + cb, topo.threads_per_socket().min(0xffff), 0x201, id)
                );
                assert_eq!((s2.eax, s2.ebx, s2.ecx & 0xff00, s2.edx), (0, 0, 0, id));
                // The guest's own decoding: x2APIC ID >> shift = package ID.
                let (socket, core, thread) = topo.coordinates(i);
                assert_eq!(id >> s1.eax, socket);
                assert_eq!((id >> s0.eax) & ((1 << (s1.eax - s0.eax)) - 1), core);
                assert_eq!(id & ((1 << s0.eax) - 1), thread);
            }
            assert!(get(&e, 0, 0).eax >= 0x1f);
            if p.is_amd() {
                let x1 = get(&e, 0x8000_0001, 0);
                assert_eq!(
                    x1.ecx & bits::AMD_ECX_CMP_LEGACY != 0,
                    topo.threads_per_socket() > 1
                );
                let x8 = get(&e, 0x8000_0008, 0);
                assert_eq!(
                    u64::from(x8.ecx & 0xff),
                    topo.threads_per_socket().min(256) - 1
                );
                assert_eq!((x8.ecx >> 12) & 0xf, (tb + cb).min(15));
                let x1e = get(&e, 0x8000_001e, 0);
                let (socket, core, _) = topo.coordinates(i);
                assert_eq!(x1e.eax, id);
                assert_eq!(x1e.ebx, ((topo.threads_per_core - 1) << 8) | (core & 0xff));
                assert_eq!(x1e.ecx, socket & 0xff);
                let l3 = get(&e, 0x8000_001d, 3);
                assert_eq!(
                    u64::from((l3.eax >> 14) & 0xfff),
                    topo.threads_per_socket() - 1
                );
                let l1d = get(&e, 0x8000_001d, 0);
                assert_eq!((l1d.eax >> 14) & 0xfff, topo.threads_per_core - 1);
            } else {
                for sub in 0..4 {
                    let c = get(&e, 4, sub);
                    assert_eq!(c.eax >> 26, ((1u32 << cb) - 1).min(63));
                    let level = (c.eax >> 5) & 7;
                    let want = if level <= 2 {
                        (1u32 << tb) - 1
                    } else {
                        (1u32 << (tb + cb)) - 1
                    };
                    assert_eq!((c.eax >> 14) & 0xfff, want.min(0xfff));
                    assert_eq!(c.eax & 0x3fff, get(&host.entries, 4, sub).eax & 0x3fff);
                }
            }
        }
        assert!(p.entries_for(n).is_err());
        assert!(p.base_entries().len() <= KVM_MAX_CPUID_ENTRIES);
    }

    #[test]
    fn shapes_common_vcpu_counts() {
        for host in [amd_host(), intel_host()] {
            check_topology(&host, 1, Topology::flat(1).unwrap());
            check_topology(&host, 2, Topology::flat(2).unwrap());
            check_topology(&host, 2, Topology::new(1, 1, 2).unwrap());
            check_topology(&host, 64, Topology::flat(64).unwrap());
            check_topology(&host, 64, Topology::new(2, 16, 2).unwrap());
            check_topology(&host, 288, Topology::flat(288).unwrap());
            check_topology(&host, 288, Topology::new(4, 36, 2).unwrap());
        }
    }

    #[test]
    fn shapes_odd_topologies() {
        for host in [amd_host(), intel_host()] {
            check_topology(&host, 3, Topology::new(1, 3, 1).unwrap());
            check_topology(&host, 6, Topology::new(2, 3, 1).unwrap());
            check_topology(&host, 64, Topology::new(2, 11, 3).unwrap());
            check_topology(&host, 5, Topology::new(3, 1, 2).unwrap());
        }
        // A single vCPU: no HTT, no CmpLegacy.
        let p = policy(&amd_host(), 1, Topology::flat(1).unwrap());
        let e = p.entries_for(0).unwrap();
        assert_eq!(get(&e, 1, 0).edx & bits::EDX_HTT, 0);
        assert_eq!(get(&e, 0x8000_0001, 0).ecx & bits::AMD_ECX_CMP_LEGACY, 0);
    }

    #[test]
    fn apic_id_over_255_truncates_only_the_legacy_field() {
        let p = policy(&intel_host(), 288, Topology::flat(288).unwrap());
        let e = p.entries_for(287).unwrap();
        assert_eq!(get(&e, 1, 0).ebx >> 24, 287 & 0xff);
        assert_eq!(get(&e, 0xb, 0).edx, 287);
        assert_eq!(get(&e, 0x1f, 1).edx, 287);
    }

    #[test]
    fn leaf_0x1f_can_be_left_out() {
        let mut cfg = CpuidConfig::new(4, Topology::flat(4).unwrap());
        cfg.leaf_0x1f = false;
        let p = CpuidPolicy::new(&amd_host(), &cfg).unwrap();
        let e = p.entries_for(1).unwrap();
        assert!(find_entry(&e, 0x1f, 0).is_none());
        assert_eq!(get(&e, 0xb, 0).edx, 1);
        assert_eq!(get(&e, 0, 0).eax, 0x1c, "max basic leaf unchanged");
    }

    #[test]
    fn pv_leaves_follow_selection_and_support() {
        let host = amd_host();
        let p = policy(&host, 1, Topology::flat(1).unwrap());
        let e = p.entries_for(0).unwrap();
        let sig = get(&e, 0x4000_0000, 0);
        assert_eq!(sig.eax, 0x4000_0001);
        let mut name = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&name, b"KVMKVMKVM\0\0\0");
        let f = get(&e, 0x4000_0001, 0).eax;
        use kvm_feature::*;
        for b in [
            CLOCKSOURCE,
            CLOCKSOURCE2,
            CLOCKSOURCE_STABLE_BIT,
            PV_EOI,
            PV_UNHALT,
            PV_TLB_FLUSH,
            PV_SEND_IPI,
            STEAL_TIME,
            MSI_EXT_DEST_ID,
        ] {
            assert_ne!(f & (1 << b), 0, "bit {b}");
        }
        for b in [ASYNC_PF, ASYNC_PF_VMEXIT, ASYNC_PF_INT] {
            assert_eq!(f & (1 << b), 0, "async PF bit {b} is off by default");
        }

        // Switch features off, and ask for async PF.
        let mut cfg = CpuidConfig::new(1, Topology::flat(1).unwrap());
        cfg.pv.kvm_clock = false;
        cfg.pv.pv_send_ipi = false;
        cfg.pv.msi_ext_dest_id = false;
        cfg.pv.async_pf = true;
        let e = CpuidPolicy::new(&host, &cfg)
            .unwrap()
            .entries_for(0)
            .unwrap();
        let f = get(&e, 0x4000_0001, 0).eax;
        for b in [
            CLOCKSOURCE,
            CLOCKSOURCE2,
            CLOCKSOURCE_STABLE_BIT,
            PV_SEND_IPI,
            MSI_EXT_DEST_ID,
        ] {
            assert_eq!(f & (1 << b), 0, "bit {b}");
        }
        assert_ne!(f & (1 << ASYNC_PF), 0);

        // Only what KVM supports: a host without PV_TLB_FLUSH never offers it.
        let mut limited = host.clone();
        for c in limited
            .entries
            .iter_mut()
            .filter(|c| c.function == 0x4000_0001)
        {
            c.eax &= !(1 << PV_TLB_FLUSH);
        }
        let e = policy(&limited, 1, Topology::flat(1).unwrap())
            .entries_for(0)
            .unwrap();
        assert_eq!(get(&e, 0x4000_0001, 0).eax & (1 << PV_TLB_FLUSH), 0);

        // PV leaves disabled altogether.
        let mut cfg = CpuidConfig::new(1, Topology::flat(1).unwrap());
        cfg.pv.enabled = false;
        let e = CpuidPolicy::new(&host, &cfg)
            .unwrap()
            .entries_for(0)
            .unwrap();
        assert!(e
            .iter()
            .all(|c| !(0x4000_0000..=0x4000_00ff).contains(&c.function)));
    }

    #[test]
    fn named_features_are_removed() {
        let host = amd_host();
        let cfg = CpuidConfig::new(2, Topology::flat(2).unwrap()).remove_features([
            "cx16",
            "XSAVE",
            "avx2",
            "x2apic",
            "pcid",
            "invpcid",
            "rdrand",
            "rdseed",
            "tsc_deadline",
            "hypervisor",
            "arch-capabilities",
        ]);
        let p = CpuidPolicy::new(&host, &cfg).unwrap();
        let e = p.entries_for(1).unwrap();
        let l1 = get(&e, 1, 0);
        for bit in [13, 26, 28, 21, 17, 30, 24, 31] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ECX bit {bit}");
        }
        let l7 = get(&e, 7, 0);
        for bit in [5, 16, 10, 18] {
            assert_eq!(l7.ebx & (1 << bit), 0, "leaf 7 EBX bit {bit}");
        }
        assert_eq!(l7.edx & (1 << 29), 0);
        assert_eq!(
            get(&e, 0xd, 1).eax & 0b1011,
            0,
            "xsave implies xsaveopt/xsavec/xsaves"
        );
        // Untouched bits stay.
        assert_ne!(l1.ecx & (1 << 23), 0, "popcnt");
        assert_ne!(l7.ebx & (1 << 23), 0, "clflushopt");

        // Alias.
        let cfg = CpuidConfig::new(1, Topology::flat(1).unwrap()).remove_features(["cmpxchg16b"]);
        let e = CpuidPolicy::new(&host, &cfg)
            .unwrap()
            .entries_for(0)
            .unwrap();
        assert_eq!(get(&e, 1, 0).ecx & (1 << 13), 0);
    }

    #[test]
    fn unknown_feature_lists_known_ones() {
        let cfg = CpuidConfig::new(1, Topology::flat(1).unwrap()).remove_features(["avx9000"]);
        let err = CpuidPolicy::new(&amd_host(), &cfg).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"avx9000\""), "{msg}");
        for name in [
            "cx16",
            "xsave",
            "arch-capabilities",
            "tsc-deadline",
            "invpcid",
        ] {
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn feature_table_is_consistent() {
        let mut names = std::collections::HashSet::new();
        for f in FEATURES {
            assert!(names.insert(f.name), "duplicate {}", f.name);
            assert!(f.bit < 32);
            for dep in f.implies {
                assert!(
                    find_feature(dep).is_some(),
                    "{} implies unknown {dep}",
                    f.name
                );
            }
        }
        for (alias, canonical) in ALIASES {
            assert!(find_feature(alias).is_some(), "{alias}");
            assert!(find_feature(canonical).is_some(), "{canonical}");
        }
        for required in [
            "cx16",
            "xsave",
            "avx",
            "avx2",
            "avx512f",
            "x2apic",
            "pcid",
            "invpcid",
            "rdrand",
            "rdseed",
            "tsc-deadline",
            "hypervisor",
            "arch-capabilities",
        ] {
            assert!(find_feature(required).is_some(), "{required}");
        }
    }

    #[test]
    fn missing_basic_leaves_are_errors() {
        let host = HostCpuid::default();
        let err =
            CpuidPolicy::new(&host, &CpuidConfig::new(1, Topology::flat(1).unwrap())).unwrap_err();
        assert_eq!(err, CpuidError::MissingLeaf(0));
        let cfg = CpuidConfig::new(5, Topology::flat(4).unwrap());
        assert!(matches!(
            CpuidPolicy::new(&amd_host(), &cfg),
            Err(CpuidError::TopologyTooSmall { .. })
        ));
    }

    #[test]
    fn fam_wrapper_for_kvm() {
        let p = policy(&amd_host(), 2, Topology::flat(2).unwrap());
        let c = p.cpuid_for(1).unwrap();
        assert_eq!(c.as_slice(), p.entries_for(1).unwrap().as_slice());
    }

    proptest::proptest! {
        /// Any valid topology yields distinct APIC IDs and consistent leaf 0xB levels.
        #[test]
        fn any_topology_is_consistent(s in 1u32..5, c in 1u32..40, t in 1u32..5, frac in 1u32..=100) {
            let topo = Topology::new(s, c, t).unwrap();
            let cap = topo.capacity() as u32;
            let n = (cap * frac / 100).max(1);
            let p = policy(&amd_host(), n, topo);
            let mut ids = std::collections::HashSet::new();
            for i in 0..n {
                let e = p.entries_for(i).unwrap();
                let id = get(&e, 0xb, 0).edx;
                proptest::prop_assert!(ids.insert(id));
                proptest::prop_assert_eq!(id, topo.apic_id(i).unwrap());
            }
        }
    }
}
