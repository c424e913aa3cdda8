// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio-console (virtio 1.2, section 5.3) with `VIRTIO_CONSOLE_F_MULTIPORT`: port 0 plus
//! up to `max_ports - 1` further ports, added and removed at run time, each backed by
//! stdio, a Unix socket, files, a PTY or descriptors the VMM supplies.
//!
//! Guest output is written to the port's backend without blocking; what the backend does
//! not take is kept in a bounded per-port buffer, and while that is full the port's transmit
//! queue is not consumed (back-pressure on the guest, no data lost) until the backend is
//! writable again. Host input is read into a per-port buffer (bounded; the backend is not
//! read while it is full) and delivered when the driver posts receive buffers, to ports the
//! driver has open.
//!
//! ```no_run
//! use vmkit_virtio::devices::console::{Console, ConsoleConfig, PortBackend, PortConfig};
//!
//! let mut console = Console::new(ConsoleConfig::default()).expect("config");
//! console
//!     .add_port(PortConfig { console: true, ..PortConfig::new(PortBackend::Stdio) })
//!     .expect("port 0");
//! let agent = console
//!     .add_port(PortConfig {
//!         name: Some("org.vmkit.agent".into()),
//!         ..PortConfig::new(PortBackend::UnixSocket("/tmp/agent.sock".into()))
//!     })
//!     .expect("port 1");
//! let pty = console.add_port(PortConfig::new(PortBackend::Pty)).expect("port 2");
//! println!("agent on port {}, pty at {:?}", agent.id, pty.pty_path);
//! ```

pub mod control;
mod port;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmkit_migration::{
    decode_section, encode_section, MigrationError, Section, Value, VersionedState,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::control::{ControlState, PortStatus};
pub use self::port::PortBackend;
use self::port::PortIo;
use super::worker::{EventControl, EventHandler, Parked, WorkerSet};
use super::{check_avail_index, drain_queue, end_of_pass, GuestMem};
use crate::{
    device_type, features, ActivateContext, VirtioDevice, VirtioError, VirtioInterrupt,
    VirtioInterruptType, VirtioMemory,
};

/// virtio-console feature bits.
pub mod feature {
    /// `cols` and `rows` are valid.
    pub const SIZE: u64 = 1 << 0;
    /// Several ports and the control queues.
    pub const MULTIPORT: u64 = 1 << 1;
}

/// Host input buffered per port before the backend stops being read.
pub const INPUT_BUFFER_CAP: usize = 64 * 1024;
/// Guest output buffered per port before its transmit queue stops being consumed.
pub const OUTPUT_BUFFER_CAP: usize = 64 * 1024;
/// Longest guest message (data or control) taken from one chain.
pub const MAX_CHAIN_BYTES: usize = 64 * 1024;
/// Upper bound on `max_ports`.
pub const MAX_PORTS_LIMIT: u32 = 1024;

/// Errors of the console device and its ports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// A configuration value is out of range.
    #[error("virtio-console: {0}")]
    Config(String),
    /// A port backend could not be opened.
    #[error("virtio-console: port backend: {0}")]
    Backend(String),
    /// All `max_ports` ports are in use.
    #[error("virtio-console: all {0} ports are in use")]
    NoFreePort(u32),
    /// No port with this id.
    #[error("virtio-console: no port {0}")]
    UnknownPort(u32),
    /// The running device did not accept the request.
    #[error("virtio-console: worker: {0}")]
    Worker(String),
}

/// How a console device is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Most ports (`max_nr_ports`), port 0 included; 1..=[`MAX_PORTS_LIMIT`].
    pub max_ports: u32,
    /// Maximum size of each queue (power of two).
    pub queue_size: u16,
    /// Initial console size of port 0 (cols, rows).
    pub size: (u16, u16),
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            max_ports: 8,
            queue_size: 128,
            size: (80, 25),
        }
    }
}

/// A port to add.
#[derive(Debug)]
pub struct PortConfig {
    /// Name announced to the driver (`/dev/virtio-ports/<name>` in Linux).
    pub name: Option<String>,
    /// Announce the port as a console (`hvc`).
    pub console: bool,
    /// The host end.
    pub backend: PortBackend,
}

impl PortConfig {
    /// An unnamed, non-console port over `backend`.
    pub fn new(backend: PortBackend) -> Self {
        PortConfig {
            name: None,
            console: false,
            backend,
        }
    }
}

/// What [`Console::add_port`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// The port id.
    pub id: u32,
    /// The PTY path of a [`PortBackend::Pty`] port.
    pub pty_path: Option<PathBuf>,
}

/// Queue index of a port's receive queue.
pub fn rx_queue(port: u32) -> u16 {
    if port == 0 {
        0
    } else {
        (2 + 2 * port) as u16
    }
}

/// Queue index of a port's transmit queue.
pub fn tx_queue(port: u32) -> u16 {
    rx_queue(port) + 1
}

/// Control receive queue (device → driver).
pub const CONTROL_RX: u16 = 2;
/// Control transmit queue (driver → device).
pub const CONTROL_TX: u16 = 3;

/// What a queue index is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueueRole {
    Rx(u32),
    Tx(u32),
    ControlRx,
    ControlTx,
}

