// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The 16550A UART, built on [`vm_superio::Serial`], with its host-side plumbing.
//!
//! vm-superio provides the register model; this module adds what a VMM needs around it:
//!
//! - [`LineTrigger`], the adapter from our [`InterruptLine`] to vm-superio's
//!   [`Trigger`](vm_superio::Trigger);
//! - output sinks ([`SerialOutput`]): stdout, a file (created, or appended to), a Unix
//!   socket, or any `Write`;
//! - input sources ([`SerialInput`]): stdin when it is a terminal, any `Read`, or the socket
//!   client; a background thread feeds the bytes into the 64-byte receive FIFO, waits while
//!   it is full (woken when the guest drains it) and raises the receive interrupt;
//! - an output capture ([`SerialBuilder::capture`], [`SerialBuilder::on_line`]) so that the
//!   VMM can scan the guest's output while it is also printed;
//! - save/restore of the registers and FIFO as a versioned [`UartState`], and [`Pausable`]
//!   (input is held back while paused, so a snapshot is consistent).
//!
//! The socket sink: the device listens at the path; the first client that connects receives
//! the output and its input goes to the guest; further connections are closed while it stays
//! connected; **output produced while no client is connected is dropped**. A stale socket
//! file (nobody listening) is replaced; a live one is an error
//! ([`DevicesError::SocketInUse`]). The socket file is removed when the device is dropped.
//!
//! Callbacks and the capture buffer are used while the UART's lock is held: a line callback
//! must not access the same serial device, and the VMM should not hold the capture buffer's
//! lock while it accesses the device.

mod input;
mod output;
mod socket;
#[cfg(test)]
mod tests;

use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as UartError, SerialEvents};
use vmkit_device::{BusDevice, BusRange, InterruptError, InterruptLine};
use vmkit_migration::{MigrationError, Pausable, Restore, Snapshot, VersionedState};

pub use output::{LineCallback, MAX_LINE_LEN};
pub use socket::SOCKET_OUTPUT_BUFFER;

use output::{LineSplitter, OutputMux, Sink};
use socket::{SocketServer, SocketShared};

use crate::{each_byte, each_byte_mut, lock, pio_range, DevicesError};

/// I/O base of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// I/O base of COM2.
pub const COM2_BASE: u16 = 0x2f8;
/// I/O base of COM3.
pub const COM3_BASE: u16 = 0x3e8;
/// I/O base of COM4.
pub const COM4_BASE: u16 = 0x2e8;
/// ISA IRQ of COM1 (and COM3).
pub const COM1_IRQ: u32 = 4;
/// ISA IRQ of COM2 (and COM4).
pub const COM2_IRQ: u32 = 3;
/// Number of ports a UART occupies.
pub const SERIAL_PORT_LEN: u16 = 8;
/// Size of the receive FIFO.
pub const FIFO_CAPACITY: usize = 64;

/// Adapts an [`InterruptLine`] to vm-superio's [`Trigger`](vm_superio::Trigger), so any
/// vm-superio device can raise a vmkit interrupt.
///
/// vm-superio devices signal events and never lower a line, so give them an edge-triggered
/// line (ISA IRQs such as COM1's IRQ 4 are edge-triggered).
#[derive(Clone)]
pub struct LineTrigger(Arc<dyn InterruptLine>);

impl LineTrigger {
    /// Wraps `line`.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self(line)
    }

    /// The wrapped line.
    pub fn line(&self) -> &Arc<dyn InterruptLine> {
        &self.0
    }
}

impl std::fmt::Debug for LineTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LineTrigger")
            .field(&self.0.trigger_mode())
            .finish()
    }
}

impl vm_superio::Trigger for LineTrigger {
    type E = InterruptError;

    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.trigger()
    }
}

/// Where the guest's output goes.
pub enum SerialOutput {
    /// Discarded (the capture, if any, still sees it).
    Sink,
    /// The VMM's standard output.
    Stdout,
    /// A file, created if missing and appended to.
    File(PathBuf),
    /// A Unix socket listening at this path (also an input source; see the module docs).
    Socket(PathBuf),
    /// Any writer.
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sink => f.write_str("Sink"),
            Self::Stdout => f.write_str("Stdout"),
            Self::File(p) => f.debug_tuple("File").field(p).finish(),
            Self::Socket(p) => f.debug_tuple("Socket").field(p).finish(),
            Self::Writer(_) => f.write_str("Writer(..)"),
        }
    }
}

