// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The error type of this crate.

use std::io;
use std::path::PathBuf;

use vmm_sys_util::errno;

/// Everything that can go wrong while laying out, allocating, registering or tracking guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A RAM size of zero was requested.
    #[error("guest RAM size is 0: a guest needs at least one page of RAM")]
    ZeroSize,
    /// A size or address is not a multiple of the required alignment.
    #[error("{what} {value:#x} is not a multiple of {align:#x} bytes")]
    Unaligned {
        /// What was misaligned (for example "RAM size").
        what: &'static str,
        /// The offending value.
        value: u64,
        /// The required alignment.
        align: u64,
    },
    /// The RAM does not fit below the guest-physical address limit.
    #[error(
        "guest RAM size {size:#x} does not fit the layout: RAM would end at {end} \
         but the guest-physical address limit is {limit:#x}"
    )]
    TooLarge {
        /// Requested RAM size.
        size: u64,
        /// Where RAM would end (exclusive), or "beyond 2^64" on overflow.
        end: String,
        /// Exclusive guest-physical address limit of the layout.
        limit: u64,
    },
    /// The configured MMIO gap is unusable.
    #[error("invalid MMIO gap [{start:#x}, {end:#x}): {reason}")]
    InvalidGap {
        /// Configured gap start.
        start: u64,
        /// Configured gap end (exclusive).
        end: u64,
        /// Why the gap is rejected.
        reason: &'static str,
    },
    /// The guest-physical address width is out of range.
    #[error("guest physical address width of {0} bits is out of range (32..=52)")]
    InvalidPhysAddrBits(u8),
    /// A combination of options that cannot work together.
    #[error("invalid guest RAM configuration: {0}")]
    InvalidConfig(&'static str),
    /// `memfd_create` failed.
    #[error("memfd_create for guest RAM failed: {0}")]
    Memfd(#[source] io::Error),
    /// Sizing or sealing the backing file failed.
    #[error("{op} on the guest RAM backing file failed: {source}")]
    BackingFile {
        /// The failed operation (for example "ftruncate").
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The hugetlbfs directory could not be inspected or a file could not be created in it.
    #[error("cannot use hugetlbfs directory {path}: {source}")]
    HugetlbfsPath {
        /// The configured directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The configured directory is not on a hugetlbfs mount.
    #[error("{0} is not on a hugetlbfs mount (statfs magic differs); mount one with `mount -t hugetlbfs none DIR`")]
    NotHugetlbfs(PathBuf),
    /// The kernel does not support the requested huge page size.
    #[error("huge pages of {page_size:#x} bytes are not supported by this kernel/CPU")]
    HugePageSizeUnsupported {
        /// The requested huge page size.
        page_size: u64,
    },
    /// Not enough huge pages are reserved on the host.
    #[error(
        "not enough huge pages for {size:#x} bytes of guest RAM: need {needed} pages of \
         {page_size:#x} bytes, the host has {free} free (see /sys/kernel/mm/hugepages/ \
         and /proc/sys/vm/nr_hugepages)"
    )]
    HugePagesUnavailable {
        /// Bytes of RAM that were to be mapped.
        size: u64,
        /// Huge page size in bytes.
        page_size: u64,
        /// Huge pages needed.
        needed: u64,
        /// Free huge pages reported by sysfs at the time of failure (0 if unreadable).
        free: u64,
    },
    /// `mmap` of a RAM region failed.
    #[error("mmap of a {size:#x}-byte guest RAM region failed: {source}")]
    Mmap {
        /// Size of the region.
        size: u64,
        /// The error from vm-memory's mapping code.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// `madvise` failed.
    #[error("madvise({advice}) on guest RAM [{host_addr:#x}, +{size:#x}) failed: {source}")]
    Madvise {
        /// The advice (for example "MADV_HUGEPAGE").
        advice: &'static str,
        /// Host virtual address of the region.
        host_addr: u64,
        /// Size of the region.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// vm-memory refused the set of regions.
    #[error("building the guest memory map failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestRegionCollectionError),
    /// The guest memory has no file backing that could be shared with another process.
    #[error("guest RAM is anonymous private memory: it has no file descriptor to share (use a memfd or hugetlbfs backing)")]
    NotShared,
    /// A region is not registered in any slot, or a slot id is unknown.
    #[error("KVM memory slot {0} is not registered")]
    UnknownSlot(u32),
    /// A new slot would overlap an existing slot.
    #[error(
        "guest range [{start:#x}, +{size:#x}) overlaps KVM memory slot {slot} \
         [{slot_start:#x}, +{slot_size:#x})"
    )]
    SlotOverlap {
        /// Start of the new range.
        start: u64,
        /// Size of the new range.
        size: u64,
        /// The existing slot.
        slot: u32,
        /// Start of the existing slot.
        slot_start: u64,
        /// Size of the existing slot.
        slot_size: u64,
    },
    /// A region is empty or not page-aligned, which KVM rejects.
    #[error("guest range [{start:#x}, +{size:#x}) cannot be a KVM memory slot: {reason}")]
    InvalidSlotRange {
        /// Start of the range.
        start: u64,
        /// Size of the range.
        size: u64,
        /// Why.
        reason: &'static str,
    },
    /// All KVM memory slots are in use.
    #[error("no free KVM memory slot: all {limit} slots this VM supports are in use")]
    NoFreeSlot {
        /// Slots supported by KVM (`KVM_CAP_NR_MEMSLOTS`).
        limit: u32,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} (guest {guest_addr:#x}, size {size:#x}) failed: {source}")]
    SetUserMemoryRegion {
        /// Slot id.
        slot: u32,
        /// Guest-physical start.
        guest_addr: u64,
        /// Size (0 when removing).
        size: u64,
        /// The KVM error.
        #[source]
        source: errno::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    GetDirtyLog {
        /// Slot id.
        slot: u32,
        /// The KVM error.
        #[source]
        source: errno::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