fn queue_role(index: u16) -> QueueRole {
    match index {
        0 => QueueRole::Rx(0),
        1 => QueueRole::Tx(0),
        CONTROL_RX => QueueRole::ControlRx,
        CONTROL_TX => QueueRole::ControlTx,
        i => {
            let port = u32::from(i / 2 - 1);
            if i % 2 == 0 {
                QueueRole::Rx(port)
            } else {
                QueueRole::Tx(port)
            }
        }
    }
}

enum Command {
    Add(u32, PortStatus, PortIo),
    Remove(u32),
    Resize(u32, u16, u16),
}

struct PortRuntime {
    io: PortIo,
    pending: VecDeque<u8>,
    input_registered: bool,
    /// Guest output the backend has not taken yet.
    out: VecDeque<u8>,
    output_registered: bool,
}

impl PortRuntime {
    fn new(io: PortIo) -> Self {
        PortRuntime {
            io,
            pending: VecDeque::new(),
            input_registered: false,
            out: VecDeque::new(),
            output_registered: false,
        }
    }

    /// Appends `data` to the output buffer and writes the buffer as far as the backend
    /// takes it without blocking. An error is a failed socket client (the buffer is
    /// dropped).
    fn write_output(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.extend(data);
        while !self.out.is_empty() {
            let (head, _) = self.out.as_slices();
            match self.io.try_write(head) {
                Ok(0) => break,
                Ok(n) => {
                    self.out.drain(..n.min(self.out.len()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.out.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Polls the output for writability exactly while output is buffered.
    fn update_output_poll(&mut self, id: u32, ctl: &EventControl<'_>) {
        let want = !self.out.is_empty();
        if want == self.output_registered {
            return;
        }
        let Some(fd) = self.io.output_fd() else {
            self.output_registered = false;
            return;
        };
        if want {
            match ctl.add(fd, token(id, ROLE_OUTPUT), EventSet::OUT) {
                Ok(()) => self.output_registered = true,
                Err(e) => log::warn!("virtio-console: port {id}: cannot poll output: {e}"),
            }
        } else {
            let _ = ctl.remove(fd);
            self.output_registered = false;
        }
    }
}

const CMD_TOKEN: u32 = u32::MAX;
const ROLE_INPUT: u32 = 0;
const ROLE_LISTENER: u32 = 1;
const ROLE_OUTPUT: u32 = 2;

fn token(port: u32, role: u32) -> u32 {
    port * 4 + role
}

/// Stops watching a port's input and output streams (without a worker, only forgets that
/// they were watched).
fn unwatch_streams(p: &mut PortRuntime, ctl: Option<&EventControl<'_>>) {
    if let Some(ctl) = ctl {
        if p.input_registered {
            if let Some(fd) = p.io.input_fd() {
                let _ = ctl.remove(fd);
            }
        }
        if p.output_registered {
            if let Some(fd) = p.io.output_fd() {
                let _ = ctl.remove(fd);
            }
        }
    }
    p.input_registered = false;
    p.output_registered = false;
}

/// The queue handler of the console: all queues, the control protocol and the port
/// backends, served by one worker thread (or called directly in tests).
pub struct ConsoleHandler {
    mem: VirtioMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    multiport: bool,
    queues: Vec<(u16, Queue)>,
    state: ControlState,
    ports: BTreeMap<u32, PortRuntime>,
    ctrl_out: VecDeque<Vec<u8>>,
    commands: Option<(Receiver<Command>, EventFd)>,
}

impl ConsoleHandler {
    fn slot(&self, index: u16) -> Option<usize> {
        self.queues.iter().position(|(i, _)| *i == index)
    }

    /// Registers a port's descriptors with the worker's epoll.
    fn register_port(&mut self, id: u32, ctl: &EventControl<'_>) {
        let Some(p) = self.ports.get_mut(&id) else {
            return;
        };
        if let Some(fd) = p.io.listener_fd() {
            if let Err(e) = ctl.add(fd, token(id, ROLE_LISTENER), EventSet::IN) {
                log::warn!("virtio-console: port {id}: cannot poll listener: {e}");
            }
        }
        p.output_registered = false;
        p.update_output_poll(id, ctl);
        p.input_registered = false;
        if p.pending.len() < INPUT_BUFFER_CAP {
            if let Some(fd) = p.io.input_fd() {
                match ctl.add(fd, token(id, ROLE_INPUT), EventSet::IN) {
                    Ok(()) => p.input_registered = true,
                    Err(e) => log::warn!("virtio-console: port {id}: cannot poll input: {e}"),
                }
            }
        }
    }

    fn unregister_port(&mut self, id: u32, ctl: &EventControl<'_>) {
        if let Some(p) = self.ports.get_mut(&id) {
            if let Some(fd) = p.io.listener_fd() {
                let _ = ctl.remove(fd);
            }
            unwatch_streams(p, Some(ctl));
        }
    }

    fn queue_ctrl(&mut self, msgs: Vec<Vec<u8>>) {
        if self.multiport {
            self.ctrl_out.extend(msgs);
        }
    }

    /// Delivers pending control messages into the control receive queue.
    pub fn flush_control(&mut self) {
        let Some(slot) = self.slot(CONTROL_RX) else {
            return;
        };
        let guard = self.mem.memory();
        let mem: &GuestMem = &guard;
        let (index, queue) = &mut self.queues[slot];
        let mut source = ControlSource(&mut self.ctrl_out);
        deliver(queue, *index, mem, self.interrupt.as_ref(), &mut source);
    }

    /// Processes the control transmit queue (driver → device messages). Ports the driver
    /// opened get their buffered input.
    pub fn process_control_tx(&mut self, ctl: Option<&EventControl<'_>>) {
        let Some(slot) = self.slot(CONTROL_TX) else {
            return;
        };
        let guard = self.mem.memory();
        let mem: &GuestMem = &guard;
        let mut replies = Vec::new();
        let mut opened = Vec::new();
        {
            let (index, queue) = &mut self.queues[slot];
            let state = &mut self.state;
            drain_queue(queue, *index, mem, self.interrupt.as_ref(), |chain| {
                let bytes = gather(chain, mem, MAX_CHAIN_BYTES);
                let was_open = control::ControlMessage::parse(&bytes)
                    .and_then(|m| state.port(m.id).map(|p| (m.id, p.guest_open)));
                replies.extend(state.handle_guest(&bytes));
                if let Some((id, false)) = was_open {
                    if state.port(id).is_some_and(|p| p.guest_open) {
                        opened.push(id);
                    }
                }
                0
            });
        }
        drop(guard);
        self.queue_ctrl(replies);
        self.flush_control();
        for id in opened {
            self.fill_rx(id, ctl);
        }
    }

    /// Whether host input may be delivered to `port`: under `MULTIPORT` only while the
    /// driver has the port open (Linux discards data for ports nobody opened).
    fn accepts_input(&self, port: u32) -> bool {
        !self.multiport || self.state.port(port).is_some_and(|p| p.guest_open)
    }

    /// Processes a port's transmit queue: guest output to the backend. Buffered output is
    /// written first; while the port's output buffer is full the queue is left alone (it is
    /// served again when the backend becomes writable). A socket client that cannot be
    /// written to is disconnected (`PORT_OPEN` 0 to the driver).
    pub fn process_tx(&mut self, port: u32, ctl: Option<&EventControl<'_>>) {
        let Some(slot) = self.slot(tx_queue(port)) else {
            // No transmit queue (output restored from a snapshot taken under other
            // features): still write out what is buffered.
            self.flush_output(port, ctl);
            return;
        };
        let guard = self.mem.memory();
        let mem: &GuestMem = &guard;
        let (index, queue) = &mut self.queues[slot];
        let index = *index;
        let interrupt = self.interrupt.as_ref();
        let mut p = self.ports.get_mut(&port);
        let mut lost = None;
        if let Some(p) = p.as_mut() {
            if let Err(e) = p.write_output(&[]) {
                lost = Some(e);
            }
        }
        let mut done = 0usize;
        let result: Result<(), String> = (|| {
            loop {
                queue.disable_notification(mem).map_err(|e| e.to_string())?;
                loop {
                    if p.as_ref().is_some_and(|p| p.out.len() >= OUTPUT_BUFFER_CAP) {
                        // Back-pressure: resumed by the backend becoming writable.
                        return Ok(());
                    }
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        break;
                    };
                    let head = chain.head_index();
                    let bytes = gather(chain, mem, MAX_CHAIN_BYTES);
                    match p.as_mut() {
                        // Output after the client failed is dropped, as for a
                        // disconnected socket.
                        Some(_) if lost.is_some() => {}
                        Some(p) => {
                            if let Err(e) = p.write_output(&bytes) {
                                lost = Some(e);
                            }
                        }
                        None => {
                            log::debug!("virtio-console: output to absent port {port} dropped")
                        }
                    }
                    queue
                        .add_used(mem, head, 0)
                        .map_err(|e| format!("chain head {head}: {e}"))?;
                    done += 1;
                }
                if !queue.enable_notification(mem).map_err(|e| e.to_string())? {
                    return Ok(());
                }
                check_avail_index(queue, mem)?;
            }
        })();
        end_of_pass(queue, index, mem, interrupt, done, result);
        drop(guard);
        if let Some(e) = lost {
            log::warn!("virtio-console: port {port}: client write failed: {e}");
            self.client_lost(port, ctl);
        }
        if let (Some(p), Some(ctl)) = (self.ports.get_mut(&port), ctl) {
            p.update_output_poll(port, ctl);
        }
    }

    /// Writes buffered output of `port` as far as its backend takes it, and polls the
    /// backend for writability while some remains.
    fn flush_output(&mut self, port: u32, ctl: Option<&EventControl<'_>>) {
        let Some(p) = self.ports.get_mut(&port) else {
            return;
        };
        if let Err(e) = p.write_output(&[]) {
            log::warn!("virtio-console: port {port}: client write failed: {e}");
            self.client_lost(port, ctl);
        }
        if let (Some(p), Some(ctl)) = (self.ports.get_mut(&port), ctl) {
            p.update_output_poll(port, ctl);
        }
    }

    /// Guest output buffered for `port` and not yet taken by its backend.
    pub fn pending_output(&self, port: u32) -> usize {
        self.ports.get(&port).map_or(0, |p| p.out.len())
    }

    /// The socket client of `port` hung up or failed: stop polling it, drop it and tell
    /// the driver (`PORT_OPEN` 0), so the next client is announced again.
    fn client_lost(&mut self, port: u32, ctl: Option<&EventControl<'_>>) {
        let Some(p) = self.ports.get_mut(&port) else {
            return;
        };
        if p.io.listener_fd().is_none() {
            return;
        }
        unwatch_streams(p, ctl);
        p.out.clear();
        p.io.disconnect();
        let msgs = self.state.set_host_connected(port, false);
        self.queue_ctrl(msgs);
        self.flush_control();
    }

    /// Moves buffered host input of `port` into its receive queue, reading non-pollable
    /// input (regular files) as room allows, and resumes polling the backend once the buffer
    /// drained.
    pub fn fill_rx(&mut self, port: u32, ctl: Option<&EventControl<'_>>) {
        let open = self.accepts_input(port);
        let Some(p) = self.ports.get_mut(&port) else {
            return;
        };
        let slot = self.queues.iter().position(|(i, _)| *i == rx_queue(port));
        if let (Some(slot), true) = (slot, open) {
            let guard = self.mem.memory();
            let mem: &GuestMem = &guard;
            let (index, queue) = &mut self.queues[slot];
            let mut source = PortSource(p);
            deliver(queue, *index, mem, self.interrupt.as_ref(), &mut source);
        }
        if let Some(ctl) = ctl {
            if !p.input_registered && p.pending.len() < INPUT_BUFFER_CAP {
                if let Some(fd) = p.io.input_fd() {
                    if ctl.add(fd, token(port, ROLE_INPUT), EventSet::IN).is_ok() {
                        p.input_registered = true;
                    }
                }
            }
        }
    }

    /// Host input is readable on `port`.
    fn input_ready(&mut self, port: u32, ctl: &EventControl<'_>) {
        let Some(p) = self.ports.get_mut(&port) else {
            return;
        };
        let room = INPUT_BUFFER_CAP.saturating_sub(p.pending.len());
        let fd = p.io.input_fd();
        let mut hung_up = false;
        if room > 0 {
            let mut buf = vec![0u8; room.min(16 * 1024)];
            match p.io.read(&mut buf) {
                Ok(0) => hung_up = true,
                Ok(n) => p.pending.extend(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("virtio-console: port {port} input: {e}");
                    hung_up = true;
                }
            }
        }
        if hung_up || p.pending.len() >= INPUT_BUFFER_CAP {
            if let Some(fd) = fd {
                let _ = ctl.remove(fd);
            }
            p.input_registered = false;
        }
        if hung_up {
            self.client_lost(port, Some(ctl));
        }
        self.fill_rx(port, None);
    }

    fn accept(&mut self, port: u32, ctl: &EventControl<'_>) {
        let Some(p) = self.ports.get_mut(&port) else {
            return;
        };
        if let Some(fd) = p.io.accept() {
            match ctl.add(fd, token(port, ROLE_INPUT), EventSet::IN) {
                Ok(()) => p.input_registered = true,
                Err(e) => log::warn!("virtio-console: port {port}: cannot poll client: {e}"),
            }
            let msgs = self.state.set_host_connected(port, true);
            self.queue_ctrl(msgs);
            self.flush_control();
        }
    }

    fn run_commands(&mut self, ctl: &EventControl<'_>) {
        let mut cmds = Vec::new();
        if let Some((rx, efd)) = &self.commands {
            let _ = efd.read();
            while let Ok(c) = rx.try_recv() {
                cmds.push(c);
            }
        }
        for c in cmds {
            match c {
                Command::Add(id, status, io) => self.add_port(id, status, io, Some(ctl)),
                Command::Remove(id) => {
                    self.unregister_port(id, ctl);
                    self.ports.remove(&id);
                    let msgs = self.state.remove_port(id);
                    self.queue_ctrl(msgs);
                }
                Command::Resize(id, cols, rows) => {
                    let msgs = self.state.resize(id, cols, rows);
                    self.queue_ctrl(msgs);
                }
            }
        }
        self.flush_control();
    }

    fn add_port(
        &mut self,
        id: u32,
        status: PortStatus,
        io: PortIo,
        ctl: Option<&EventControl<'_>>,
    ) {
        let status = PortStatus {
            host_connected: io.host_connected(),
            ..status
        };
        self.ports.insert(id, PortRuntime::new(io));
        let msgs = self.state.add_port(id, status);
        self.queue_ctrl(msgs);
        if let Some(ctl) = ctl {
            self.register_port(id, ctl);
        }
    }

    /// Serves the queue at `index`, whatever its role.
    pub fn process_index(&mut self, index: u16, ctl: Option<&EventControl<'_>>) {
        match queue_role(index) {
            QueueRole::Rx(port) => self.fill_rx(port, ctl),
            QueueRole::Tx(port) => self.process_tx(port, ctl),
            QueueRole::ControlRx => self.flush_control(),
            QueueRole::ControlTx => self.process_control_tx(ctl),
        }
    }

    /// The control protocol state.
    pub fn control_state(&self) -> &ControlState {
        &self.state
    }

    /// Host input buffered for `port` and not yet delivered.
    pub fn pending_input(&self, port: u32) -> usize {
        self.ports.get(&port).map_or(0, |p| p.pending.len())
    }

    /// Queues host input for `port` as if its backend produced it (tests, injected input).
    pub fn push_input(&mut self, port: u32, data: &[u8]) {
        if let Some(p) = self.ports.get_mut(&port) {
            p.pending.extend(data);
        }
        self.fill_rx(port, None);
    }
}

impl EventHandler for ConsoleHandler {
    fn start(&mut self, ctl: &EventControl<'_>) {
        if let Some((_, efd)) = &self.commands {
            if let Err(e) = ctl.add(efd.as_raw_fd(), CMD_TOKEN, EventSet::IN) {
                log::error!("virtio-console: cannot poll the command eventfd: {e}");
            }
        }
        let ids: Vec<u32> = self.ports.keys().copied().collect();
        for id in &ids {
            self.register_port(*id, ctl);
        }
        let indices: Vec<u16> = self.queues.iter().map(|(i, _)| *i).collect();
        for index in indices {
            self.process_index(index, Some(ctl));
        }
        self.run_commands(ctl);
    }

    fn queue_notified(&mut self, slot: usize, ctl: &EventControl<'_>) {
        if let Some((index, _)) = self.queues.get(slot) {
            let index = *index;
            self.process_index(index, Some(ctl));
        }
    }

    fn backend_event(&mut self, token: u32, _events: EventSet, ctl: &EventControl<'_>) {
        if token == CMD_TOKEN {
            self.run_commands(ctl);
            return;
        }
        let (port, role) = (token / 4, token % 4);
        match role {
            ROLE_INPUT => self.input_ready(port, ctl),
            ROLE_LISTENER => self.accept(port, ctl),
            ROLE_OUTPUT => self.process_tx(port, Some(ctl)),
            _ => {}
        }
    }
}

/// Reads the readable part of a chain into a host buffer (at most `max` bytes).
fn gather(chain: virtio_queue::DescriptorChain<&GuestMem>, mem: &GuestMem, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for d in chain.readable() {
        if out.len() >= max {
            break;
        }
        let n = (d.len() as usize).min(max - out.len());
        let start = out.len();
        out.resize(start + n, 0);
        if mem.read_slice(&mut out[start..], d.addr()).is_err() {
            out.truncate(start);
            break;
        }
    }
    out
}

/// Where [`deliver`] takes device → driver data from.
trait RxSource {
    /// Whether there is data waiting (without consuming it).
    fn has_data(&self) -> bool;
    /// Up to `cap` bytes for one receive chain, `None` when there is nothing to send.
    fn take(&mut self, cap: usize) -> Option<Vec<u8>>;
}

/// A port's buffered host input (and its non-pollable input, read as room allows).
struct PortSource<'a>(&'a mut PortRuntime);

impl RxSource for PortSource<'_> {
    fn has_data(&self) -> bool {
        !self.0.pending.is_empty() || self.0.io.has_pull_input()
    }

    fn take(&mut self, cap: usize) -> Option<Vec<u8>> {
        let p = &mut *self.0;
        if p.pending.is_empty() && p.io.has_pull_input() {
            let mut buf = vec![0u8; cap.min(INPUT_BUFFER_CAP)];
            if let Ok(n) = p.io.read(&mut buf) {
                p.pending.extend(&buf[..n]);
            }
        }
        if p.pending.is_empty() {
            return None;
        }
        let n = cap.min(p.pending.len());
        Some(p.pending.drain(..n).collect())
    }
}

/// Pending control messages.
struct ControlSource<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxSource for ControlSource<'_> {
    fn has_data(&self) -> bool {
        !self.0.is_empty()
    }

    fn take(&mut self, cap: usize) -> Option<Vec<u8>> {
        let m = self.0.pop_front()?;
        if m.len() > cap {
            log::warn!(
                "virtio-console: control buffer of {cap} bytes too small, message truncated"
            );
        }
        Some(m)
    }
}

/// Fills chains of `queue` with what `source` supplies, until it runs dry or the queue has
/// no buffers; the driver is signalled once at the end if it wants to be.
///
/// When data is left over for want of buffers, driver notifications are enabled (with
/// `EVENT_IDX` that writes `avail_event`), so the driver kicks the queue when it posts the
/// next buffer; buffers that appeared meanwhile are used at once.
fn deliver(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMem,
    interrupt: &dyn VirtioInterrupt,
    source: &mut dyn RxSource,
) {
    let mut done = 0usize;
    let result: Result<(), String> = (|| {
        // Chains popped since notifications were last enabled and found pending.
        let mut progress = true;
        loop {
            if !source.has_data() {
                return Ok(());
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Nothing (more) to pop: make sure that is not a broken available index.
                check_avail_index(queue, mem)?;
                // Data is waiting: ask the driver to kick when it posts a buffer.
                if !queue.enable_notification(mem).map_err(|e| e.to_string())? {
                    return Ok(());
                }
                if !progress {
                    return Err("available ring entries cannot be read".into());
                }
                progress = false;
                continue;
            };
            progress = true;
            let head = chain.head_index();
            let descs: Vec<(GuestAddress, u32)> =
                chain.writable().map(|d| (d.addr(), d.len())).collect();
            let cap: usize = descs
                .iter()
                .map(|d| d.1 as usize)
                .sum::<usize>()
                .min(MAX_CHAIN_BYTES);
            let used = |queue: &mut Queue, len: usize| {
                queue
                    .add_used(mem, head, len as u32)
                    .map_err(|e| format!("chain head {head}: {e}"))
            };
            if cap == 0 {
                // No writable buffer: give the chain back empty.
                used(queue, 0)?;
                done += 1;
                continue;
            }
            let Some(data) = source.take(cap) else {
                queue.go_to_previous_position();
                return Ok(());
            };
            let mut written = 0usize;
            for (addr, len) in descs {
                if written >= data.len() {
                    break;
                }
                let n = (len as usize).min(data.len() - written);
                if mem.write_slice(&data[written..written + n], addr).is_err() {
                    break;
                }
                written += n;
            }
            used(queue, written)?;
            done += 1;
        }
    })();
    end_of_pass(queue, index, mem, interrupt, done, result);
}

/// Saved state of one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPort {
    /// Port id.
    pub id: u32,
    /// Name.
    pub name: Option<String>,
    /// Console port.
    pub console: bool,
    /// The driver reported the port ready.
    pub guest_ready: bool,
    /// The driver has the port open.
    pub guest_open: bool,
    /// Host input buffered for the port and not yet delivered to the driver (version 2;
    /// empty when decoded from version 1).
    #[serde(default)]
    pub pending_input: Vec<u8>,
    /// Guest output the host end had not taken yet (version 2; empty when decoded from
    /// version 1).
    #[serde(default)]
    pub pending_output: Vec<u8>,
}

/// Saved state of the console device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Negotiated features.
    pub acked_features: u64,
    /// `max_nr_ports`.
    pub max_ports: u32,
    /// Console size of port 0.
    pub size: (u16, u16),
    /// The driver sent `DEVICE_READY`.
    pub device_ready: bool,
    /// The ports.
    pub ports: Vec<SavedPort>,
    /// Control messages (`virtio_console_control` and payload) queued for the driver and
    /// not yet delivered for want of control receive buffers, oldest first (version 2;
    /// empty when decoded from version 1).
    #[serde(default)]
    pub control_queue: Vec<Vec<u8>>,
}

