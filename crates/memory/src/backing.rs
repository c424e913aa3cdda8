// SPDX-License-Identifier: Apache-2.0 OR MIT
//! What host memory backs guest RAM: anonymous memory, a memfd, or hugetlbfs.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Huge page sizes usable with [`Backing::HugetlbMemfd`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HugePageSize {
    /// 2 MiB pages.
    Size2MiB,
    /// 1 GiB pages (needs CPU `pdpe1gb` and pages reserved at boot or via sysfs).
    Size1GiB,
}

impl HugePageSize {
    /// Page size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2MiB => 2 << 20,
            HugePageSize::Size1GiB => 1 << 30,
        }
    }

    fn memfd_flag(self) -> libc::c_uint {
        // MFD_HUGE_* encode log2(page size) at MFD_HUGE_SHIFT.
        self.bytes().trailing_zeros() << libc::MFD_HUGE_SHIFT
    }
}

/// Host memory behind guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Backing {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`). Cannot be shared with another
    /// process; the only backing that KSM can merge.
    #[default]
    Anonymous,
    /// One sealed memfd holding all RAM, mapped `MAP_SHARED`, so its fd and per-region
    /// offsets can be handed to vhost-user backends (see
    /// [`Ram::shared_regions`](crate::Ram::shared_regions)).
    Memfd,
    /// A memfd created with `MFD_HUGETLB`: shared like [`Backing::Memfd`], backed by
    /// pre-reserved huge pages. Fails with [`Error::HugePagesUnavailable`] if the host has too
    /// few free huge pages of that size.
    HugetlbMemfd(HugePageSize),
    /// A file created (and immediately unlinked) in a directory on a hugetlbfs mount; the huge
    /// page size is the mount's. Fails with [`Error::NotHugetlbfs`] for other file systems.
    HugetlbfsFile(PathBuf),
}

impl Backing {
    /// Whether RAM with this backing is `MAP_SHARED` and has a file descriptor.
    pub fn is_shared(&self) -> bool {
        !matches!(self, Backing::Anonymous)
    }

    /// Whether this backing uses hugetlb pages.
    pub fn is_hugetlb(&self) -> bool {
        matches!(self, Backing::HugetlbMemfd(_) | Backing::HugetlbfsFile(_))
    }
}

/// An opened, sized backing file.
#[derive(Debug)]
pub(crate) struct BackingFile {
    pub(crate) file: Arc<File>,
    /// Huge page size when the file is on hugetlbfs.
    pub(crate) huge_page_size: Option<u64>,
}

