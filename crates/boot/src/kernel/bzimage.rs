// SPDX-License-Identifier: Apache-2.0 OR MIT
//! bzImage setup header inspection (Linux x86 boot protocol, `Documentation/arch/x86/boot.rst`).

use linux_loader::loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use vm_memory::ByteValued;

use crate::layout::{BZIMAGE_LOAD_ADDR, HIMEM_START};

/// Offset of the setup header in the image.
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of the "HdrS" magic.
pub const HDRS_OFFSET: usize = 0x202;
/// "HdrS".
pub const HDRS_MAGIC: [u8; 4] = *b"HdrS";
/// Lowest boot protocol we accept: 2.12 added `xloadflags` and its `XLF_KERNEL_64` bit.
pub const MIN_PROTOCOL: u16 = 0x020c;
/// Bytes of the image needed to read the whole setup header.
pub const HEADER_END: usize = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>();

const BOOT_FLAG: u16 = 0xaa55;
/// Default `initrd_addr_max` for kernels that do not state it (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u32 = 0x37ff_ffff;
/// Default kernel runtime address (`LOAD_PHYSICAL_ADDR`) when the header has no `pref_address`.
const DEFAULT_PREF_ADDRESS: u64 = 0x100_0000;

/// What the setup header says about loading the image at [`BZIMAGE_LOAD_ADDR`].
#[derive(Clone, Copy, Debug)]
pub struct BzImageInfo {
    /// The setup header as found in the image.
    pub header: setup_header,
    /// Boot protocol version.
    pub version: u16,
    /// Size of the real-mode setup code, which is not loaded.
    pub setup_size: u64,
    /// Size of the protected-mode payload loaded at 1 MiB.
    pub payload_size: u64,
    /// End (exclusive) of the memory the kernel needs before it reads the memory map: the
    /// payload, and `init_size` bytes from the address the decompressor runs the kernel at.
    pub needed_end: u64,
    /// Highest address the initramfs may occupy (inclusive).
    pub initrd_addr_max: u32,
    /// Longest command line the kernel accepts, without the NUL.
    pub cmdline_size: u32,
}

/// Parses the setup header from the first bytes of the image (`prefix`, at least
/// [`HEADER_END`] bytes when the file is that long) of a file of `file_len` bytes.
///
/// Errors are reasons to put in [`Error::BadBzImage`](crate::Error::BadBzImage).
pub fn parse_bzimage(prefix: &[u8], file_len: u64) -> Result<BzImageInfo, String> {
    let raw = prefix
        .get(SETUP_HEADER_OFFSET..HEADER_END)
        .ok_or_else(|| format!("file is {file_len} bytes, too short for a setup header"))?;
    let header = *setup_header::from_slice(raw).ok_or("cannot read the setup header")?;
    if header.header.to_le_bytes() != HDRS_MAGIC {
        return Err("no \"HdrS\" magic at offset 0x202".into());
    }
    let boot_flag = header.boot_flag;
    if boot_flag != BOOT_FLAG {
        return Err(format!("boot flag {boot_flag:#x} is not 0xaa55"));
    }
    let version = header.version;
    if version < MIN_PROTOCOL {
        return Err(format!(
            "boot protocol {}.{:02} is older than 2.12 and has no 64-bit entry point",
            version >> 8,
            version & 0xff
        ));
    }
    if header.loadflags & LOADED_HIGH == 0 {
        return Err("the kernel is not loaded high (LOADED_HIGH is clear)".into());
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err("the kernel has no 64-bit entry point (XLF_KERNEL_64 is clear)".into());
    }
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let payload_size = file_len
        .checked_sub(setup_size)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            format!("file is {file_len} bytes, but the setup code alone takes {setup_size}")
        })?;

    // Where the decompressor puts the kernel: the load address aligned up to
    // kernel_alignment, but not below pref_address (LOAD_PHYSICAL_ADDR).
    let pref = match header.pref_address {
        0 => DEFAULT_PREF_ADDRESS,
        p => p,
    };
    let align = u64::from(header.kernel_alignment);
    let runtime = if header.relocatable_kernel != 0 && align.is_power_of_two() {
        BZIMAGE_LOAD_ADDR
            .checked_next_multiple_of(align)
            .ok_or("kernel_alignment overflows")?
            .max(pref)
    } else {
        pref
    };
    if runtime < HIMEM_START {
        return Err(format!(
            "kernel runtime address {runtime:#x} is below 1 MiB"
        ));
    }
    let payload_end = BZIMAGE_LOAD_ADDR
        .checked_add(payload_size)
        .ok_or("payload size overflows")?;
    let init_end = runtime
        .checked_add(u64::from(header.init_size))
        .ok_or("init_size overflows")?;
    let initrd_addr_max = match header.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        m => m,
    };
    Ok(BzImageInfo {
        header,
        version,
        setup_size,
        payload_size,
        needed_end: payload_end.max(init_end),
        initrd_addr_max,
        cmdline_size: header.cmdline_size,
    })
}

/// Builds a minimal synthetic bzImage (setup header plus `payload_len` payload bytes) for
/// tests and fuzzing seeds. The payload is not a real kernel.
pub fn synthetic_bzimage(payload_len: usize, init_size: u32) -> Vec<u8> {
    let setup_sects = 3u8;
    let setup = (usize::from(setup_sects) + 1) * 512;
    let mut img = vec![0u8; setup + payload_len];
    img[SETUP_HEADER_OFFSET] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
    img[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(&HDRS_MAGIC);
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = LOADED_HIGH;
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x234] = 1; // relocatable
    img[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    for (i, b) in img[setup..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_header_parses() {
        let img = synthetic_bzimage(0x3000, 0x80_0000);
        let info = parse_bzimage(&img, img.len() as u64).unwrap();
        assert_eq!(info.version, 0x020f);
        assert_eq!(info.setup_size, 2048);
        assert_eq!(info.payload_size, 0x3000);
        // Runs at max(align_up(1 MiB, 2 MiB), 16 MiB) = 16 MiB, needs init_size from there.
        assert_eq!(info.needed_end, 0x100_0000 + 0x80_0000);
        assert_eq!(info.initrd_addr_max, 0x7fff_ffff);
        assert_eq!(info.cmdline_size, 2048);
    }

    #[test]
    fn old_or_32bit_only_kernels_are_rejected() {
        let mut img = synthetic_bzimage(0x1000, 0);
        img[0x206..0x208].copy_from_slice(&0x020au16.to_le_bytes());
        let err = parse_bzimage(&img, img.len() as u64).unwrap_err();
        assert!(err.contains("2.10"), "{err}");
        let mut img = synthetic_bzimage(0x1000, 0);
        img[0x236] = 0;
        assert!(parse_bzimage(&img, img.len() as u64)
            .unwrap_err()
            .contains("XLF_KERNEL_64"));
        let img = synthetic_bzimage(0, 0);
        assert!(parse_bzimage(&img, img.len() as u64)
            .unwrap_err()
            .contains("setup code"));
        assert!(parse_bzimage(&img[..0x210], 0x210)
            .unwrap_err()
            .contains("too short"));
    }
}