/// Version history: 1 had the driver's control flags only; 2 added the queued control
/// messages ([`ConsoleState::control_queue`]) and each port's buffered input and output
/// ([`SavedPort::pending_input`], [`SavedPort::pending_output`]).
impl VersionedState for ConsoleState {
    const NAME: &'static str = "vmkit-virtio/console";
    const VERSION: u16 = 2;

    fn upgrade(from: u16, value: Value) -> Result<Value, MigrationError> {
        match from {
            // The version-2 fields are `serde(default)`: nothing was queued or buffered.
            1 => Ok(value),
            _ => Err(MigrationError::UnsupportedVersion {
                name: Self::NAME,
                version: from,
            }),
        }
    }
}

/// Buffered data of a port restored from a snapshot, handed to the worker on activation.
#[derive(Default)]
struct PortBuffers {
    input: VecDeque<u8>,
    output: VecDeque<u8>,
}

struct PortMeta {
    name: Option<String>,
    console: bool,
}

/// The virtio-console device.
pub struct Console {
    config: ConsoleConfig,
    size: (u16, u16),
    acked_features: u64,
    ports: BTreeMap<u32, PortMeta>,
    /// While not activated: the port backends and the control state.
    idle_io: BTreeMap<u32, PortIo>,
    idle_state: ControlState,
    /// While not activated: control messages and port data restored from a snapshot.
    idle_ctrl_out: VecDeque<Vec<u8>>,
    idle_buffers: BTreeMap<u32, PortBuffers>,
    workers: WorkerSet<ConsoleHandler>,
    commands: Option<(Sender<Command>, EventFd)>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

impl Console {
    /// A console with no ports yet (add port 0 with [`Console::add_port`]).
    pub fn new(config: ConsoleConfig) -> Result<Self, ConsoleError> {
        if config.max_ports == 0 || config.max_ports > MAX_PORTS_LIMIT {
            return Err(ConsoleError::Config(format!(
                "max_ports {} is not in 1..={MAX_PORTS_LIMIT}",
                config.max_ports
            )));
        }
        if config.queue_size < 2
            || !config.queue_size.is_power_of_two()
            || config.queue_size > 32768
        {
            return Err(ConsoleError::Config(format!(
                "queue size {} is not a power of two in 2..=32768",
                config.queue_size
            )));
        }
        Ok(Console {
            size: config.size,
            config,
            acked_features: 0,
            ports: BTreeMap::new(),
            idle_io: BTreeMap::new(),
            idle_state: ControlState::new(),
            idle_ctrl_out: VecDeque::new(),
            idle_buffers: BTreeMap::new(),
            workers: WorkerSet::new("virtio-console"),
            commands: None,
            interrupt: None,
        })
    }

