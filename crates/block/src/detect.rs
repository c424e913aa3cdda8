// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Format probing from the file content, and [`open_image`].
//!
//! The format is never taken from the file name: the first bytes (and, for VPC, the footer
//! in the last sector) decide. Backing files are opened through the same code, so any
//! supported format can back any other; chains deeper than [`MAX_CHAIN_DEPTH`] or that
//! loop are refused.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::raw::RawBackend;
use crate::{BlockBackend, BlockError, CacheMode};

/// Longest backing chain accepted (the image itself not counted).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// An image format recognised by [`probe_bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// No known header: the file is the disk.
    Raw,
    /// QEMU copy-on-write v2/v3 (`QFI\xfb`).
    Qcow2,
    /// Microsoft VHD ("conectix" footer).
    Vpc,
    /// Microsoft VHDX ("vhdxfile").
    Vhdx,
}

impl ImageFormat {
    /// The format name used by [`crate::BlockBackend::format`] and qemu-img.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vpc => "vpc",
            ImageFormat::Vhdx => "vhdx",
        }
    }

    /// Parses a format name (`raw`, `qcow2`, `vpc`/`vhd`, `vhdx`).
    pub fn from_name(name: &str) -> Result<Self, BlockError> {
        match name {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            "vpc" | "vhd" => Ok(ImageFormat::Vpc),
            "vhdx" => Ok(ImageFormat::Vhdx),
            other => Err(BlockError::InvalidArgument(format!(
                "unknown image format {other:?} (expected raw, qcow2, vpc or vhdx)"
            ))),
        }
    }
}

/// How [`open_image`] opens an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Refuse writes (the file is opened `O_RDONLY`).
    pub read_only: bool,
    /// Cache mode (also used for backing files, which are always read-only).
    pub cache: CacheMode,
    /// The expected format; `None` probes the content. When given, the content must match
    /// (a qcow2 file opened as "raw" is allowed, as with qemu-img, but nothing else).
    pub format: Option<&'static str>,
    /// Do not open backing files (reads of unallocated areas then return zeroes). Meant for
    /// inspection (`info`, `check`) only.
    pub no_backing: bool,
}

impl OpenOptions {
    /// Read-write, writeback, probed format.
    pub fn new() -> Self {
        Self::default()
    }

    /// Read-only, writeback, probed format.
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            ..Self::default()
        }
    }
}

/// Determines the format of the bytes in `file` (at `path`, for messages).
pub fn probe_file(file: &File, path: &Path) -> Result<ImageFormat, BlockError> {
    let mut head = [0u8; 512];
    let mut n = 0;
    let mut r = file;
    while n < head.len() {
        match r.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BlockError::io(path, "read header", e)),
        }
    }
    let len = file
        .metadata()
        .map_err(|e| BlockError::io(path, "fstat", e))?
        .len();
    let mut tail = [0u8; 512];
    let mut tail_ok = false;
    if len >= 512 {
        tail_ok = file.read_exact_at(&mut tail, len - 512).is_ok();
    }
    Ok(probe_bytes(
        &head[..n],
        if tail_ok { Some(&tail[..]) } else { None },
    ))
}

/// Determines the format from the first bytes of an image and (optionally) its last 512
/// bytes. Pure function, usable without a file.
pub fn probe_bytes(head: &[u8], tail: Option<&[u8]>) -> ImageFormat {
    if head.starts_with(b"QFI\xfb") {
        return ImageFormat::Qcow2;
    }
    if head.starts_with(b"vhdxfile") {
        return ImageFormat::Vhdx;
    }
    if head.starts_with(b"conectix") {
        return ImageFormat::Vpc;
    }
    if let Some(t) = tail {
        // The footer is the last 512 bytes; some old tools wrote a 511-byte footer.
        if t.starts_with(b"conectix") || t.get(1..9) == Some(b"conectix") {
            return ImageFormat::Vpc;
        }
    }
    ImageFormat::Raw
}

/// Probes the format of the image at `path`.
pub fn probe_path(path: &Path) -> Result<ImageFormat, BlockError> {
    let f = File::open(path).map_err(|e| BlockError::io(path, "open", e))?;
    probe_file(&f, path)
}

