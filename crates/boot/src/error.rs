// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while putting a kernel and its boot data into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image file could not be opened or inspected.
    #[error("cannot open kernel image {path}: {source}")]
    KernelFile {
        /// Path given by the caller.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The initramfs file could not be opened or inspected.
    #[error("cannot open initramfs {path}: {source}")]
    InitramfsFile {
        /// Path given by the caller.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// Reading an image failed.
    #[error("cannot read {name}: {source}")]
    Read {
        /// Name of the image (file name or caller-given label).
        name: String,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The image is neither an ELF file nor a bzImage.
    #[error("{name} is not a kernel image: no ELF magic at offset 0 and no bzImage \"HdrS\" header at offset 0x202")]
    NotAKernel {
        /// Name of the image.
        name: String,
    },
    /// The image is an ELF file this loader cannot boot.
    #[error("{name}: unsupported ELF kernel: {reason}")]
    BadElf {
        /// Name of the image.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The image is a bzImage this loader cannot boot.
    #[error("{name}: unsupported bzImage: {reason}")]
    BadBzImage {
        /// Name of the image.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The kernel needs guest memory that is not RAM (or is reserved for boot data).
    #[error("kernel {name} does not fit in guest RAM: it needs {start:#x}..{end:#x}, {reason}")]
    KernelTooBig {
        /// Name of the image.
        name: String,
        /// First byte needed.
        start: u64,
        /// End (exclusive) of the memory needed.
        end: u64,
        /// Why that range is not usable.
        reason: String,
    },
    /// The initramfs does not fit in RAM between the kernel and the limit.
    #[error("initramfs {name} ({size} bytes) does not fit in guest RAM between {low:#x} and {high:#x} (largest free range: {largest} bytes)")]
    InitramfsTooBig {
        /// Name of the image.
        name: String,
        /// Size of the initramfs.
        size: u64,
        /// Lowest usable address (end of the kernel).
        low: u64,
        /// Highest usable address (exclusive; MMIO gap, 4 GiB or the kernel's `initrd_addr_max`).
        high: u64,
        /// Largest usable free range found.
        largest: u64,
    },
    /// The kernel was loaded by linux-loader but it reported an error.
    #[error("loading kernel {name} failed: {source}")]
    Loader {
        /// Name of the image.
        name: String,
        /// Error from linux-loader.
        source: linux_loader::loader::Error,
    },
    /// The command line is longer than the space reserved for it (or than the kernel accepts).
    #[error("kernel command line is {len} bytes, the limit is {max} bytes ({limit_by})")]
    CmdlineTooLong {
        /// Length of the command line, without the terminating NUL.
        len: usize,
        /// Maximum length without the terminating NUL.
        max: usize,
        /// Which limit applies.
        limit_by: &'static str,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte at offset {0}")]
    CmdlineNul(usize),
    /// The 32-bit MMIO gap is not a valid range.
    #[error("invalid MMIO gap {start:#x}..{end:#x}: {reason}")]
    InvalidMmioGap {
        /// Gap start.
        start: u64,
        /// Gap end (exclusive).
        end: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A memory range wraps around the 64-bit address space.
    #[error("memory range at {start:#x} with size {size:#x} overflows the address space")]
    RangeOverflow {
        /// Range start.
        start: u64,
        /// Range size.
        size: u64,
    },
    /// The memory map has more entries than the boot protocol can carry.
    #[error("the memory map needs {count} entries, the boot protocol carries at most {max}")]
    TooManyE820Entries {
        /// Entries needed.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// Two reserved ranges of the memory map overlap.
    #[error("memory map entries overlap: {a_start:#x}..{a_end:#x} and {b_start:#x}..{b_end:#x}")]
    E820Overlap {
        /// First range start.
        a_start: u64,
        /// First range end.
        a_end: u64,
        /// Second range start.
        b_start: u64,
        /// Second range end.
        b_end: u64,
    },
    /// No CPUs given to a table builder.
    #[error("no CPUs given for the {table}")]
    NoCpus {
        /// Table being built.
        table: &'static str,
    },
    /// A table cannot describe this many CPUs.
    #[error("too many CPUs for the {table}: {count} (at most {max})")]
    TooManyCpus {
        /// Table being built.
        table: &'static str,
        /// CPUs requested.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// The same APIC ID appears twice.
    #[error("APIC ID {0} appears more than once in the CPU list")]
    DuplicateApicId(u32),
    /// An APIC ID is not usable.
    #[error("invalid APIC ID {id}: {reason}")]
    InvalidApicId {
        /// The APIC ID.
        id: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// A configuration value for an ACPI or MP table is invalid.
    #[error("invalid {what}: {reason}")]
    InvalidConfig {
        /// What was configured.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The tables do not fit in their fixed area.
    #[error("the {what} needs {size} bytes but its area {start:#x}..{end:#x} holds {}", end - start)]
    TableAreaFull {
        /// Which table set.
        what: &'static str,
        /// Bytes needed.
        size: u64,
        /// Area start.
        start: u64,
        /// Area end (exclusive).
        end: u64,
    },
    /// A caller-provided ACPI table is malformed.
    #[error("extra ACPI table #{index} is invalid: {reason}")]
    InvalidAcpiTable {
        /// Index in the caller's list.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A fixed boot data area is not backed by guest memory.
    #[error("guest memory does not cover the {what} at {start:#x}..{end:#x}")]
    MissingMemory {
        /// What was to be written.
        what: &'static str,
        /// Area start.
        start: u64,
        /// Area end (exclusive).
        end: u64,
    },
    /// Writing guest memory failed.
    #[error("writing the {what} at {addr:#x} failed: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Guest address.
        addr: u64,
        /// Error from vm-memory.
        source: vm_memory::GuestMemoryError,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