    fn send(&self, cmd: Command) -> Result<(), ConsoleError> {
        let Some((tx, efd)) = &self.commands else {
            return Err(ConsoleError::Worker("not running".into()));
        };
        tx.send(cmd)
            .map_err(|_| ConsoleError::Worker("worker has stopped".into()))?;
        efd.write(1)
            .map_err(|e| ConsoleError::Worker(format!("wake: {e}")))
    }

    fn active(&self) -> bool {
        self.commands.is_some()
    }

    /// Adds a port at the lowest free id (port 0 first) and, if the driver is running,
    /// announces it with `DEVICE_ADD`. The backend is opened here, so errors (a socket path
    /// in use, a missing file) are reported to the caller.
    ///
    /// Port 0 is the first port added (and the only one a driver without
    /// [`feature::MULTIPORT`] uses, through queues 0 and 1). Under `MULTIPORT`, Linux
    /// attaches an `hvc` console only to ports announced as consoles
    /// ([`PortConfig::console`]): for a Linux guest console, add the first port with
    /// `console: true`. Nothing here enforces that.
    pub fn add_port(&mut self, port: PortConfig) -> Result<PortInfo, ConsoleError> {
        let id = (0..self.config.max_ports)
            .find(|i| !self.ports.contains_key(i))
            .ok_or(ConsoleError::NoFreePort(self.config.max_ports))?;
        if let Some(n) = &port.name {
            if n.len() > control::MAX_NAME_LEN || n.contains('\0') {
                return Err(ConsoleError::Config(format!(
                    "port name {n:?} is longer than {} bytes or contains NUL",
                    control::MAX_NAME_LEN
                )));
            }
        }
        let io = PortIo::open(port.backend)?;
        let pty_path = io.pty_path().map(PathBuf::from);
        let size = if id == 0 { Some(self.size) } else { None };
        let status = PortStatus {
            name: port.name.clone(),
            console: port.console,
            host_connected: io.host_connected(),
            size,
            ..PortStatus::default()
        };
        if self.active() {
            self.send(Command::Add(id, status, io))?;
        } else {
            self.idle_state.add_port(id, status);
            self.idle_io.insert(id, io);
        }
        self.ports.insert(
            id,
            PortMeta {
                name: port.name,
                console: port.console,
            },
        );
        Ok(PortInfo { id, pty_path })
    }