/// Opens the image at `path`, probing its format unless `opts.format` names one.
pub fn open_image(
    path: impl AsRef<Path>,
    opts: OpenOptions,
) -> Result<Arc<dyn BlockBackend>, BlockError> {
    open_in_chain(path.as_ref(), &opts, &[])
}

/// Opens the backing file `path` of the image whose chain (that image first, its
/// descendants after... i.e. every image already open above this one) is `chain`.
///
/// Relative backing names are resolved against the directory of the image naming them
/// (`chain[0]`'s caller passes an already resolved path). Backing files are read-only.
pub fn open_backing(
    path: &Path,
    format: Option<&'static str>,
    opts: &OpenOptions,
    chain: &[PathBuf],
) -> Result<Arc<dyn BlockBackend>, BlockError> {
    let child = chain.last().cloned().unwrap_or_default();
    if chain.len() > MAX_CHAIN_DEPTH {
        return Err(BlockError::corrupt(
            child,
            format!("backing chain deeper than {MAX_CHAIN_DEPTH} images"),
        ));
    }
    let canon = path.canonicalize().map_err(|e| {
        BlockError::io(
            path,
            "open backing file (named by the image above it in the chain)",
            e,
        )
    })?;
    if chain.iter().any(|p| p == &canon) {
        return Err(BlockError::corrupt(
            child,
            format!("backing chain loops back to {}", canon.display()),
        ));
    }
    let bopts = OpenOptions {
        read_only: true,
        cache: opts.cache,
        format,
        no_backing: false,
    };
    open_in_chain(path, &bopts, chain)
}

/// Resolves a backing file name found in image `image` (relative names are relative to
/// the image's directory).
pub fn resolve_backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image
            .parent()
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    }
}

fn open_in_chain(
    path: &Path,
    opts: &OpenOptions,
    chain: &[PathBuf],
) -> Result<Arc<dyn BlockBackend>, BlockError> {
    let probe_file_handle = File::open(path).map_err(|e| BlockError::io(path, "open", e))?;
    let probed = probe_file(&probe_file_handle, path)?;
    drop(probe_file_handle);
    let fmt = match opts.format {
        None => probed,
        Some(name) => {
            let wanted = ImageFormat::from_name(name)?;
            if wanted != probed && wanted != ImageFormat::Raw {
                return Err(BlockError::InvalidArgument(format!(
                    "{}: the image is not {} (its content says {})",
                    path.display(),
                    wanted.name(),
                    probed.name()
                )));
            }
            wanted
        }
    };
    let mut my_chain: Vec<PathBuf> = chain.to_vec();
    my_chain.push(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()));
    match fmt {
        ImageFormat::Raw => Ok(Arc::new(RawBackend::open(
            path,
            opts.read_only,
            opts.cache,
        )?)),
        ImageFormat::Qcow2 => open_qcow2(path, opts, &my_chain),
        ImageFormat::Vpc => open_vpc(path, opts, &my_chain),
        ImageFormat::Vhdx => open_vhdx(path, opts, &my_chain),
    }
}

fn open_qcow2(
    path: &Path,
    opts: &OpenOptions,
    chain: &[PathBuf],
) -> Result<Arc<dyn BlockBackend>, BlockError> {
    Ok(Arc::new(crate::qcow2::Qcow2Backend::open_in_chain(
        path, opts, chain,
    )?))
}

fn open_vpc(
    path: &Path,
    opts: &OpenOptions,
    _chain: &[PathBuf],
) -> Result<Arc<dyn BlockBackend>, BlockError> {
    Ok(Arc::new(crate::vpc::VpcBackend::open(
        path,
        opts.read_only,
        opts.cache,
    )?))
}

fn open_vhdx(
    path: &Path,
    opts: &OpenOptions,
    _chain: &[PathBuf],
) -> Result<Arc<dyn BlockBackend>, BlockError> {
    Ok(Arc::new(crate::vhdx::VhdxBackend::open(
        path,
        opts.read_only,
        opts.cache,
    )?))
}
