// SPDX-License-Identifier: Apache-2.0 OR MIT
//! A test/debug exit port: the guest writes an exit code, the VMM stops and exits with it.
//!
//! A write of 1 to 4 bytes at the port's first address is read as a little-endian unsigned
//! number (zero-extended, so a byte write of `0xff` is `255`; a 4-byte write is taken bit for
//! bit as an `i32`) and passed to the callback. The code is passed as written: unlike QEMU's
//! `isa-debug-exit` there is no `(code << 1) | 1`. Other writes are ignored; reads return 0.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_device::BusDevice;
//! use vmkit_devices::exit_port::{ExitPort, EXIT_PORT};
//!
//! let code = Arc::new(Mutex::new(None));
//! let c = code.clone();
//! let port = ExitPort::new(move |v| *c.lock().unwrap() = Some(v));
//! port.write(u64::from(EXIT_PORT), 0, &[3, 0]); // outw(3, 0xf4)
//! assert_eq!(*code.lock().unwrap(), Some(3));
//! ```

use std::sync::Mutex;

use vmkit_device::{BusDevice, BusRange};

use crate::{lock, pio_range};

/// The default port (as QEMU's `isa-debug-exit,iobase=0xf4`).
pub const EXIT_PORT: u16 = 0xf4;
/// Ports to register so that 1-, 2- and 4-byte writes at [`EXIT_PORT`] reach the device.
pub const EXIT_PORT_LEN: u16 = 4;

/// The exit callback: receives the code the guest wrote.
pub type ExitCallback = Box<dyn Fn(i32) + Send + Sync>;

/// The exit device.
pub struct ExitPort {
    port: u16,
    callback: ExitCallback,
    last: Mutex<Option<i32>>,
}

impl std::fmt::Debug for ExitPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitPort")
            .field("port", &self.port)
            .field("last", &self.exit_code())
            .finish()
    }
}

impl ExitPort {
    /// An exit port at [`EXIT_PORT`] calling `callback` with each code written.
    pub fn new(callback: impl Fn(i32) + Send + Sync + 'static) -> Self {
        Self::with_port(EXIT_PORT, callback)
    }

    /// An exit port at `port`.
    pub fn with_port(port: u16, callback: impl Fn(i32) + Send + Sync + 'static) -> Self {
        Self {
            port,
            callback: Box::new(callback),
            last: Mutex::new(None),
        }
    }

    /// The ports to register: `port .. port + 4`.
    pub fn range(&self) -> BusRange {
        pio_range(self.port, EXIT_PORT_LEN)
    }

    /// The last code the guest wrote, if any.
    pub fn exit_code(&self) -> Option<i32> {
        *lock(&self.last)
    }
}

impl BusDevice for ExitPort {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            return;
        }
        let mut bytes = [0u8; 4];
        for (dst, src) in bytes.iter_mut().zip(data) {
            *dst = *src;
        }
        let code = i32::from_le_bytes(bytes);
        *lock(&self.last) = Some(code);
        (self.callback)(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vmkit_device::Bus;

    fn port() -> (Arc<ExitPort>, Arc<Mutex<Vec<i32>>>) {
        let codes = Arc::new(Mutex::new(Vec::new()));
        let c = codes.clone();
        (Arc::new(ExitPort::new(move |v| lock(&c).push(v))), codes)
    }

    #[test]
    fn codes_of_each_width() {
        let (dev, codes) = port();
        let bus = Bus::new();
        bus.insert(dev.range(), dev.clone()).unwrap();
        bus.write(0xf4, &[0x2a]).unwrap();
        bus.write(0xf4, &[0xff]).unwrap();
        bus.write(0xf4, &[0x34, 0x12]).unwrap();
        bus.write(0xf4, &[0x78, 0x56, 0x34, 0x12]).unwrap();
        bus.write(0xf4, &[0xff, 0xff, 0xff, 0xff]).unwrap();
        assert_eq!(*lock(&codes), vec![42, 255, 0x1234, 0x1234_5678, -1]);
        assert_eq!(dev.exit_code(), Some(-1));
    }

    #[test]
    fn other_accesses_do_nothing() {
        let (dev, codes) = port();
        dev.write(0xf4, 1, &[1]);
        dev.write(0xf4, 0, &[]);
        dev.write(0xf4, 0, &[1, 2, 3, 4, 5]);
        dev.write(0xf4, u64::MAX, &[1]);
        let mut buf = [0xaau8; 4];
        dev.read(0xf4, 0, &mut buf);
        assert_eq!(buf, [0; 4]);
        assert!(lock(&codes).is_empty());
        assert_eq!(dev.exit_code(), None);
        // A 3-byte write is still a 1-4 byte write.
        dev.write(0xf4, 0, &[1, 0, 1]);
        assert_eq!(*lock(&codes), vec![0x0001_0001]);
    }
}