fn memfd_create(name: &CStr, flags: libc::c_uint) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no memory side effects.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn seal_size(file: &File) -> Result<()> {
    // SAFETY: fcntl on a file descriptor we own; F_ADD_SEALS takes an int argument.
    let ret = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if ret < 0 {
        return Err(Error::BackingFile {
            op: "sealing (F_SEAL_SHRINK | F_SEAL_GROW)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn set_size(file: &File, size: u64) -> Result<()> {
    file.set_len(size).map_err(|source| Error::BackingFile {
        op: "ftruncate",
        source,
    })
}

/// Reads the number of free huge pages of `page_size` bytes from sysfs, if the kernel has
/// that size.
pub(crate) fn free_huge_pages(page_size: u64) -> Option<u64> {
    let path = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
        page_size / 1024
    );
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn check_alignment(regions: &[u64], page_size: u64) -> Result<()> {
    for &size in regions {
        if size % page_size != 0 {
            return Err(Error::Unaligned {
                what: "guest RAM region size on hugetlbfs",
                value: size,
                align: page_size,
            });
        }
    }
    Ok(())
}

fn hugetlbfs_page_size(dir: &Path) -> Result<u64> {
    let path_err = |source| Error::HugetlbfsPath {
        path: dir.to_path_buf(),
        source,
    };
    let cpath = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| path_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `cpath` is NUL-terminated and `st` is a valid, writable statfs.
    if unsafe { libc::statfs(cpath.as_ptr(), &mut st) } != 0 {
        return Err(path_err(io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libc targets.
    if st.f_type as i64 != libc::HUGETLBFS_MAGIC as i64 {
        return Err(Error::NotHugetlbfs(dir.to_path_buf()));
    }
    Ok(st.f_bsize as u64)
}

fn create_unlinked_file(dir: &Path) -> Result<File> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let name = format!(
            "vmkit-ram-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => {
                // The open fd keeps the file alive; unlinking keeps the mount clean even if we
                // crash.
                std::fs::remove_file(&path).map_err(|source| Error::HugetlbfsPath {
                    path: path.clone(),
                    source,
                })?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(Error::HugetlbfsPath {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Creates and sizes the file behind RAM, or `None` for anonymous memory. `region_sizes` are
/// checked against the huge page size for hugetlb backings.
pub(crate) fn create_backing_file(
    backing: &Backing,
    total: u64,
    region_sizes: &[u64],
) -> Result<Option<BackingFile>> {
    let (file, huge_page_size) = match backing {
        Backing::Anonymous => return Ok(None),
        Backing::Memfd => {
            let file = memfd_create(
                c"vmkit-guest-ram",
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
            .map_err(Error::Memfd)?;
            (file, None)
        }
        Backing::HugetlbMemfd(size) => {
            let page_size = size.bytes();
            check_alignment(region_sizes, page_size)?;
            let flags =
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB | size.memfd_flag();
            let file = memfd_create(c"vmkit-guest-ram-hugetlb", flags).map_err(|e| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    Error::HugePageSizeUnsupported { page_size }
                } else {
                    Error::Memfd(e)
                }
            })?;
            (file, Some(page_size))
        }
        Backing::HugetlbfsFile(dir) => {
            let page_size = hugetlbfs_page_size(dir)?;
            check_alignment(region_sizes, page_size)?;
            (create_unlinked_file(dir)?, Some(page_size))
        }
    };
    set_size(&file, total)?;
    if !matches!(backing, Backing::HugetlbfsFile(_)) {
        seal_size(&file)?;
    }
    Ok(Some(BackingFile {
        file: Arc::new(file),
        huge_page_size,
    }))
}

#[cfg(test)]
pub(crate) mod tests_support {
    use std::path::Path;

    /// The block size statfs reports for `dir` (the huge page size on hugetlbfs).
    pub(crate) fn statfs_bsize(dir: &Path) -> u64 {
        super::hugetlbfs_page_size(dir).expect("hugetlbfs mount")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_page_flags_match_libc() {
        assert_eq!(HugePageSize::Size2MiB.memfd_flag(), libc::MFD_HUGE_2MB);
        assert_eq!(HugePageSize::Size1GiB.memfd_flag(), libc::MFD_HUGE_1GB);
    }

    #[test]
    fn memfd_is_sized_and_sealed() {
        let f = create_backing_file(&Backing::Memfd, 1 << 20, &[1 << 20])
            .unwrap()
            .unwrap();
        assert_eq!(f.file.metadata().unwrap().len(), 1 << 20);
        assert_eq!(f.huge_page_size, None);
        // Growing is refused by the seal.
        assert!(f.file.set_len(2 << 20).is_err());
    }

    #[test]
    fn anonymous_has_no_file() {
        assert!(create_backing_file(&Backing::Anonymous, 4096, &[4096])
            .unwrap()
            .is_none());
    }

    #[test]
    fn non_hugetlbfs_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let e = create_backing_file(
            &Backing::HugetlbfsFile(dir.path().to_path_buf()),
            2 << 20,
            &[2 << 20],
        )
        .unwrap_err();
        assert!(matches!(e, Error::NotHugetlbfs(_)), "{e}");
        let e = create_backing_file(
            &Backing::HugetlbfsFile(dir.path().join("missing")),
            2 << 20,
            &[2 << 20],
        )
        .unwrap_err();
        assert!(matches!(e, Error::HugetlbfsPath { .. }), "{e}");
    }

    #[test]
    fn hugetlb_requires_aligned_regions() {
        let e = create_backing_file(
            &Backing::HugetlbMemfd(HugePageSize::Size2MiB),
            3 << 20,
            &[3 << 20],
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Unaligned { align, .. } if align == 2 << 20),
            "{e}"
        );
    }
}
