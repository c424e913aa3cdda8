// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Creating qcow2 images.

use std::path::Path;
use std::sync::Arc;

use super::header::{serialize, NewHeader};
use super::meta::{rc_set, Meta};
use crate::detect::{open_image, resolve_backing_path, OpenOptions};
use crate::file_io::ImageFile;
use crate::BlockError;

/// Options of [`create`] (the names follow `qemu-img create -o`).
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes; `None` takes the backing file's size.
    pub size: Option<u64>,
    /// Cluster size, a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`, default).
    pub version: u32,
    /// Backing file name as stored in the image (relative names are relative to the
    /// image's directory).
    pub backing_file: Option<String>,
    /// Backing file format; probed from its content when `None`.
    pub backing_format: Option<String>,
    /// 128-bit L2 entries with 32 subclusters per cluster (v3, clusters >= 16 KiB).
    pub extended_l2: bool,
    /// Refcount width in bits: 1, 2, 4, 8, 16 (default), 32 or 64 (v2: 16 only).
    pub refcount_bits: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            version: 3,
            backing_file: None,
            backing_format: None,
            extended_l2: false,
            refcount_bits: 16,
        }
    }
}

impl CreateOptions {
    /// Default options for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size: Some(size),
            ..Self::default()
        }
    }
}

/// Creates (or overwrites) a qcow2 image at `path`.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), BlockError> {
    let inval = |s: String| BlockError::InvalidArgument(s);
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(inval(format!(
            "cluster size {cs} is not a power of two between 512 and 2 MiB"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if opts.version != 2 && opts.version != 3 {
        return Err(inval(format!("qcow2 version {} (2 or 3)", opts.version)));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(inval(format!("refcount_bits {rb} (1, 2, 4, ..., 64)")));
    }
    if opts.version == 2 && rb != 16 {
        return Err(inval("qcow2 version 2 requires 16-bit refcounts".into()));
    }
    if opts.extended_l2 && (opts.version < 3 || cs < 16384) {
        return Err(inval(
            "extended_l2 needs qcow2 version 3 and clusters of at least 16 KiB".into(),
        ));
    }
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return Err(inval("backing format given without a backing file".into()));
    }
    // Backing file: must open; gives the default size and the format.
    let mut backing_format = opts.backing_format.clone();
    let mut size = opts.size;
    if let Some(b) = &opts.backing_file {
        let bpath = resolve_backing_path(path, b);
        let fmt = match &backing_format {
            Some(f) => Some(crate::ImageFormat::from_name(f)?.name()),
            None => None,
        };
        let bopts = OpenOptions {
            read_only: true,
            format: fmt,
            ..OpenOptions::default()
        };
        let backing = open_image(&bpath, bopts).map_err(|e| BlockError::Backing {
            image: path.to_path_buf(),
            backing: bpath.clone(),
            source: Box::new(e),
        })?;
        if size.is_none() {
            size = Some(backing.virtual_size());
        }
        if backing_format.is_none() {
            backing_format = Some(backing.format().to_string());
        }
    }
    let size = size.ok_or_else(|| inval("no size given and no backing file".into()))?;
    if size > super::header::MAX_VIRTUAL_SIZE {
        return Err(inval(format!("size {size} is too large")));
    }
    let refcount_order = rb.trailing_zeros();
    let l2_entries = if opts.extended_l2 { cs / 16 } else { cs / 8 };
    let l1_size = size.div_ceil(l2_entries * cs);
    if l1_size * 8 > super::header::MAX_L1_BYTES {
        return Err(inval(format!(
            "size {size} needs an L1 table larger than 32 MiB with {cs}-byte clusters"
        )));
    }

    // Cluster 0: header, 1: refcount table, 2: first refcount block.
    let file = Arc::new(ImageFile::create(path)?);
    let mut hdr = NewHeader {
        version: opts.version,
        cluster_bits,
        size,
        refcount_order,
        extended_l2: opts.extended_l2,
        backing_file: opts.backing_file.as_deref(),
        backing_format: backing_format.as_deref(),
        refcount_table: (cs, 1),
        l1: (0, 0),
    };
    file.write_at(0, &serialize(&hdr)?)?;
    let mut rt = vec![0u8; cs as usize];
    rt[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    file.write_at(cs, &rt)?;
    let mut block = vec![0u8; cs as usize];
    let epb = (cs * 8) >> refcount_order;
    for c in 0..3u64.min(epb) {
        rc_set(&mut block, refcount_order, c, 1);
    }
    file.write_at(2 * cs, &block)?;
    let mut meta = Meta::new(
        file.clone(),
        path,
        cluster_bits,
        opts.extended_l2,
        refcount_order,
        Vec::new(),
        0,
        vec![2 * cs],
        cs,
        1,
        3 * cs,
    );
    meta.reftable.resize((cs / 8) as usize, 0);
    if epb < 3 {
        // 1-bit refcounts with tiny clusters cannot happen (epb >= 4096), but stay exact.
        for c in epb..3 {
            meta.set_refcount(c, 1)?;
        }
    }
    if l1_size > 0 {
        let clusters = (l1_size * 8).div_ceil(cs);
        let off = meta.alloc_clusters(clusters)?;
        meta.l1 = vec![0; l1_size as usize];
        meta.l1_offset = off;
    }
    hdr.refcount_table = (meta.reftable_offset, meta.reftable_clusters as u32);
    hdr.l1 = (meta.l1_offset, l1_size as u32);
    file.write_at(0, &serialize(&hdr)?)?;
    file.sync()
}
