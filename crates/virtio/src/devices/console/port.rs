// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Host ends of console ports: stdio, a Unix socket (one client), files, a PTY, or file
//! descriptors the VMM supplies.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::ConsoleError;

/// Where a port's data goes and comes from.
#[derive(Debug)]
pub enum PortBackend {
    /// The VMM's stdin (input) and stdout (output). A stdout pipe or terminal is reopened
    /// as a new non-blocking open file description, so the VMM's own stdout stays blocking.
    Stdio,
    /// A Unix socket the device listens on; one client at a time is connected to the port
    /// (further clients are refused while one is connected).
    UnixSocket(PathBuf),
    /// Output appended to a file; input, if given, read from another file once.
    File {
        /// Guest output goes here.
        output: PathBuf,
        /// Guest input comes from here.
        input: Option<PathBuf>,
    },
    /// A new pseudo-terminal; its path is reported by `Console::add_port`.
    Pty,
    /// File descriptors owned by the VMM (pipes, sockets, terminals).
    Fds {
        /// Read for guest input (must be pollable, or a regular file).
        input: Option<OwnedFd>,
        /// Guest output is written here. A pipe or terminal is switched to `O_NONBLOCK`
        /// (on its open file description, shared with any duplicate the VMM keeps).
        output: Option<OwnedFd>,
    },
    /// Output discarded, no input.
    Null,
}

/// An opened port backend.
#[derive(Debug)]
pub(crate) struct PortIo {
    input: Option<File>,
    /// Input that is not pollable (a regular file): read when there is room.
    pull_input: bool,
    output: Option<File>,
    /// How `output` is written without blocking the worker.
    out_kind: OutKind,
    listener: Option<UnixListener>,
    client: Option<UnixStream>,
    /// A duplicate of the client's descriptor, polled for writability (the client's own
    /// descriptor is polled for input, and epoll takes a descriptor only once).
    client_poll: Option<OwnedFd>,
    socket_path: Option<PathBuf>,
    pty_path: Option<PathBuf>,
    /// Keeps the PTY's slave side open so the master never reads EIO.
    _pty_slave: Option<File>,
    input_eof: bool,
}

/// How an output descriptor is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutKind {
    /// A regular file: writes complete without waiting for a reader and cannot be polled.
    Blocking,
    /// A socket: `send` with `MSG_DONTWAIT`, without touching the descriptor's flags.
    Socket,
    /// A pipe, FIFO or terminal with `O_NONBLOCK` on our own open file description.
    Nonblocking,
    /// A PTY master: output nobody reads is dropped rather than stalling the guest.
    DropWhenFull,
}

/// Picks how to write `f` without blocking. `reopen` names a path that opens the same
/// pipe/FIFO/terminal as a new open file description (for stdout, which the VMM shares:
/// `O_NONBLOCK` must not leak into the VMM's own stdout).
fn output_kind(f: File, reopen: Option<&str>) -> (File, OutKind) {
    let ft = match f.metadata() {
        Ok(m) => m.file_type(),
        Err(_) => return (f, OutKind::Blocking),
    };
    if ft.is_file() {
        return (f, OutKind::Blocking);
    }
    if ft.is_socket() {
        return (f, OutKind::Socket);
    }
    let f = match reopen {
        Some(path) => match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
        {
            Ok(new) => return (new, OutKind::Nonblocking),
            Err(e) => {
                log::warn!(
                    "virtio-console: cannot reopen {path} non-blocking ({e}); output may block"
                );
                return (f, OutKind::Blocking);
            }
        },
        None => f,
    };
    match set_nonblocking(f.as_raw_fd()) {
        Ok(()) => (f, OutKind::Nonblocking),
        Err(e) => {
            log::warn!("virtio-console: cannot make output non-blocking ({e}); output may block");
            (f, OutKind::Blocking)
        }
    }
}

fn io_err(what: &str, path: &Path, e: io::Error) -> ConsoleError {
    ConsoleError::Backend(format!("{what} {}: {e}", path.display()))
}

fn dup_fd(fd: RawFd) -> io::Result<File> {
    // SAFETY: `dup` on a descriptor number has no memory-safety preconditions.
    let new = unsafe { libc::dup(fd) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(new) })
}