    /// Removes a port (`DEVICE_REMOVE` to a running driver) and closes its backend.
    pub fn remove_port(&mut self, id: u32) -> Result<(), ConsoleError> {
        if self.ports.remove(&id).is_none() {
            return Err(ConsoleError::UnknownPort(id));
        }
        if self.active() {
            self.send(Command::Remove(id))
        } else {
            self.idle_state.remove_port(id);
            self.idle_io.remove(&id);
            self.idle_buffers.remove(&id);
            Ok(())
        }
    }

    /// The console size of a console port changed: a `RESIZE` control message; for port 0
    /// also the `cols`/`rows` configuration fields and a configuration interrupt.
    pub fn resize(&mut self, id: u32, cols: u16, rows: u16) -> Result<(), ConsoleError> {
        if !self.ports.contains_key(&id) {
            return Err(ConsoleError::UnknownPort(id));
        }
        if id == 0 {
            self.size = (cols, rows);
            if let Some(irq) = &self.interrupt {
                if self.acked_features & feature::SIZE != 0 {
                    if let Err(e) = irq.trigger(VirtioInterruptType::Config) {
                        log::warn!("virtio-console: config interrupt: {e}");
                    }
                }
            }
        }
        if self.active() {
            self.send(Command::Resize(id, cols, rows))
        } else {
            self.idle_state.resize(id, cols, rows);
            Ok(())
        }
    }

