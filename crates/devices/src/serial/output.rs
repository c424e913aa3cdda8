// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Where the UART's transmitted bytes go: the sink, plus the optional capture buffer and
//! line callback.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use super::socket::SocketShared;
use crate::lock;

/// Longest line handed to a line callback; longer output is delivered in pieces of this size
/// (so a guest that never prints a newline cannot grow the VMM's memory).
pub const MAX_LINE_LEN: usize = 4096;

/// A callback receiving each complete line of guest output (without the line ending).
pub type LineCallback = Box<dyn FnMut(&str) + Send>;

/// The destination proper.
pub(crate) enum Sink {
    /// Output is discarded.
    Null,
    /// Any writer (stdout, a file, a caller's object).
    Writer(Box<dyn Write + Send>),
    /// The client of the serial socket, if one is connected.
    Socket(Arc<SocketShared>),
}

/// Splits a byte stream into lines for a [`LineCallback`].
pub(crate) struct LineSplitter {
    callback: LineCallback,
    line: Vec<u8>,
}

impl LineSplitter {
    pub(crate) fn new(callback: LineCallback) -> Self {
        Self {
            callback,
            line: Vec::new(),
        }
    }

    fn emit(&mut self) {
        let end = if self.line.last() == Some(&b'\r') {
            self.line.len() - 1
        } else {
            self.line.len()
        };
        let text = String::from_utf8_lossy(self.line.get(..end).unwrap_or_default());
        (self.callback)(&text);
        self.line.clear();
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.emit();
            } else {
                self.line.push(b);
                if self.line.len() >= MAX_LINE_LEN {
                    self.emit();
                }
            }
        }
    }
}

/// The `Write` object given to vm-superio: copies every byte to the capture buffer and the
/// line callback, then to the sink.
pub(crate) struct OutputMux {
    pub(crate) sink: Sink,
    pub(crate) capture: Option<Arc<Mutex<Vec<u8>>>>,
    pub(crate) lines: Option<LineSplitter>,
}

impl Write for OutputMux {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The copies come first and do not depend on the sink: a VMM scanning the output
        // still sees it when stdout is closed or no socket client is connected.
        if let Some(capture) = &self.capture {
            lock(capture).extend_from_slice(buf);
        }
        if let Some(lines) = &mut self.lines {
            lines.feed(buf);
        }
        match &mut self.sink {
            Sink::Null => {}
            Sink::Writer(w) => w.write_all(buf)?,
            Sink::Socket(s) => s.send(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Writer(w) => w.flush(),
            Sink::Null | Sink::Socket(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_bounded() {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let s2 = seen.clone();
        let mut l = LineSplitter::new(Box::new(move |line| lock(&s2).push(line.to_owned())));
        l.feed(b"one\r\ntw");
        l.feed(b"o\n\n");
        l.feed(&vec![b'x'; MAX_LINE_LEN + 3]);
        let seen = lock(&seen).clone();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0], "one");
        assert_eq!(seen[1], "two");
        assert_eq!(seen[2], "");
        assert_eq!(seen[3].len(), MAX_LINE_LEN);
    }
}
