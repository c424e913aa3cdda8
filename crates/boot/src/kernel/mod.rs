// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Kernel loading: format detection, fit checks and copying through linux-loader.
//!
//! The format comes from the content, never the file name: an ELF magic at offset 0 means an
//! ELF64 kernel (PVH if it carries a `XEN_ELFNOTE_PHYS32_ENTRY` note, else the Linux 64-bit
//! protocol at `e_entry`); a "HdrS" setup header at 0x202 means a bzImage (loaded at 1 MiB,
//! Linux 64-bit protocol at load address + 0x200).

pub mod bzimage;
pub mod elf;
pub mod initramfs;

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::e820::{build_memory_map, containing_range, memory_ranges, ram_of, MmioGap};
use crate::error::{Error, Result};
use crate::guest::zero_range;
use crate::layout::{BZIMAGE_ENTRY64_OFFSET, BZIMAGE_LOAD_ADDR, HIMEM_START};

pub use bzimage::BzImageInfo;
pub use elf::{ElfInfo, ElfSegment};
pub use initramfs::{load_initramfs, load_initramfs_from, place_initramfs, Initramfs};

/// Kernel image format, detected from content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF64 (`vmlinux`, or a freestanding guest like `vmkit-guest`).
    Elf,
    /// Linux bzImage.
    BzImage,
}

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off, `rbx` = `hvm_start_info` address.
    Pvh,
    /// Linux 64-bit boot protocol: long mode with the identity map, `cs` = `__BOOT_CS`
    /// (0x10), data segments = `__BOOT_DS` (0x18), `rsi` = `boot_params` address.
    Linux64,
}

impl BootProtocol {
    /// Short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            BootProtocol::Pvh => "PVH",
            BootProtocol::Linux64 => "Linux 64-bit",
        }
    }
}

/// Options for [`load_kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOptions {
    /// The 32-bit MMIO gap (no RAM there).
    pub mmio_gap: MmioGap,
    /// Use the Linux 64-bit protocol even if the ELF has a PVH note.
    pub force_linux64: bool,
}

impl KernelOptions {
    /// Default options for a gap: PVH when the kernel supports it.
    pub fn new(mmio_gap: MmioGap) -> Self {
        KernelOptions {
            mmio_gap,
            force_linux64: false,
        }
    }
}

/// Header facts about a kernel image, read without touching guest memory.
#[derive(Clone, Debug)]
pub struct KernelInfo {
    /// Detected format.
    pub format: KernelFormat,
    /// 64-bit entry point (Linux 64-bit protocol).
    pub entry64: u64,
    /// PVH entry point, if the image has one.
    pub pvh_entry: Option<u64>,
    /// Guest-physical ranges `(start, end_exclusive)` the kernel needs as RAM.
    pub needed: Vec<(u64, u64)>,
    /// ELF details.
    pub elf: Option<ElfInfo>,
    /// bzImage details.
    pub bzimage: Option<BzImageInfo>,
}

/// A kernel loaded into guest memory.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// Name used in messages (the path or the caller's label).
    pub name: String,
    /// Detected format.
    pub format: KernelFormat,
    /// Chosen boot protocol.
    pub protocol: BootProtocol,
    /// Entry point for the chosen protocol.
    pub entry: u64,
    /// PVH entry point, if the image has one (even when not chosen).
    pub pvh_entry: Option<u64>,
    /// 64-bit entry point.
    pub entry64: u64,
    /// Lowest guest address the kernel occupies.
    pub load_addr: u64,
    /// End (exclusive) of the memory the kernel occupies or needs early (for a bzImage this
    /// includes `init_size`); the initramfs goes above.
    pub kernel_end: u64,
    /// The bzImage setup header (with `code32_start` set to the load address).
    pub setup_header: Option<setup_header>,
    /// Highest address the initramfs may occupy (inclusive).
    pub initrd_addr_max: u64,
    /// Longest command line the kernel accepts (without NUL), if it states one.
    pub cmdline_max: Option<usize>,
}

/// Image reader accepted by the loader.
pub trait KernelImage: Read + ReadVolatile + Seek {}
impl<T: Read + ReadVolatile + Seek> KernelImage for T {}

/// Reads the headers of a kernel image and returns what it needs, without guest memory.
///
/// This is a pure function of the image bytes (the fuzz target feeds it arbitrary data).
pub fn inspect_kernel<R: Read + Seek>(image: &mut R, name: &str) -> Result<KernelInfo> {
    let read_err = |source| Error::Read {
        name: name.to_string(),
        source,
    };
    let file_len = image.seek(SeekFrom::End(0)).map_err(read_err)?;
    image.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut prefix = Vec::with_capacity(bzimage::HEADER_END);
    image
        .by_ref()
        .take(bzimage::HEADER_END as u64)
        .read_to_end(&mut prefix)
        .map_err(read_err)?;

    if prefix.starts_with(&elf::ELF_MAGIC) {
        let info = elf::parse_elf(image, file_len).map_err(|reason| Error::BadElf {
            name: name.to_string(),
            reason,
        })?;
        let needed = info
            .segments
            .iter()
            .map(|s| (s.paddr, s.paddr + s.memsz))
            .collect();
        return Ok(KernelInfo {
            format: KernelFormat::Elf,
            entry64: info.entry,
            pvh_entry: info.pvh_entry,
            needed,
            elf: Some(info),
            bzimage: None,
        });
    }
    if prefix.get(bzimage::HDRS_OFFSET..bzimage::HDRS_OFFSET + 4) == Some(&bzimage::HDRS_MAGIC[..])
    {
        let info =
            bzimage::parse_bzimage(&prefix, file_len).map_err(|reason| Error::BadBzImage {
                name: name.to_string(),
                reason,
            })?;
        return Ok(KernelInfo {
            format: KernelFormat::BzImage,
            entry64: BZIMAGE_LOAD_ADDR + BZIMAGE_ENTRY64_OFFSET,
            pvh_entry: None,
            needed: vec![(BZIMAGE_LOAD_ADDR, info.needed_end)],
            elf: None,
            bzimage: Some(info),
        });
    }
    Err(Error::NotAKernel {
        name: name.to_string(),
    })
}