fn is_regular(f: &File) -> bool {
    f.metadata().map(|m| m.is_file()).unwrap_or(false)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl PortIo {
    fn empty() -> Self {
        PortIo {
            input: None,
            pull_input: false,
            output: None,
            out_kind: OutKind::Blocking,
            listener: None,
            client: None,
            client_poll: None,
            socket_path: None,
            pty_path: None,
            _pty_slave: None,
            input_eof: false,
        }
    }

    /// Opens `backend`. Errors name the path.
    pub(crate) fn open(backend: PortBackend) -> Result<Self, ConsoleError> {
        let mut io = PortIo::empty();
        match backend {
            PortBackend::Null => {}
            PortBackend::Stdio => {
                let input = dup_fd(libc::STDIN_FILENO)
                    .map_err(|e| ConsoleError::Backend(format!("dup stdin: {e}")))?;
                io.pull_input = is_regular(&input);
                io.input = Some(input);
                let out = dup_fd(libc::STDOUT_FILENO)
                    .map_err(|e| ConsoleError::Backend(format!("dup stdout: {e}")))?;
                let (out, kind) = output_kind(out, Some("/proc/self/fd/1"));
                io.output = Some(out);
                io.out_kind = kind;
            }
            PortBackend::UnixSocket(path) => {
                let listener = UnixListener::bind(&path).map_err(|e| io_err("bind", &path, e))?;
                listener
                    .set_nonblocking(true)
                    .map_err(|e| io_err("set_nonblocking", &path, e))?;
                io.listener = Some(listener);
                io.socket_path = Some(path);
            }
            PortBackend::File { output, input } => {
                let out = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&output)
                    .map_err(|e| io_err("open", &output, e))?;
                let (out, kind) = output_kind(out, None);
                io.output = Some(out);
                io.out_kind = kind;
                if let Some(inp) = input {
                    let f = File::open(&inp).map_err(|e| io_err("open", &inp, e))?;
                    io.pull_input = is_regular(&f);
                    io.input = Some(f);
                }
            }
            PortBackend::Pty => {
                let (master, slave, path) = open_pty()?;
                io.input = Some(
                    master
                        .try_clone()
                        .map_err(|e| ConsoleError::Backend(format!("pty: {e}")))?,
                );
                io.output = Some(master);
                io.out_kind = OutKind::DropWhenFull;
                io.pty_path = Some(path);
                io._pty_slave = Some(slave);
            }
            PortBackend::Fds { input, output } => {
                if let Some(fd) = input {
                    let f = File::from(fd);
                    io.pull_input = is_regular(&f);
                    io.input = Some(f);
                }
                if let Some(fd) = output {
                    let (out, kind) = output_kind(File::from(fd), None);
                    io.output = Some(out);
                    io.out_kind = kind;
                }
            }
        }
        Ok(io)
    }

    /// The PTY's path, for a PTY port.
    pub(crate) fn pty_path(&self) -> Option<&Path> {
        self.pty_path.as_deref()
    }

    /// Whether the host end is connected (a socket port needs a client).
    pub(crate) fn host_connected(&self) -> bool {
        self.listener.is_none() || self.client.is_some()
    }

    /// The listening socket, if any.
    pub(crate) fn listener_fd(&self) -> Option<RawFd> {
        self.listener.as_ref().map(|l| l.as_raw_fd())
    }

    /// The pollable input descriptor, if any.
    pub(crate) fn input_fd(&self) -> Option<RawFd> {
        if self.input_eof {
            return None;
        }
        if let Some(c) = &self.client {
            return Some(c.as_raw_fd());
        }
        match &self.input {
            Some(f) if !self.pull_input => Some(f.as_raw_fd()),
            _ => None,
        }
    }

    /// Input that must be read without polling (regular files) is available.
    pub(crate) fn has_pull_input(&self) -> bool {
        self.pull_input && !self.input_eof && self.input.is_some()
    }

    /// Accepts a pending client. Returns the new client's fd if one was connected.
    pub(crate) fn accept(&mut self) -> Option<RawFd> {
        let listener = self.listener.as_ref()?;
        match listener.accept() {
            Ok((stream, _)) => {
                if self.client.is_some() {
                    log::warn!(
                        "virtio-console: {}: refusing a second client",
                        self.socket_path
                            .as_deref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    );
                    return None;
                }
                if let Err(e) = stream.set_nonblocking(false) {
                    log::warn!("virtio-console: client socket: {e}");
                }
                let fd = stream.as_raw_fd();
                self.client_poll = match stream.try_clone() {
                    Ok(dup) => Some(OwnedFd::from(dup)),
                    Err(e) => {
                        log::warn!("virtio-console: client socket: {e}");
                        None
                    }
                };
                self.client = Some(stream);
                self.input_eof = false;
                Some(fd)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                log::warn!("virtio-console: accept: {e}");
                None
            }
        }
    }

    /// Drops the socket client (hang-up).
    pub(crate) fn disconnect(&mut self) {
        self.client = None;
        self.client_poll = None;
    }

    /// The descriptor to poll for writability while output is buffered; `None` when
    /// writes never wait (regular files, PTYs, no output).
    pub(crate) fn output_fd(&self) -> Option<RawFd> {
        if self.client.is_some() {
            return self.client_poll.as_ref().map(|f| f.as_raw_fd());
        }
        match (&self.output, self.out_kind) {
            (Some(f), OutKind::Socket | OutKind::Nonblocking) => Some(f.as_raw_fd()),
            _ => None,
        }
    }

    /// Reads input. `Ok(0)` is end of input (for a socket: the client left).
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = if let Some(c) = &mut self.client {
            c.read(buf)
        } else if let Some(f) = &mut self.input {
            f.read(buf)
        } else {
            Ok(0)
        };
        match r {
            Ok(0) => {
                if self.client.is_none() {
                    self.input_eof = true;
                }
                Ok(0)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) if self.pty_path.is_some() && e.raw_os_error() == Some(libc::EIO) => {
                // No process has the slave open: nothing to read.
                Err(io::Error::from(io::ErrorKind::WouldBlock))
            }
            other => other,
        }
    }

    /// Writes guest output without blocking; returns how much was taken. Output to a
    /// disconnected socket or a PTY nobody reads is dropped (reported as taken); output
    /// errors of files and descriptors are logged and the data dropped.
    ///
    /// `Err(WouldBlock)`: the backend is full, try again when [`PortIo::output_fd`] is
    /// writable. Any other error comes from the socket client: it is gone, and the caller
    /// drops it with [`PortIo::disconnect`] and tells the driver.
    pub(crate) fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(c) = &self.client {
            return send(c.as_raw_fd(), data);
        }
        let Some(f) = &mut self.output else {
            return Ok(data.len());
        };
        let r = loop {
            let r = match self.out_kind {
                OutKind::Blocking => f.write_all(data).map(|()| data.len()),
                OutKind::Socket => send(f.as_raw_fd(), data),
                OutKind::Nonblocking | OutKind::DropWhenFull => f.write(data),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if self.out_kind == OutKind::DropWhenFull {
                    log::debug!("virtio-console: pty full, output dropped");
                    Ok(data.len())
                } else {
                    Err(e)
                }
            }
            Err(e) => {
                log::warn!("virtio-console: port output: {e}; output dropped");
                Ok(data.len())
            }
            ok => ok,
        }
    }
}