/// Where the guest's input comes from (besides a socket client, with
/// [`SerialOutput::Socket`]).
pub enum SerialInput {
    /// No input.
    None,
    /// The VMM's standard input, read only if it is a terminal (it is not put in raw mode, so
    /// the guest receives whole lines). Otherwise nothing is read; pass
    /// `SerialInput::Reader(Box::new(std::io::stdin()))` to read a pipe.
    Stdin,
    /// Any reader, read by a background thread until end of file or an error.
    Reader(Box<dyn Read + Send>),
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Stdin => f.write_str("Stdin"),
            Self::Reader(_) => f.write_str("Reader(..)"),
        }
    }
}

/// Configures and builds a [`Serial`].
pub struct SerialBuilder {
    irq: Arc<dyn InterruptLine>,
    base: u16,
    output: SerialOutput,
    input: SerialInput,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
    on_line: Option<LineCallback>,
}

impl std::fmt::Debug for SerialBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialBuilder")
            .field("base", &self.base)
            .field("output", &self.output)
            .field("input", &self.input)
            .field("capture", &self.capture.is_some())
            .field("on_line", &self.on_line.is_some())
            .finish()
    }
}

impl SerialBuilder {
    /// A UART at COM1 raising `irq`, with output discarded and no input.
    pub fn new(irq: Arc<dyn InterruptLine>) -> Self {
        Self {
            irq,
            base: COM1_BASE,
            output: SerialOutput::Sink,
            input: SerialInput::None,
            capture: None,
            on_line: None,
        }
    }

    /// The first port (default [`COM1_BASE`]); only [`Serial::range`] uses it.
    pub fn base(mut self, base: u16) -> Self {
        self.base = base;
        self
    }

    /// Where output goes.
    pub fn output(mut self, output: SerialOutput) -> Self {
        self.output = output;
        self
    }

    /// Where input comes from.
    pub fn input(mut self, input: SerialInput) -> Self {
        self.input = input;
        self
    }

    /// Also appends every output byte to `buffer` (unbounded: the VMM trims it).
    pub fn capture(mut self, buffer: Arc<Mutex<Vec<u8>>>) -> Self {
        self.capture = Some(buffer);
        self
    }

    /// Also calls `callback` with each line of output (without `\n` or `\r\n`; invalid UTF-8
    /// replaced; lines longer than [`MAX_LINE_LEN`] delivered in pieces).
    pub fn on_line(mut self, callback: impl FnMut(&str) + Send + 'static) -> Self {
        self.on_line = Some(Box::new(callback));
        self
    }

    /// Opens the sink, starts the input threads and returns the device.
    pub fn build(self) -> Result<Serial, DevicesError> {
        self.build_from(None)
    }

    fn build_from(self, state: Option<&vm_superio::SerialState>) -> Result<Serial, DevicesError> {
        let mut server = None;
        let sink = match self.output {
            SerialOutput::Sink => Sink::Null,
            SerialOutput::Stdout => Sink::Writer(Box::new(std::io::stdout())),
            SerialOutput::Writer(w) => Sink::Writer(w),
            SerialOutput::File(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|source| DevicesError::CreateFile { path, source })?;
                Sink::Writer(Box::new(file))
            }
            SerialOutput::Socket(path) => {
                let s = SocketServer::bind(&path)?;
                let shared = s.shared();
                server = Some(s);
                Sink::Socket(shared)
            }
        };
        let socket_shared = server.as_ref().map(SocketServer::shared);
        let out = OutputMux {
            sink,
            capture: self.capture,
            lines: self.on_line.map(LineSplitter::new),
        };
        let wake = Arc::new(Condvar::new());
        let lost = Arc::new(AtomicU64::new(0));
        let events = UartEvents {
            wake: Arc::clone(&wake),
            lost: Arc::clone(&lost),
        };
        let trigger = LineTrigger::new(self.irq);
        let uart = match state {
            None => Uart::with_events(trigger, events, out),
            Some(state) => Uart::from_state(state, trigger, events, out).map_err(|e| match e {
                UartError::Trigger(source) => DevicesError::Interrupt {
                    device: "serial",
                    source,
                },
                other => DevicesError::InvalidState {
                    device: "serial",
                    reason: other.to_string(),
                },
            })?,
        };
        let core = Arc::new(UartCore {
            state: Mutex::new(UartInner {
                uart,
                paused: false,
                stopped: false,
            }),
            wake,
        });
        // From here on, dropping `serial` stops whatever was started.
        let mut serial = Serial {
            core,
            base: self.base,
            lost,
            socket: server,
            socket_shared,
            warned_tx: AtomicBool::new(false),
            warned_irq: AtomicBool::new(false),
        };
        if let Some(server) = &mut serial.socket {
            server.start(Arc::downgrade(&serial.core))?;
        }
        match self.input {
            SerialInput::None => {}
            SerialInput::Stdin => {
                if std::io::stdin().is_terminal() {
                    input::spawn_reader(
                        "serial-stdin",
                        Arc::downgrade(&serial.core),
                        Box::new(std::io::stdin()),
                    )?;
                }
            }
            SerialInput::Reader(r) => {
                input::spawn_reader("serial-input", Arc::downgrade(&serial.core), r)?;
            }
        }
        Ok(serial)
    }
}

