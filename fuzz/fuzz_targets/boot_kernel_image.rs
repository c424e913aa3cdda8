// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Arbitrary bytes as a kernel image: format detection and ELF/bzImage header parsing of
//! vmkit-boot, then (when the headers are accepted) loading into a 32 MiB guest. Errors are
//! fine; panics are bugs.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_boot::{inspect_kernel_bytes, load_kernel_from, KernelOptions, MmioGap};

fn memory() -> &'static GuestMemoryMmap<()> {
    static MEM: OnceLock<GuestMemoryMmap<()>> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)])
            .expect("32 MiB of guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    if inspect_kernel_bytes(data, "fuzz").is_ok() {
        // A 32 MiB gap start matches the 32 MiB of RAM: images above it hit the gap check.
        let opts = KernelOptions::new(MmioGap::below_4g(32 << 20));
        let _ = load_kernel_from(memory(), &mut Cursor::new(data), "fuzz", &opts);
    }
});
