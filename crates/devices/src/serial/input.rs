// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Feeding host input into the UART's receive FIFO from background threads.

use std::io::{ErrorKind, Read};
use std::sync::Weak;

use super::UartCore;
use crate::{lock, DevicesError};

/// Puts all of `bytes` into the receive FIFO, waiting while it is full or the device is
/// paused. Returns `false` when the device was shut down (the caller should stop).
///
/// Input that arrives while the UART is in loopback mode is dropped: its receiver is then
/// disconnected from the line, as on real hardware.
pub(crate) fn feed(core: &UartCore, mut bytes: &[u8]) -> bool {
    let mut inner = lock(&core.state);
    while !bytes.is_empty() {
        if inner.stopped {
            return false;
        }
        if inner.paused || inner.uart.fifo_capacity() == 0 {
            // Woken when the guest drains the FIFO, on resume and on shutdown.
            inner = core
                .wake
                .wait(inner)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        }
        let (taken, result) = inner.enqueue(bytes);
        if let Err(e) = result {
            log::warn!("serial: raising the receive interrupt failed: {e:?}");
        }
        if taken == 0 {
            // Loopback mode: the line is not connected to the receiver.
            return true;
        }
        bytes = bytes.get(taken..).unwrap_or_default();
    }
    true
}

/// Starts a thread that reads `reader` until end of file or an error and feeds the bytes to
/// the UART. It holds only a weak reference while blocked in `read`, so it never keeps a
/// dropped device alive; it ends at the next input after the device is gone.
pub(crate) fn spawn_reader(
    name: &'static str,
    core: Weak<UartCore>,
    mut reader: Box<dyn Read + Send>,
) -> Result<(), DevicesError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::debug!("{name}: input ended: {e}");
                        return;
                    }
                };
                let Some(core) = core.upgrade() else { return };
                if !feed(&core, buf.get(..n).unwrap_or_default()) {
                    return;
                }
            }
        })
        .map(drop)
        .map_err(|source| DevicesError::SpawnThread { name, source })
}