/// The vm-superio UART as configured here.
type Uart = vm_superio::Serial<LineTrigger, UartEvents, OutputMux>;

/// vm-superio's event hooks: wake the input threads when the guest drains the FIFO, count
/// bytes the sink failed to take.
struct UartEvents {
    wake: Arc<Condvar>,
    lost: Arc<AtomicU64>,
}

impl SerialEvents for UartEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {
        self.wake.notify_all();
    }
}

struct UartInner {
    uart: Uart,
    /// Input threads hold their bytes back while set.
    paused: bool,
    /// The device was dropped: input threads end.
    stopped: bool,
}

impl UartInner {
    /// Enqueues as much of `bytes` as fits; returns how many were taken and whether raising
    /// the interrupt worked.
    fn enqueue(&mut self, bytes: &[u8]) -> (usize, Result<(), InterruptError>) {
        let before = self.uart.fifo_capacity();
        let result = self.uart.enqueue_raw_bytes(bytes);
        let taken = before.saturating_sub(self.uart.fifo_capacity());
        let result = match result {
            Err(UartError::Trigger(e)) => Err(e),
            _ => Ok(()),
        };
        (taken, result)
    }
}

/// What the input threads share with the device.
struct UartCore {
    state: Mutex<UartInner>,
    /// Signalled (with `state` held) when the FIFO empties, on resume and on shutdown.
    wake: Arc<Condvar>,
}

/// A 16550A UART on the port bus.
///
/// Build it with [`Serial::builder`], register it at [`Serial::range`] and keep it in an
/// `Arc` (the bus holds one). Dropping the last reference stops its threads and removes its
/// socket file. An input thread blocked reading stdin or another reader ends with the next
/// input after that (a blocking read cannot be interrupted).
pub struct Serial {
    core: Arc<UartCore>,
    base: u16,
    lost: Arc<AtomicU64>,
    socket: Option<SocketServer>,
    socket_shared: Option<Arc<SocketShared>>,
    warned_tx: AtomicBool,
    warned_irq: AtomicBool,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("base", &self.base)
            .field("socket", &self.socket_path())
            .finish()
    }
}

impl Serial {
    /// Starts configuring a UART that raises `irq`.
    pub fn builder(irq: Arc<dyn InterruptLine>) -> SerialBuilder {
        SerialBuilder::new(irq)
    }

    /// The first port.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// The ports to register on the bus: `base .. base + 8`.
    pub fn range(&self) -> BusRange {
        pio_range(self.base, SERIAL_PORT_LEN)
    }

