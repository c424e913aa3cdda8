// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Allocating guest RAM: [`RamConfig`] -> [`Ram`] (a vm-memory [`GuestRam`] plus its layout and
//! backing).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::backing::{create_backing_file, free_huge_pages, Backing, BackingFile};
use crate::error::{Error, Result};
use crate::layout::{LayoutConfig, RamLayout, RamRegion, PAGE_SIZE};

/// Guest memory as consumers see it: vm-memory's mmap backend with an [`AtomicBitmap`] per
/// region, so every write done through vm-memory's accessors (devices, loaders) is recorded
/// as dirty. Clone it freely (regions are reference counted), or wrap it in
/// [`vm_memory::GuestMemoryAtomic`] for hotplug.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// One region of [`GuestRam`].
pub type GuestRamRegion = GuestRegionMmap<AtomicBitmap>;

/// How to build guest RAM. Start with [`RamConfig::new`], adjust with the builder methods,
/// finish with [`RamConfig::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamConfig {
    size: u64,
    layout: LayoutConfig,
    backing: Backing,
    thp: bool,
    ksm: bool,
    noreserve: bool,
    prefault: bool,
}

impl RamConfig {
    /// `size` bytes of anonymous RAM with the default layout and no advice.
    pub fn new(size: u64) -> Self {
        RamConfig {
            size,
            layout: LayoutConfig::default(),
            backing: Backing::Anonymous,
            thp: false,
            ksm: false,
            noreserve: false,
            prefault: false,
        }
    }

    /// Uses a custom layout (MMIO gap, address width).
    pub fn layout(mut self, layout: LayoutConfig) -> Self {
        self.layout = layout;
        self
    }

    /// Chooses the host memory behind RAM.
    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    /// Advises transparent huge pages (`MADV_HUGEPAGE`) on every region. Needed when the host's
    /// THP mode is `madvise`; on memfd RAM it takes effect when
    /// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` allows it. Not valid with hugetlb
    /// backings.
    pub fn transparent_huge_pages(mut self, on: bool) -> Self {
        self.thp = on;
        self
    }

    /// Marks RAM mergeable by KSM (`MADV_MERGEABLE`). Only valid with [`Backing::Anonymous`]:
    /// KSM does not merge shared mappings. Merging happens only while the host runs `ksmd`
    /// (`/sys/kernel/mm/ksm/run`).
    pub fn mergeable(mut self, on: bool) -> Self {
        self.ksm = on;
        self
    }

    /// Maps with `MAP_NORESERVE` (no swap/commit accounting up front). Not valid with hugetlb
    /// backings, where it would turn a huge page shortage into `SIGBUS` while the guest runs.
    pub fn noreserve(mut self, on: bool) -> Self {
        self.noreserve = on;
        self
    }

    /// Faults in all of RAM at build time (`MADV_POPULATE_WRITE`, Linux 5.14+), after the
    /// THP/KSM advice, so the guest never waits on first-touch faults.
    pub fn prefault(mut self, on: bool) -> Self {
        self.prefault = on;
        self
    }

