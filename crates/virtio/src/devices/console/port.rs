// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Host ends of console ports: stdio, a Unix socket (one client), files, a PTY, or file
//! descriptors the VMM supplies.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::ConsoleError;

/// Where a port's data goes and comes from.
#[derive(Debug)]
pub enum PortBackend {
    /// The VMM's stdin (input) and stdout (output).
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
        /// Guest output is written here.
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
    /// Drop output instead of blocking (PTY without a reader).
    nonblocking_output: bool,
    listener: Option<UnixListener>,
    client: Option<UnixStream>,
    socket_path: Option<PathBuf>,
    pty_path: Option<PathBuf>,
    /// Keeps the PTY's slave side open so the master never reads EIO.
    _pty_slave: Option<File>,
    input_eof: bool,
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
            nonblocking_output: false,
            listener: None,
            client: None,
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
                io.output = Some(
                    dup_fd(libc::STDOUT_FILENO)
                        .map_err(|e| ConsoleError::Backend(format!("dup stdout: {e}")))?,
                );
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
                io.output = Some(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&output)
                        .map_err(|e| io_err("open", &output, e))?,
                );
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
                io.nonblocking_output = true;
                io.pty_path = Some(path);
                io._pty_slave = Some(slave);
            }
            PortBackend::Fds { input, output } => {
                if let Some(fd) = input {
                    let f = File::from(fd);
                    io.pull_input = is_regular(&f);
                    io.input = Some(f);
                }
                io.output = output.map(File::from);
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

    /// Writes guest output. Output to a disconnected socket or a PTY nobody reads is
    /// dropped.
    pub(crate) fn write(&mut self, data: &[u8]) {
        let r = if let Some(c) = &mut self.client {
            c.write_all(data)
        } else if let Some(f) = &mut self.output {
            match f.write_all(data) {
                Err(e) if self.nonblocking_output && e.kind() == io::ErrorKind::WouldBlock => {
                    log::debug!("virtio-console: pty full, output dropped");
                    Ok(())
                }
                other => other,
            }
        } else {
            Ok(())
        };
        if let Err(e) = r {
            log::warn!("virtio-console: port output: {e}");
            if self.client.is_some() {
                self.client = None;
            }
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
