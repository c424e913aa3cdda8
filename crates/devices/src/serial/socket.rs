// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The serial console on a Unix socket.
//!
//! The device listens at a path. The first client that connects receives the guest's output
//! and what it sends goes to the guest; further connections are closed at once while it
//! stays connected. Output produced while no client is connected is dropped (a console, not
//! a log: use a file sink or the capture buffer to keep everything).
//!
//! The vCPU thread never blocks on the client: output goes into a bounded buffer
//! ([`SOCKET_OUTPUT_BUFFER`] bytes) that a writer thread drains; when a slow client lets it
//! fill up, further output is dropped and counted.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::input::feed;
use super::UartCore;
use crate::{lock, DevicesError};

/// Size of the buffer between the UART and a slow socket client.
pub const SOCKET_OUTPUT_BUFFER: usize = 64 * 1024;

struct Client {
    id: u64,
    stream: Arc<UnixStream>,
}

#[derive(Default)]
struct SocketState {
    client: Option<Client>,
    next_id: u64,
    pending: Vec<u8>,
    stopped: bool,
    dropped: u64,
}

/// State shared by the UART's output path and the socket threads.
pub(crate) struct SocketShared {
    state: Mutex<SocketState>,
    /// Signalled on new output, on a client connecting, and on shutdown.
    cond: Condvar,
}

impl SocketShared {
    fn lock(&self) -> MutexGuard<'_, SocketState> {
        lock(&self.state)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, SocketState>) -> MutexGuard<'a, SocketState> {
        self.cond
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues output for the client; drops it (counted) when none is connected or the buffer
    /// is full.
    pub(crate) fn send(&self, buf: &[u8]) {
        let mut s = self.lock();
        if s.client.is_none() || s.stopped {
            s.dropped = s.dropped.saturating_add(buf.len() as u64);
            return;
        }
        let take = SOCKET_OUTPUT_BUFFER
            .saturating_sub(s.pending.len())
            .min(buf.len());
        s.pending
            .extend_from_slice(buf.get(..take).unwrap_or_default());
        s.dropped = s.dropped.saturating_add((buf.len() - take) as u64);
        if take > 0 {
            self.cond.notify_all();
        }
    }

    /// Forgets client `id` (if it is still the current one) and closes its connection.
    fn disconnect(&self, id: u64) {
        let mut s = self.lock();
        if s.client.as_ref().is_some_and(|c| c.id == id) {
            if let Some(c) = s.client.take() {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
            s.pending.clear();
        }
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    pub(crate) fn connected(&self) -> bool {
        self.lock().client.is_some()
    }

    pub(crate) fn wait_for_client(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if s.client.is_some() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if s.stopped || left.is_zero() {
                return false;
            }
            s = self
                .cond
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The listening socket and its threads.
pub(crate) struct SocketServer {
    path: PathBuf,
    shared: Arc<SocketShared>,
    listener: Option<UnixListener>,
}

fn bind(path: &Path) -> Result<UnixListener, DevicesError> {
    let bind_err = |source| DevicesError::SocketBind {
        path: path.to_owned(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            // A file is at the path. A socket nobody answers on was left by a process that
            // died, and is replaced; a live listener or any other file is not touched.
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if !is_socket {
                return Err(bind_err(e));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(DevicesError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(bind_err)?;
            UnixListener::bind(path).map_err(bind_err)
        }
        Err(e) => Err(bind_err(e)),
    }
}

impl SocketServer {
    /// Listens at `path` (threads are started by [`SocketServer::start`]).
    pub(crate) fn bind(path: &Path) -> Result<Self, DevicesError> {
        let listener = bind(path)?;
        Ok(Self {
            path: path.to_owned(),
            shared: Arc::new(SocketShared {
                state: Mutex::new(SocketState::default()),
                cond: Condvar::new(),
            }),
            listener: Some(listener),
        })
    }

    pub(crate) fn shared(&self) -> Arc<SocketShared> {
        Arc::clone(&self.shared)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the accept and writer threads; client input is fed to `core`.
    pub(crate) fn start(&mut self, core: Weak<UartCore>) -> Result<(), DevicesError> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let shared = self.shared();
        std::thread::Builder::new()
            .name("serial-socket-out".to_owned())
            .spawn(move || writer_loop(&shared))
            .map_err(|source| DevicesError::SpawnThread {
                name: "serial-socket-out",
                source,
            })?;
        let shared = self.shared();
        std::thread::Builder::new()
            .name("serial-socket-accept".to_owned())
            .spawn(move || accept_loop(&listener, &shared, &core))
            .map_err(|source| DevicesError::SpawnThread {
                name: "serial-socket-accept",
                source,
            })?;
        Ok(())
    }

    /// Stops the threads, closes the client connection and removes the socket file.
    pub(crate) fn shutdown(&self) {
        {
            let mut s = self.shared.lock();
            if s.stopped {
                return;
            }
            s.stopped = true;
            if let Some(c) = s.client.take() {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
            s.pending.clear();
            self.shared.cond.notify_all();
        }
        // Wake the accept thread so that it sees `stopped` and drops the listener.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for SocketServer {
    /// Also cleans up when building the device failed after the socket was bound.
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn writer_loop(shared: &SocketShared) {
    loop {
        let (id, stream, data) = {
            let mut s = shared.lock();
            loop {
                if s.stopped {
                    return;
                }
                if !s.pending.is_empty() {
                    if let Some(c) = &s.client {
                        let job = (c.id, Arc::clone(&c.stream));
                        break (job.0, job.1, std::mem::take(&mut s.pending));
                    }
                    s.pending.clear();
                }
                s = shared.wait(s);
            }
        };
        if (&*stream).write_all(&data).is_err() {
            shared.disconnect(id);
        }
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<SocketShared>, core: &Weak<UartCore>) {
    for conn in listener.incoming() {
        if shared.lock().stopped {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                log::warn!("serial socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let stream = Arc::new(stream);
        let id = {
            let mut s = shared.lock();
            if s.client.is_some() {
                // One client at a time: this connection is closed when `stream` drops.
                continue;
            }
            let id = s.next_id;
            s.next_id = s.next_id.wrapping_add(1);
            s.client = Some(Client {
                id,
                stream: Arc::clone(&stream),
            });
            s.pending.clear();
            shared.cond.notify_all();
            id
        };
        let reader_shared = Arc::clone(shared);
        let reader_core = core.clone();
        let spawned = std::thread::Builder::new()
            .name("serial-socket-in".to_owned())
            .spawn(move || {
                client_loop(&stream, &reader_core);
                reader_shared.disconnect(id);
            });
        if let Err(e) = spawned {
            log::warn!("serial socket: cannot start the client thread: {e}");
            shared.disconnect(id);
        }
    }
}

fn client_loop(stream: &UnixStream, core: &Weak<UartCore>) {
    let mut buf = [0u8; 256];
    loop {
        let n = match (&*stream).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let Some(core) = core.upgrade() else { return };
        if !feed(&core, buf.get(..n).unwrap_or_default()) {
            return;
        }
    }
}
