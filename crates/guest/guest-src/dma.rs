// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Memory for device rings and buffers: a bump allocator over RAM after the per-CPU blocks
//! (identity-mapped, so a pointer is the physical address a device is given). Nothing is
//! ever freed; the guest runs its device checks once.

use core::sync::atomic::{AtomicU64, Ordering};

static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

/// Highest address handed out: the identity map covers 4 GiB, cacheable up to 3 GiB.
const LIMIT: u64 = 0xC000_0000;

/// Makes `[start, end)` available (clipped to the cacheable identity map).
pub fn init(start: u64, end: u64) {
    NEXT.store(start, Ordering::Relaxed);
    END.store(end.min(LIMIT), Ordering::Relaxed);
}

/// Allocates `size` bytes aligned to `align` (a power of two); not zeroed.
pub fn alloc(size: u64, align: u64) -> Option<u64> {
    let mut cur = NEXT.load(Ordering::Relaxed);
    loop {
        let start = cur.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(size)?;
        if cur == 0 || end > END.load(Ordering::Relaxed) {
            return None;
        }
        match NEXT.compare_exchange(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return Some(start),
            Err(now) => cur = now,
        }
    }
}

/// Allocates `size` zeroed bytes aligned to `align`.
pub fn alloc_zeroed(size: u64, align: u64) -> Option<u64> {
    let at = alloc(size, align)?;
    // SAFETY: `[at, at + size)` was just handed out by the allocator: RAM nobody else uses.
    unsafe { core::ptr::write_bytes(at as *mut u8, 0, size as usize) };
    Some(at)
}
