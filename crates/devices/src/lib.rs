// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Platform devices of an x86 machine: the legacy parts every PC-compatible guest expects.
//!
//! | module | device | ports |
//! | --- | --- | --- |
//! | [`serial`] | 16550A UART (on [`vm_superio::Serial`]) with stdout / file / Unix-socket / writer sinks, stdin / reader / socket input, and an output capture | COM1 `0x3F8..0x400`, IRQ 4 |
//! | [`i8042`] | PS/2 controller: enough for Linux's probe and the `0xFE` CPU reset | `0x60`, `0x64`, IRQ 1 |
//! | [`cmos`] | MC146818 RTC from the host clock and 128 bytes of NVRAM with the memory-size registers | `0x70..0x72` |
//! | [`exit_port`] | a test/debug exit port: the guest writes an exit code | `0xF4..0xF8` |
//! | [`acpi_pm`] | ACPI PM1a event/control blocks: S5 power-off | `0x600..0x606` |
//! | [`post_port`] | the POST code port, logged with timestamps | `0x80` |
//!
//! Every device does no hypervisor I/O of its own (the shape of vm-superio's `Trigger`): it
//! raises interrupts through a [`vmkit_device::InterruptLine`] and reaches the outside world
//! through callbacks and `Read`/`Write` objects, so it embeds in any VMM and runs in tests
//! and fuzzers without `/dev/kvm`. Each one implements [`vmkit_device::BusDevice`] with its
//! state behind its own lock, and never panics, whatever the access size or offset.
//!
//! Accesses wider than one byte to these 8-bit devices are split into byte accesses at
//! consecutive ports, as the ISA bus does.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_device::testing::CountingLine;
//! use vmkit_device::{Bus, TriggerMode};
//! use vmkit_devices::serial::{Serial, SerialOutput, COM1_BASE};
//!
//! // The UART's interrupt; in a VMM this comes from `InterruptManager::legacy_line(4, ..)`.
//! let irq = Arc::new(CountingLine::new(TriggerMode::Edge));
//! let output = Arc::new(Mutex::new(Vec::new()));
//! let serial = Arc::new(
//!     Serial::builder(irq)
//!         .output(SerialOutput::Sink)
//!         .capture(output.clone())
//!         .build()?,
//! );
//!
//! let pio = Bus::new();
//! pio.insert(serial.range(), serial.clone())?;
//! for b in b"hello\n" {
//!     pio.write(u64::from(COM1_BASE), &[*b])?; // THR
//! }
//! assert_eq!(output.lock().unwrap().as_slice(), b"hello\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod acpi_pm;
pub mod cmos;
mod error;
pub mod exit_port;
pub mod i8042;
pub mod post_port;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use cmos::Cmos;
pub use error::DevicesError;
pub use exit_port::ExitPort;
pub use i8042::I8042;
pub use post_port::PostPort;
pub use serial::Serial;

use vmkit_device::BusRange;

/// The bus range of `len` ports from `base`.
///
/// Port numbers are 16-bit, so the range never overflows; a zero length is taken as one.
pub fn pio_range(base: u16, len: u16) -> BusRange {
    match BusRange::new(u64::from(base), u64::from(len.max(1))) {
        Ok(range) => range,
        // A non-empty range from a 16-bit base cannot reach the end of the 64-bit space.
        Err(e) => unreachable!("16-bit port range rejected: {e}"),
    }
}

/// Calls `f(offset, &mut byte)` for each byte of an access, at consecutive offsets.
///
/// Offsets that would overflow stop the iteration (the remaining bytes keep their value).
pub(crate) fn each_byte_mut(offset: u64, data: &mut [u8], mut f: impl FnMut(u64, &mut u8)) {
    for (i, b) in data.iter_mut().enumerate() {
        let Some(off) = u64::try_from(i).ok().and_then(|i| offset.checked_add(i)) else {
            return;
        };
        f(off, b);
    }
}

/// Calls `f(offset, byte)` for each byte of an access, at consecutive offsets.
pub(crate) fn each_byte(offset: u64, data: &[u8], mut f: impl FnMut(u64, u8)) {
    for (i, b) in data.iter().enumerate() {
        let Some(off) = u64::try_from(i).ok().and_then(|i| offset.checked_add(i)) else {
            return;
        };
        f(off, *b);
    }
}

/// Locks a mutex, recovering the data if a previous holder panicked (a device keeps serving
/// the guest rather than propagating a panic from another thread).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