/// [`inspect_kernel`] over a byte slice.
pub fn inspect_kernel_bytes(image: &[u8], name: &str) -> Result<KernelInfo> {
    inspect_kernel(&mut Cursor::new(image), name)
}

/// Checks that every range in `needed` is RAM at or above 1 MiB in the memory map built
/// from `ram` regions and `gap`.
pub fn check_kernel_fits(
    needed: &[(u64, u64)],
    ram: &[(u64, u64)],
    gap: MmioGap,
    name: &str,
) -> Result<()> {
    let map = build_memory_map(ram, gap, &[])?;
    let usable = ram_of(&map);
    for &(start, end) in needed {
        let too_big = |reason: String| Error::KernelTooBig {
            name: name.to_string(),
            start,
            end,
            reason,
        };
        if start < HIMEM_START {
            return Err(too_big(
                "it starts below 1 MiB, where the boot data lives".to_string(),
            ));
        }
        if containing_range(&usable, start, end).is_none() {
            let reason = match usable.iter().find(|&&(s, e)| s <= start && start < e) {
                Some(&(_, e)) => format!("but the RAM there ends at {e:#x}"),
                None if gap.start <= start && start < gap.end => {
                    "but that is inside the MMIO gap".to_string()
                }
                None => "but there is no RAM at that address".to_string(),
            };
            return Err(too_big(reason));
        }
    }
    Ok(())
}

/// Opens `path` and loads the kernel with [`load_kernel_from`].
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    opts: &KernelOptions,
) -> Result<LoadedKernel> {
    let mut file = File::open(path).map_err(|source| Error::KernelFile {
        path: path.to_path_buf(),
        source,
    })?;
    if file
        .metadata()
        .map_err(|source| Error::KernelFile {
            path: path.to_path_buf(),
            source,
        })?
        .is_dir()
    {
        return Err(Error::KernelFile {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "is a directory"),
        });
    }
    load_kernel_from(mem, &mut file, &path.display().to_string(), opts)
}

/// Detects the format of `image`, checks that it fits in RAM and copies it into `mem`.
///
/// `name` labels the image in errors. Nothing is written to guest memory unless the kernel
/// fits. For an ELF kernel the part of each segment beyond its file size is zeroed.
pub fn load_kernel_from<M: GuestMemoryBackend, R: KernelImage>(
    mem: &M,
    image: &mut R,
    name: &str,
    opts: &KernelOptions,
) -> Result<LoadedKernel> {
    let info = inspect_kernel(image, name)?;
    check_kernel_fits(&info.needed, &memory_ranges(mem), opts.mmio_gap, name)?;
    let loader_err = |source| Error::Loader {
        name: name.to_string(),
        source,
    };
    let gap_limit = opts.mmio_gap.low_ram_limit();

    match (info.format, &info.elf, &info.bzimage) {
        (KernelFormat::Elf, Some(elf), _) => {
            Elf::load(mem, None, image, None).map_err(loader_err)?;
            for seg in &elf.segments {
                if seg.memsz > seg.filesz {
                    zero_range(
                        mem,
                        "kernel bss",
                        seg.paddr + seg.filesz,
                        seg.memsz - seg.filesz,
                    )?;
                }
            }
            let load_addr = elf.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
            let kernel_end = elf
                .segments
                .iter()
                .map(|s| s.paddr + s.memsz)
                .max()
                .unwrap_or(0);
            let (protocol, entry) = match elf.pvh_entry {
                Some(pvh) if !opts.force_linux64 => (BootProtocol::Pvh, pvh),
                _ => (BootProtocol::Linux64, elf.entry),
            };
            Ok(LoadedKernel {
                name: name.to_string(),
                format: KernelFormat::Elf,
                protocol,
                entry,
                pvh_entry: elf.pvh_entry,
                entry64: elf.entry,
                load_addr,
                kernel_end,
                setup_header: None,
                initrd_addr_max: gap_limit.saturating_sub(1),
                cmdline_max: None,
            })
        }
        (KernelFormat::BzImage, _, Some(bz)) => {
            let result = BzImage::load(mem, Some(GuestAddress(BZIMAGE_LOAD_ADDR)), image, None)
                .map_err(loader_err)?;
            let header = result.setup_header.unwrap_or(bz.header);
            Ok(LoadedKernel {
                name: name.to_string(),
                format: KernelFormat::BzImage,
                protocol: BootProtocol::Linux64,
                entry: info.entry64,
                pvh_entry: None,
                entry64: info.entry64,
                load_addr: BZIMAGE_LOAD_ADDR,
                kernel_end: bz.needed_end,
                setup_header: Some(header),
                initrd_addr_max: u64::from(bz.initrd_addr_max).min(gap_limit.saturating_sub(1)),
                cmdline_max: usize::try_from(bz.cmdline_size).ok().filter(|&n| n > 0),
            })
        }
        _ => Err(Error::NotAKernel {
            name: name.to_string(),
        }),
    }
}
