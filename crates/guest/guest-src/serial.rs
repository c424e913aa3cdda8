// SPDX-License-Identifier: Apache-2.0 OR MIT
//! COM1 (16550 at 0x3F8) output, polled: wait for LSR.THRE (bit 5) before every byte.
//!
//! Output is serialised by a spinlock so that lines from different CPUs never interleave.
//! The panic paths use [`Serial::lock_for_panic`], which gives up waiting after a bounded
//! time instead of deadlocking when the lock holder itself faulted.

use crate::cpu::{inb, outb, pause};
use crate::report::Sink;
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3F8;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 1 << 5;
/// Upper bound on LSR polls per byte, so a missing or stuck UART cannot hang the guest.
const MAX_POLLS: u32 = 1 << 20;

static LOCK: AtomicBool = AtomicBool::new(false);

fn put_byte(b: u8) {
    for _ in 0..MAX_POLLS {
        let lsr = inb(LSR);
        if lsr == 0xFF {
            // Floating bus: no UART here. Write anyway; nothing will wait for it.
            break;
        }
        if lsr & LSR_THRE != 0 {
            break;
        }
        pause();
    }
    outb(COM1, b);
}

/// Exclusive access to the serial port; released on drop.
pub struct Serial {
    locked: bool,
}

impl Serial {
    /// Takes the serial lock, waiting as long as needed.
    pub fn lock() -> Serial {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            pause();
        }
        Serial { locked: true }
    }

    /// Takes the serial lock, or proceeds without it after a bounded wait.
    pub fn lock_for_panic() -> Serial {
        for _ in 0..(1u32 << 24) {
            if LOCK
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Serial { locked: true };
            }
            pause();
        }
        Serial { locked: false }
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        if self.locked {
            LOCK.store(false, Ordering::Release);
        }
    }
}

impl Sink for Serial {
    fn put(&mut self, bytes: &[u8]) {
        for &b in bytes {
            put_byte(b);
        }
    }
}