    /// Puts as much of `bytes` as fits into the receive FIFO and raises the receive
    /// interrupt; returns the number of bytes taken (0 when the FIFO is full, in loopback
    /// mode, or while paused). For VMMs that feed input themselves, and for tests.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut inner = lock(&self.core.state);
        if inner.paused {
            return 0;
        }
        let (taken, result) = inner.enqueue(bytes);
        if let Err(e) = result {
            self.warn_irq(&e);
        }
        taken
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        lock(&self.core.state).uart.fifo_capacity()
    }

    /// Output bytes that did not reach the sink: write errors (e.g. stdout closed) and, for
    /// the socket sink, output while no client was connected or its buffer was full.
    pub fn lost_output_bytes(&self) -> u64 {
        let socket = self.socket_shared.as_ref().map_or(0, |s| s.dropped());
        self.lost.load(Ordering::Relaxed).saturating_add(socket)
    }

    /// The socket path, with [`SerialOutput::Socket`].
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_ref().map(SocketServer::path)
    }

    /// Whether a socket client is connected.
    pub fn socket_client_connected(&self) -> bool {
        self.socket_shared.as_ref().is_some_and(|s| s.connected())
    }

    /// Waits up to `timeout` for a socket client (like QEMU's `server,wait`); `false` on
    /// timeout or without a socket.
    pub fn wait_for_socket_client(&self, timeout: Duration) -> bool {
        self.socket_shared
            .as_ref()
            .is_some_and(|s| s.wait_for_client(timeout))
    }

    fn warn_irq(&self, e: &InterruptError) {
        if !self.warned_irq.swap(true, Ordering::Relaxed) {
            log::warn!("serial {:#x}: raising the interrupt failed: {e}", self.base);
        }
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        {
            let mut inner = lock(&self.core.state);
            inner.stopped = true;
            self.core.wake.notify_all();
        }
        if let Some(server) = &self.socket {
            server.shutdown();
        }
    }
}

impl BusDevice for Serial {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        let mut inner = lock(&self.core.state);
        each_byte_mut(offset, data, |off, b| {
            *b = match u8::try_from(off) {
                Ok(reg) if u16::from(reg) < SERIAL_PORT_LEN => inner.uart.read(reg),
                _ => 0,
            };
        });
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        let mut inner = lock(&self.core.state);
        each_byte(offset, data, |off, value| {
            let Ok(reg) = u8::try_from(off) else { return };
            if u16::from(reg) >= SERIAL_PORT_LEN {
                return;
            }
            match inner.uart.write(reg, value) {
                Ok(()) => {}
                Err(UartError::Trigger(e)) => self.warn_irq(&e),
                Err(e) => {
                    if !self.warned_tx.swap(true, Ordering::Relaxed) {
                        log::warn!("serial {:#x}: output lost: {e}", self.base);
                    }
                }
            }
        });
    }
}

/// The saved state of a [`Serial`]: the UART registers and the receive FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest (at most [`FIFO_CAPACITY`]).
    pub in_buffer: Vec<u8>,
}

impl VersionedState for UartState {
    const NAME: &'static str = "vmkit-devices/serial-16550";
    const VERSION: u16 = 1;
}

impl From<vm_superio::SerialState> for UartState {
    fn from(s: vm_superio::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for vm_superio::SerialState {
    fn from(s: &UartState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Snapshot for Serial {
    type State = UartState;

    fn save(&self) -> Result<UartState, MigrationError> {
        Ok(lock(&self.core.state).uart.state().into())
    }
}

impl Restore for Serial {
    /// The sink, input and interrupt of the restored device (the state holds only the
    /// registers).
    type Args = SerialBuilder;

    fn restore(args: SerialBuilder, state: &UartState) -> Result<Self, MigrationError> {
        if state.in_buffer.len() > FIFO_CAPACITY {
            return Err(MigrationError::InvalidState {
                name: UartState::NAME,
                reason: format!(
                    "receive FIFO holds {} bytes, more than its capacity of {FIFO_CAPACITY}",
                    state.in_buffer.len()
                ),
            });
        }
        args.build_from(Some(&state.into()))
            .map_err(|e| MigrationError::Component {
                component: UartState::NAME.to_owned(),
                source: Box::new(e),
            })
    }
}

impl Pausable for Serial {
    /// Holds input back: the FIFO does not change until [`Pausable::resume`].
    fn pause(&self) -> Result<(), MigrationError> {
        lock(&self.core.state).paused = true;
        Ok(())
    }

    fn resume(&self) -> Result<(), MigrationError> {
        lock(&self.core.state).paused = false;
        self.core.wake.notify_all();
        Ok(())
    }
}