    /// The ids of the ports.
    pub fn port_ids(&self) -> Vec<u32> {
        self.ports.keys().copied().collect()
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn config_space(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..2].copy_from_slice(&self.size.0.to_le_bytes());
        b[2..4].copy_from_slice(&self.size.1.to_le_bytes());
        b[4..8].copy_from_slice(&self.config.max_ports.to_le_bytes());
        b
    }

    fn take_back(&mut self) {
        for p in self.workers.take() {
            let mut h = p.handler;
            self.idle_state = std::mem::take(&mut h.state);
            for (id, rt) in std::mem::take(&mut h.ports) {
                self.idle_io.insert(id, rt.io);
            }
        }
        // Commands sent but not yet run by the worker.
        self.commands = None;
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let n = 2 + 2 * self.config.max_ports as usize;
        vec![self.config.queue_size; n]
    }

    fn device_features(&self) -> u64 {
        features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::SIZE
            | feature::MULTIPORT
    }

    fn negotiate_features(&mut self, features: u64) -> Result<(), VirtioError> {
        if features & !self.device_features() != 0 {
            return Err(VirtioError::Features(features));
        }
        self.acked_features = features;
        Ok(())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.config_space();
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= space.len() {
            return;
        }
        let n = data.len().min(space.len() - start);
        data[..n].copy_from_slice(&space[start..start + n]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr (EMERG_WRITE) is not offered; everything is read-only.
        log::debug!(
            "virtio-console: ignored config write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        self.take_back();
        let multiport = self.acked_features & feature::MULTIPORT != 0;
        let mut queues = Vec::new();
        let mut notifiers = Vec::new();
        for q in ctx.queues {
            let needed = if multiport {
                usize::from(q.index) < 2 + 2 * self.config.max_ports as usize
            } else {
                q.index < 2
            };
            if !needed {
                return Err(VirtioError::Queue {
                    index: q.index,
                    reason: "no such queue under the negotiated features".into(),
                });
            }
            queues.push((q.index, q.queue));
            notifiers.push(q.notify);
        }
        let mut required = vec![0u16, 1];
        if multiport {
            required.extend([CONTROL_RX, CONTROL_TX]);
        }
        for r in required {
            if !queues.iter().any(|(i, _)| *i == r) {
                return Err(VirtioError::Queue {
                    index: r,
                    reason: "required queue not enabled".into(),
                });
            }
        }
        let efd = EventFd::new(EFD_NONBLOCK)?;
        let (tx, rx) = channel();
        let state = std::mem::take(&mut self.idle_state);
        let mut handler = ConsoleHandler {
            mem: ctx.mem,
            interrupt: ctx.interrupt.clone(),
            multiport,
            queues,
            state,
            ports: BTreeMap::new(),
            // Restored from a snapshot: delivered once the driver posts buffers.
            ctrl_out: std::mem::take(&mut self.idle_ctrl_out),
            commands: Some((rx, efd.try_clone()?)),
        };
        let mut buffers = std::mem::take(&mut self.idle_buffers);
        for (id, io) in std::mem::take(&mut self.idle_io) {
            let mut rt = PortRuntime::new(io);
            if let Some(b) = buffers.remove(&id) {
                // Restored input goes to the driver, restored output to the backend, when
                // the worker starts.
                rt.pending = b.input;
                rt.out = b.output;
            }
            handler.ports.insert(id, rt);
        }
        self.interrupt = Some(ctx.interrupt);
        self.commands = Some((tx, efd));
        let r = self.workers.start(vec![Parked { handler, notifiers }]);
        if let Err(e) = r {
            self.commands = None;
            return Err(VirtioError::Activate(format!("virtio-console worker: {e}")));
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.take_back();
        self.idle_state.reset();
        self.idle_ctrl_out.clear();
        self.idle_buffers.clear();
        self.acked_features = 0;
        self.interrupt = None;
    }

    fn save_state(&self) -> Result<Section, VirtioError> {
        let handler = self.workers.parked().next();
        let state = handler.map(|h| &h.state).unwrap_or(&self.idle_state);
        let ctrl_out = handler.map(|h| &h.ctrl_out).unwrap_or(&self.idle_ctrl_out);
        let ports = self
            .ports
            .iter()
            .map(|(id, m)| {
                let st = state.port(*id);
                let (input, output) = match handler {
                    Some(h) => h.ports.get(id).map(|p| (&p.pending, &p.out)),
                    None => self.idle_buffers.get(id).map(|b| (&b.input, &b.output)),
                }
                .map(|(i, o)| (i.iter().copied().collect(), o.iter().copied().collect()))
                .unwrap_or_default();
                SavedPort {
                    id: *id,
                    name: m.name.clone(),
                    console: m.console,
                    guest_ready: st.is_some_and(|s| s.guest_ready),
                    guest_open: st.is_some_and(|s| s.guest_open),
                    pending_input: input,
                    pending_output: output,
                }
            })
            .collect();
        encode_section(&ConsoleState {
            acked_features: self.acked_features,
            max_ports: self.config.max_ports,
            size: self.size,
            device_ready: state.device_ready(),
            ports,
            control_queue: ctrl_out.iter().cloned().collect(),
        })
        .map_err(|e| VirtioError::State(e.to_string()))
    }

    fn restore_state(&mut self, state: &Section) -> Result<(), VirtioError> {
        let s: ConsoleState =
            decode_section(state).map_err(|e| VirtioError::State(e.to_string()))?;
        if s.max_ports != self.config.max_ports {
            return Err(VirtioError::State(format!(
                "virtio-console: saved max_ports {} differs from this device's {}",
                s.max_ports, self.config.max_ports
            )));
        }
        if s.acked_features & !self.device_features() != 0 {
            return Err(VirtioError::State(format!(
                "virtio-console: saved features {:#x} not offered",
                s.acked_features
            )));
        }
        let ids: Vec<u32> = s.ports.iter().map(|p| p.id).collect();
        if ids != self.port_ids() {
            return Err(VirtioError::State(format!(
                "virtio-console: saved ports {ids:?} differ from this device's {:?}",
                self.port_ids()
            )));
        }
        if self.active() {
            return Err(VirtioError::State(
                "virtio-console: restore into an activated device".into(),
            ));
        }
        let max_msg = control::CONTROL_HEADER_LEN + control::MAX_NAME_LEN;
        if let Some(m) = s
            .control_queue
            .iter()
            .find(|m| !(control::CONTROL_HEADER_LEN..=max_msg).contains(&m.len()))
        {
            return Err(VirtioError::State(format!(
                "virtio-console: saved control message of {} bytes (not {}..={max_msg})",
                m.len(),
                control::CONTROL_HEADER_LEN
            )));
        }
        let max_out = OUTPUT_BUFFER_CAP + MAX_CHAIN_BYTES;
        if let Some(p) = s.ports.iter().find(|p| p.pending_output.len() > max_out) {
            return Err(VirtioError::State(format!(
                "virtio-console: port {}: {} bytes of saved output exceed {max_out}",
                p.id,
                p.pending_output.len()
            )));
        }
        self.acked_features = s.acked_features;
        self.size = s.size;
        // Rebuild the control state with the driver's flags: a restored driver does not
        // repeat the handshake.
        let mut st = ControlState::new();
        st.set_device_ready(s.device_ready);
        for p in &s.ports {
            let old = self.idle_state.port(p.id).cloned().unwrap_or_default();
            st.restore_port(
                p.id,
                PortStatus {
                    guest_ready: p.guest_ready,
                    guest_open: p.guest_open,
                    ..old
                },
            );
        }
        self.idle_state = st;
        self.idle_ctrl_out = s.control_queue.into_iter().collect();
        self.idle_buffers = s
            .ports
            .into_iter()
            .filter(|p| !p.pending_input.is_empty() || !p.pending_output.is_empty())
            .map(|p| {
                let b = PortBuffers {
                    input: p.pending_input.into(),
                    output: p.pending_output.into(),
                };
                (p.id, b)
            })
            .collect();
        Ok(())
    }

    fn pause(&mut self) -> Result<(), VirtioError> {
        self.workers.pause();
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VirtioError> {
        self.workers
            .resume()
            .map_err(|e| VirtioError::Activate(format!("virtio-console worker: {e}")))
    }
}

#[cfg(test)]
mod tests;