    /// The requested RAM size.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn check_options(&self) -> Result<()> {
        if self.ksm && self.backing.is_shared() {
            return Err(Error::InvalidConfig(
                "KSM (MADV_MERGEABLE) only merges private anonymous memory; memfd and hugetlb RAM is MAP_SHARED",
            ));
        }
        if self.thp && self.backing.is_hugetlb() {
            return Err(Error::InvalidConfig(
                "transparent huge page advice does not apply to hugetlb RAM, which already uses huge pages",
            ));
        }
        if self.noreserve && self.backing.is_hugetlb() {
            return Err(Error::InvalidConfig(
                "MAP_NORESERVE on hugetlb RAM would turn a huge page shortage into SIGBUS at run time",
            ));
        }
        Ok(())
    }

    /// Lays out, allocates and advises RAM.
    ///
    /// Errors: layout errors ([`Error::ZeroSize`], [`Error::Unaligned`], [`Error::TooLarge`],
    /// ...), [`Error::InvalidConfig`] for conflicting options, backing errors
    /// ([`Error::Memfd`], [`Error::NotHugetlbfs`], [`Error::HugePagesUnavailable`], ...),
    /// [`Error::Mmap`], and [`Error::Madvise`] when the kernel rejects the requested advice.
    pub fn build(&self) -> Result<Ram> {
        let layout = self.layout.layout(self.size)?;
        self.check_options()?;
        let sizes: Vec<u64> = layout.regions().iter().map(|r| r.size).collect();
        let backing_file = create_backing_file(&self.backing, layout.ram_size(), &sizes)?;

        let mut regions = Vec::with_capacity(layout.regions().len());
        for region in layout.regions() {
            let mapping = self.map_region(region, backing_file.as_ref())?;
            if self.thp {
                madvise(&mapping, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
            }
            if self.ksm {
                madvise(&mapping, libc::MADV_MERGEABLE, "MADV_MERGEABLE")?;
            }
            if self.prefault {
                madvise(&mapping, libc::MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")?;
            }
            let guest_region =
                GuestRegionMmap::new(mapping, region.start).ok_or(Error::TooLarge {
                    size: self.size,
                    end: "beyond 2^64".to_string(),
                    limit: self.layout.addr_limit(),
                })?;
            regions.push(guest_region);
        }
        let memory = GuestRam::from_regions(regions)?;
        Ok(Ram {
            memory,
            layout,
            backing: self.backing.clone(),
            page_size: backing_file
                .as_ref()
                .and_then(|f| f.huge_page_size)
                .unwrap_or(PAGE_SIZE),
            file: backing_file.map(|f| f.file),
        })
    }

    fn map_region(
        &self,
        region: &RamRegion,
        file: Option<&BackingFile>,
    ) -> Result<MmapRegion<AtomicBitmap>> {
        let size = usize::try_from(region.size).map_err(|_| Error::TooLarge {
            size: self.size,
            end: format!("{:#x}", region.end()),
            limit: usize::MAX as u64,
        })?;
        let mut flags = if file.is_some() {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
        };
        if self.noreserve {
            flags |= libc::MAP_NORESERVE;
        }
        let mut builder = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(file.is_some_and(|f| f.huge_page_size.is_some()));
        if let Some(f) = file {
            builder =
                builder.with_file_offset(FileOffset::from_arc(f.file.clone(), region.file_offset));
        }
        builder.build().map_err(|source| match (&source, file) {
            (
                MmapRegionError::Mmap(e),
                Some(BackingFile {
                    huge_page_size: Some(page_size),
                    ..
                }),
            ) if e.raw_os_error() == Some(libc::ENOMEM) => Error::HugePagesUnavailable {
                size: region.size,
                page_size: *page_size,
                needed: region.size / page_size,
                free: free_huge_pages(*page_size).unwrap_or(0),
            },
            _ => Error::Mmap {
                size: region.size,
                source,
            },
        })
    }
}

fn madvise(
    mapping: &MmapRegion<AtomicBitmap>,
    advice: libc::c_int,
    name: &'static str,
) -> Result<()> {
    // SAFETY: the range is exactly one mapping owned by `mapping`, alive for this call. The
    // advice values used here (HUGEPAGE, MERGEABLE, POPULATE_WRITE) never change the contents
    // the process observes.
    let ret = unsafe { libc::madvise(mapping.as_ptr().cast(), mapping.size(), advice) };
    if ret != 0 {
        return Err(Error::Madvise {
            advice: name,
            host_addr: mapping.as_ptr() as u64,
            size: mapping.size() as u64,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A region of file-backed RAM as another process (a vhost-user backend) needs to map it.
#[derive(Clone, Debug)]
pub struct SharedRegion {
    /// Guest-physical start.
    pub guest_addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the region in this process (vhost-user's "userspace address").
    pub host_addr: u64,
    /// The RAM backing file (the same file for every region).
    pub file: Arc<File>,
    /// Offset of the region in `file` (vhost-user's "mmap offset").
    pub file_offset: u64,
}

impl SharedRegion {
    /// The raw file descriptor to pass over `SCM_RIGHTS`; valid while `file` is alive.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Allocated guest RAM: the vm-memory object, its layout and its backing.
#[derive(Debug)]
pub struct Ram {
    memory: GuestRam,
    layout: RamLayout,
    backing: Backing,
    file: Option<Arc<File>>,
    page_size: u64,
}

impl Ram {
    /// Lays out and allocates `size` bytes of anonymous RAM with the default layout.
    pub fn anonymous(size: u64) -> Result<Ram> {
        RamConfig::new(size).build()
    }

    /// The guest memory (cheap to clone).
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// The layout RAM was built with.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// The backing RAM was built with.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Size of the host pages behind RAM: the huge page size for hugetlb, else 4 KiB.
    pub fn host_page_size(&self) -> u64 {
        self.page_size
    }

    /// The RAM backing file, for memfd and hugetlb backings.
    pub fn backing_file(&self) -> Option<&Arc<File>> {
        self.file.as_ref()
    }

    /// Per-region fd, offset and addresses for handing RAM to vhost-user backends.
    /// [`Error::NotShared`] for anonymous RAM.
    pub fn shared_regions(&self) -> Result<Vec<SharedRegion>> {
        if self.file.is_none() {
            return Err(Error::NotShared);
        }
        self.memory
            .iter()
            .map(|region| {
                let fo = region.file_offset().ok_or(Error::NotShared)?;
                Ok(SharedRegion {
                    guest_addr: region.start_addr(),
                    size: region.len(),
                    host_addr: region.as_ptr() as u64,
                    file: fo.arc().clone(),
                    file_offset: fo.start(),
                })
            })
            .collect()
    }

    /// Gives up the wrapper, keeping the guest memory.
    pub fn into_memory(self) -> GuestRam {
        self.memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::HugePageSize;
    use crate::dirty::{peek_vmm_dirty_pages, take_vmm_dirty_pages};
    use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    /// The VmFlags of the /proc/self/smaps entry (VMA) containing `addr`.
    fn vm_flags(addr: u64) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_entry = false;
        for line in smaps.lines() {
            let range = line
                .split_once(' ')
                .and_then(|(range, _)| range.split_once('-'))
                .and_then(|(s, e)| {
                    Some((
                        u64::from_str_radix(s, 16).ok()?,
                        u64::from_str_radix(e, 16).ok()?,
                    ))
                });
            if let Some((start, end)) = range {
                in_entry = start <= addr && addr < end;
                continue;
            }
            if in_entry {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(str::to_string).collect();
                }
            }
        }
        panic!("no smaps entry contains {addr:#x}");
    }

    /// Number of resident pages in `[addr, addr + len)` according to mincore(2).
    fn resident_pages(addr: *mut u8, len: usize) -> usize {
        let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE as usize)];
        // SAFETY: `addr..addr+len` is a live mapping owned by the caller's `Ram`, and `vec`
        // has one byte per page of it.
        let ret = unsafe { libc::mincore(addr.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(ret, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    fn small_gap() -> LayoutConfig {
        LayoutConfig::new().mmio_gap(MIB, 2 * MIB)
    }

    #[test]
    fn anonymous_ram_below_gap() {
        let ram = Ram::anonymous(16 * MIB).unwrap();
        let mem = ram.memory();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(mem.write_obj(0u8, GuestAddress(16 * MIB)).is_err());
        assert_eq!(ram.host_page_size(), PAGE_SIZE);
        assert!(ram.backing_file().is_none());
        assert!(matches!(ram.shared_regions(), Err(Error::NotShared)));
        let flags = vm_flags(mem.iter().next().unwrap().as_ptr() as u64);
        assert!(!flags.contains(&"sh".to_string()), "{flags:?}");
    }

    #[test]
    fn anonymous_ram_across_default_gap() {
        // 5 GiB of address space; MAP_NORESERVE so only touched pages are allocated.
        let ram = RamConfig::new(5 << 30).noreserve(true).build().unwrap();
        let mem = ram.memory();
        assert_eq!(mem.num_regions(), 2);
        let r: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START)
            ]
        );
        mem.write_obj(7u64, GuestAddress(MMIO_GAP_END)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(MMIO_GAP_END)).unwrap(), 7);
        assert!(mem.write_obj(0u8, GuestAddress(MMIO_GAP_START)).is_err());
        let flags = vm_flags(mem.iter().next().unwrap().as_ptr() as u64);
        assert!(flags.contains(&"nr".to_string()), "{flags:?}");
    }

    #[test]
    fn memfd_ram_is_shared_through_its_fd() {
        let ram = RamConfig::new(3 * MIB)
            .layout(small_gap())
            .backing(Backing::Memfd)
            .build()
            .unwrap();
        let mem = ram.memory();
        let shared = ram.shared_regions().unwrap();
        assert_eq!(shared.len(), 2);
        assert_eq!(shared[0].guest_addr, GuestAddress(0));
        assert_eq!((shared[0].size, shared[0].file_offset), (MIB, 0));
        assert_eq!(shared[1].guest_addr, GuestAddress(2 * MIB));
        assert_eq!((shared[1].size, shared[1].file_offset), (2 * MIB, MIB));
        assert_eq!(shared[0].fd(), shared[1].fd());
        assert_eq!(shared[0].file.metadata().unwrap().len(), 3 * MIB);

        // Writes through guest memory are visible through the fd at the region's offset ...
        mem.write_slice(b"low", GuestAddress(0x10)).unwrap();
        mem.write_slice(b"high", GuestAddress(2 * MIB + 0x20))
            .unwrap();
        let mut buf = [0u8; 4];
        shared[0].file.read_exact_at(&mut buf[..3], 0x10).unwrap();
        assert_eq!(&buf[..3], b"low");
        shared[1].file.read_exact_at(&mut buf, MIB + 0x20).unwrap();
        assert_eq!(&buf, b"high");
        // ... and the other way round (MAP_SHARED).
        shared[1].file.write_all_at(b"back", MIB + 0x40).unwrap();
        let mut back = [0u8; 4];
        mem.read_slice(&mut back, GuestAddress(2 * MIB + 0x40))
            .unwrap();
        assert_eq!(&back, b"back");
        assert_eq!(
            shared[1].host_addr,
            mem.iter().nth(1).unwrap().as_ptr() as u64
        );
        let flags = vm_flags(shared[0].host_addr);
        assert!(flags.contains(&"sh".to_string()), "{flags:?}");
    }

    #[test]
    fn hugetlb_memfd_succeeds_or_fails_clearly() {
        for size in [HugePageSize::Size2MiB, HugePageSize::Size1GiB] {
            let page = size.bytes();
            let res = RamConfig::new(page)
                .backing(Backing::HugetlbMemfd(size))
                .build();
            match res {
                Ok(ram) => {
                    eprintln!("{page:#x}-byte huge pages available: hugetlb memfd RAM built");
                    assert_eq!(ram.host_page_size(), page);
                    ram.memory().write_obj(1u8, GuestAddress(0)).unwrap();
                    assert_eq!(ram.shared_regions().unwrap().len(), 1);
                }
                Err(
                    e @ Error::HugePagesUnavailable {
                        needed, page_size, ..
                    },
                ) => {
                    eprintln!("clean failure, as expected on this host: {e}");
                    assert_eq!((needed, page_size), (1, page));
                    // The error is only acceptable when the host has no free page of that size.
                    assert_eq!(free_huge_pages(page).unwrap_or(0), 0);
                }
                Err(e @ Error::HugePageSizeUnsupported { page_size }) => {
                    eprintln!("clean failure, as expected on this host: {e}");
                    assert_eq!(page_size, page);
                    assert!(free_huge_pages(page).is_none());
                }
                Err(e) => panic!("unexpected error for {page:#x} huge pages: {e}"),
            }
        }
    }

    /// A directory on a hugetlbfs mount from /proc/mounts, if the host has one.
    fn hugetlbfs_mount() -> Option<std::path::PathBuf> {
        let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
        mounts.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "hugetlbfs").then(|| dir.into())
        })
    }

    #[test]
    fn hugetlbfs_file_succeeds_or_fails_clearly() {
        let Some(dir) = hugetlbfs_mount() else {
            eprintln!(
                "no hugetlbfs mount on this host: only the non-hugetlbfs rejection is tested"
            );
            let tmp = tempfile::tempdir().unwrap();
            let e = RamConfig::new(2 * MIB)
                .backing(Backing::HugetlbfsFile(tmp.path().into()))
                .build()
                .unwrap_err();
            assert!(matches!(e, Error::NotHugetlbfs(_)), "{e}");
            return;
        };
        // Two huge pages of whatever size the mount uses, split by a gap.
        let page = crate::backing::tests_support::statfs_bsize(&dir);
        let res = RamConfig::new(2 * page)
            .layout(LayoutConfig::new().mmio_gap(page, 2 * page))
            .backing(Backing::HugetlbfsFile(dir.clone()))
            .build();
        match res {
            Ok(ram) => {
                eprintln!("hugetlbfs RAM built in {}", dir.display());
                assert_eq!(ram.host_page_size(), page);
                let shared = ram.shared_regions().unwrap();
                assert_eq!(shared[1].file_offset, page);
                ram.memory().write_obj(5u8, GuestAddress(2 * page)).unwrap();
                let mut b = [0u8];
                shared[1].file.read_exact_at(&mut b, page).unwrap();
                assert_eq!(b[0], 5);
            }
            Err(e @ Error::HugePagesUnavailable { page_size, .. }) => {
                eprintln!("clean failure, as expected on this host: {e}");
                assert_eq!(page_size, page);
            }
            Err(e) => panic!("unexpected error for hugetlbfs at {}: {e}", dir.display()),
        }
        // The file was unlinked right after creation: nothing is left behind.
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("vmkit-ram-{}-", std::process::id()))
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn conflicting_options_are_rejected() {
        let cases = [
            RamConfig::new(2 * MIB)
                .backing(Backing::Memfd)
                .mergeable(true),
            RamConfig::new(2 * MIB)
                .backing(Backing::HugetlbMemfd(HugePageSize::Size2MiB))
                .transparent_huge_pages(true),
            RamConfig::new(2 * MIB)
                .backing(Backing::HugetlbMemfd(HugePageSize::Size2MiB))
                .noreserve(true),
        ];
        for cfg in cases {
            assert!(
                matches!(cfg.build(), Err(Error::InvalidConfig(_))),
                "{cfg:?}"
            );
        }
    }

    #[test]
    fn size_errors() {
        assert!(matches!(Ram::anonymous(0), Err(Error::ZeroSize)));
        assert!(matches!(
            Ram::anonymous(MIB + 512),
            Err(Error::Unaligned { .. })
        ));
        assert!(matches!(
            Ram::anonymous(1 << 41),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn thp_advice_is_applied() {
        for backing in [Backing::Anonymous, Backing::Memfd] {
            let ram = RamConfig::new(4 * MIB)
                .backing(backing.clone())
                .transparent_huge_pages(true)
                .build()
                .unwrap();
            let addr = ram.memory().iter().next().unwrap().as_ptr() as u64;
            let flags = vm_flags(addr);
            assert!(flags.contains(&"hg".to_string()), "{backing:?}: {flags:?}");
        }
    }

    #[test]
    fn ksm_advice_is_applied() {
        let ram = RamConfig::new(4 * MIB).mergeable(true).build().unwrap();
        let addr = ram.memory().iter().next().unwrap().as_ptr() as u64;
        let flags = vm_flags(addr);
        assert!(flags.contains(&"mg".to_string()), "{flags:?}");
        // Without the advice the flag is absent, so the check above means something.
        let plain = Ram::anonymous(4 * MIB).unwrap();
        let flags = vm_flags(plain.memory().iter().next().unwrap().as_ptr() as u64);
        assert!(!flags.contains(&"mg".to_string()), "{flags:?}");
        assert!(!flags.contains(&"hg".to_string()), "{flags:?}");
    }

    #[test]
    fn prefault_populates_ram() {
        let len = 4 * MIB as usize;
        let lazy = Ram::anonymous(4 * MIB).unwrap();
        let lazy_ptr = lazy.memory().iter().next().unwrap().as_ptr();
        assert_eq!(resident_pages(lazy_ptr, len), 0);
        let ram = RamConfig::new(4 * MIB).prefault(true).build().unwrap();
        let ptr = ram.memory().iter().next().unwrap().as_ptr();
        assert_eq!(resident_pages(ptr, len), len / PAGE_SIZE as usize);
    }

    #[test]
    fn atomic_bitmap_tracks_vmm_writes() {
        let ram = RamConfig::new(3 * MIB)
            .layout(small_gap())
            .backing(Backing::Memfd)
            .build()
            .unwrap();
        let mem = ram.memory();
        assert!(take_vmm_dirty_pages(mem).is_empty());
        mem.write_obj(1u32, GuestAddress(0x5004)).unwrap();
        // A write straddling two pages dirties both.
        mem.write_slice(&[0xaa; 8], GuestAddress(0x7ffc)).unwrap();
        // Second region, at its guest address.
        mem.write_obj(2u8, GuestAddress(2 * MIB + 0x3000)).unwrap();
        // Reads do not dirty.
        let _: u64 = mem.read_obj(GuestAddress(0x9000)).unwrap();

        let expected: Vec<_> = [0x5000, 0x7000, 0x8000, 2 * MIB + 0x3000]
            .into_iter()
            .map(GuestAddress)
            .collect();
        let peek = peek_vmm_dirty_pages(mem);
        assert_eq!(peek.pages().collect::<Vec<_>>(), expected);
        // Peeking does not clear; taking does.
        let taken = take_vmm_dirty_pages(mem);
        assert_eq!(taken, peek);
        assert_eq!(taken.count(), 4);
        assert!(take_vmm_dirty_pages(mem).is_empty());
    }
}
