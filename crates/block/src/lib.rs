// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Disk images and block I/O for vmkit.
//!
//! Every image format implements one trait, [`BlockBackend`]: vectored reads and writes
//! straight into guest memory ([`vm_memory::VolatileSlice`]), flush, discard, write-zeroes,
//! the virtual size and allocation status. [`open_image`] probes the format from the file
//! content (never the name) and opens backing chains through the same function.
//!
//! - [`raw`]: raw files and block devices.
//! - [`CacheMode`]: writeback, writethrough, none (`O_DIRECT`) and unsafe.
//! - [`qcow2`]: QEMU copy-on-write images v2/v3 (backing chains, compression, extended
//!   L2, check and repair).
//! - [`vpc`] and [`vhdx`]: Microsoft VHD and VHDX images.
//! - [`cache_tier`]: a caching tier in front of any backend.
//! - [`throttle`]: token-bucket I/O throttling per disk and per group of disks.
//! - [`detect`]: format probing and [`open_image`].
//! - [`file_io`]: the positioned, vectored file I/O all formats share.
//!
//! # Example
//!
//! ```
//! use vmkit_block::{open_image, read_at, write_at, OpenOptions, raw::RawBackend};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.img");
//! RawBackend::create(&path, 1 << 20)?;
//! let disk = open_image(&path, OpenOptions::new())?;
//! assert_eq!(disk.format(), "raw");
//! write_at(&*disk, 4096, b"hello")?;
//! let mut buf = [0u8; 5];
//! read_at(&*disk, 4096, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! disk.flush()?;
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod cache_mode;
pub mod cache_tier;
pub mod detect;
pub mod error;
pub mod file_io;
pub mod qcow2;
pub mod raw;
pub mod throttle;
pub mod vhdx;
pub mod vpc;

pub use backend::{read_at, write_at, BlockBackend, BlockStatus};
pub use cache_mode::CacheMode;
pub use detect::{open_image, probe_path, ImageFormat, OpenOptions};
pub use error::{BlockError, Result};

/// Re-export of the vm-memory version this crate's buffers come from.
pub use vm_memory;