/// One non-blocking `send` that raises no `SIGPIPE` when the peer is gone (retried when
/// interrupted).
fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `data` is a valid buffer of `data.len()` bytes for the duration of the
        // call.
        let n = unsafe {
            libc::send(
                fd,
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Drop for PortIo {
    fn drop(&mut self) {
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Opens a PTY in raw mode; returns (master, slave, slave path).
fn open_pty() -> Result<(File, File, PathBuf), ConsoleError> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    // SAFETY: openpty writes two descriptors into the provided ints; the name, termios and
    // winsize pointers may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r < 0 {
        return Err(ConsoleError::Backend(format!(
            "openpty: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: both descriptors were just created by openpty and are owned by us.
    let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is a writable buffer of the given length.
    let r = unsafe { libc::ttyname_r(slave.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(ConsoleError::Backend(format!(
            "ttyname: {}",
            io::Error::from_raw_os_error(r)
        )));
    }
    // SAFETY: ttyname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // Raw mode on the slave: no echo, no line editing, no CR/LF translation.
    // SAFETY: termios is plain data; tcgetattr/tcsetattr get a valid pointer to it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    set_nonblocking(master.as_raw_fd()).map_err(|e| ConsoleError::Backend(format!("pty: {e}")))?;
    Ok((master, slave, PathBuf::from(path)))
}
