// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Tests of the UART and its sinks and sources.

use std::io::{Cursor, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmkit_device::testing::CountingLine;
use vmkit_device::{Bus, TriggerMode};

use super::*;

const BASE: u64 = COM1_BASE as u64;
const THR: u64 = 0;
const IER: u64 = 1;
const IIR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const SCR: u64 = 7;
const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

/// A `Write` into a shared buffer.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer that always fails.
struct Broken;

impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Rig {
    bus: Bus,
    dev: Arc<Serial>,
    irq: Arc<CountingLine>,
}

impl Rig {
    fn new(builder: impl FnOnce(SerialBuilder) -> SerialBuilder) -> Self {
        let irq = Arc::new(CountingLine::new(TriggerMode::Edge));
        let dev = Arc::new(builder(Serial::builder(irq.clone())).build().unwrap());
        let bus = Bus::new();
        bus.insert(dev.range(), dev.clone()).unwrap();
        Self { bus, dev, irq }
    }
    fn out(&self, reg: u64, v: u8) {
        self.bus.write(BASE + reg, &[v]).unwrap();
    }
    fn inb(&self, reg: u64) -> u8 {
        let mut b = [0u8];
        self.bus.read(BASE + reg, &mut b).unwrap();
        b[0]
    }
    fn puts(&self, s: &[u8]) {
        for &b in s {
            self.out(THR, b);
        }
    }
    /// Reads what the receive FIFO holds now.
    fn read_available(&self) -> Vec<u8> {
        let mut v = Vec::new();
        while self.inb(LSR) & LSR_DR != 0 {
            v.push(self.inb(THR));
        }
        v
    }
    /// Reads received bytes until `n` arrived (guarded against hanging).
    fn read_n(&self, n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        wait_until(|| {
            v.extend(self.read_available());
            v.len() >= n
        });
        v
    }
}

/// Polls `f` until it holds; fails the test after a generous deadline instead of hanging.
fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "condition not reached");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn thr_writes_reach_sink_capture_and_line_callback() {
    let sink = SharedBuf::default();
    let capture = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let l2 = lines.clone();
    let s2 = sink.clone();
    let rig = Rig::new(|b| {
        b.output(SerialOutput::Writer(Box::new(s2)))
            .capture(capture.clone())
            .on_line(move |line| lock(&l2).push(line.to_owned()))
    });
    rig.puts(b"boot ok\r\nREPORT pass=3\npartial");
    assert_eq!(
        lock(&sink.0).as_slice(),
        b"boot ok\r\nREPORT pass=3\npartial"
    );
    assert_eq!(lock(&capture).as_slice(), lock(&sink.0).as_slice());
    assert_eq!(*lock(&lines), ["boot ok", "REPORT pass=3"]);
    assert_eq!(rig.dev.lost_output_bytes(), 0);
}

#[test]
fn failing_sink_counts_lost_bytes_and_capture_still_sees_them() {
    let capture = Arc::new(Mutex::new(Vec::new()));
    let rig = Rig::new(|b| {
        b.output(SerialOutput::Writer(Box::new(Broken)))
            .capture(capture.clone())
    });
    rig.puts(b"abc");
    assert_eq!(rig.dev.lost_output_bytes(), 3);
    assert_eq!(lock(&capture).as_slice(), b"abc");
}

#[test]
fn line_status_bits() {
    let rig = Rig::new(|b| b);
    assert_eq!(
        rig.inb(LSR),
        LSR_THRE | LSR_TEMT,
        "transmitter idle, no data"
    );
    assert_eq!(rig.dev.enqueue_input(b"xy"), 2);
    assert_eq!(rig.inb(LSR), LSR_THRE | LSR_TEMT | LSR_DR);
    assert_eq!(rig.inb(THR), b'x');
    assert_ne!(rig.inb(LSR) & LSR_DR, 0, "one byte left");
    assert_eq!(rig.inb(THR), b'y');
    assert_eq!(rig.inb(LSR) & LSR_DR, 0);
}

#[test]
fn receive_interrupt_via_line() {
    let rig = Rig::new(|b| b);
    rig.dev.enqueue_input(b"a");
    assert_eq!(rig.irq.count(), 0, "interrupts disabled by default");
    rig.inb(THR);
    rig.out(IER, 0x01); // received data available
    assert_eq!(rig.irq.count(), 0, "no data pending");
    rig.dev.enqueue_input(b"bc");
    assert_eq!(rig.irq.count(), 1);
    assert_eq!(rig.inb(IIR) & 0x0f, 0x04, "RDA pending");
    assert_eq!(rig.read_available(), b"bc");
    assert_eq!(rig.inb(IIR) & 0x0f, 0x01, "nothing pending");
    rig.dev.enqueue_input(b"d");
    assert_eq!(rig.irq.count(), 2);
    // THR empty interrupt when enabled.
    rig.read_available();
    rig.out(IER, 0x03);
    assert_eq!(rig.irq.count(), 3);
}

#[test]
fn dlab_selects_divisor_latch() {
    let sink = SharedBuf::default();
    let s2 = sink.clone();
    let rig = Rig::new(|b| b.output(SerialOutput::Writer(Box::new(s2))));
    rig.out(LCR, 0x80 | 0x03);
    rig.out(0, 0x01); // 115200 baud
    rig.out(1, 0x00);
    assert_eq!((rig.inb(0), rig.inb(1)), (0x01, 0x00));
    assert!(lock(&sink.0).is_empty(), "divisor writes are not output");
    rig.out(LCR, 0x03);
    assert_eq!(rig.inb(IER), 0, "IER untouched by the divisor write");
    rig.out(THR, b'z');
    assert_eq!(lock(&sink.0).as_slice(), b"z");
    rig.out(LCR, 0x83);
    assert_eq!(rig.inb(0), 0x01, "divisor kept");
}

#[test]
fn reader_input_respects_fifo_capacity() {
    let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let reader = Cursor::new(input.clone());
    let rig = Rig::new(|b| b.input(SerialInput::Reader(Box::new(reader))));
    rig.out(IER, 0x01);
    // The thread fills the FIFO to its capacity and waits for the guest to drain it.
    wait_until(|| rig.dev.fifo_capacity() == 0);
    let mut all: Vec<u8> = (0..FIFO_CAPACITY).map(|_| rig.inb(THR)).collect();
    assert_eq!(all, input[..FIFO_CAPACITY], "a full FIFO, nothing lost");
    all.extend(rig.read_n(input.len() - FIFO_CAPACITY));
    assert_eq!(all, input, "every byte, in order, none dropped");
    assert!(rig.irq.count() >= (input.len() / FIFO_CAPACITY) as u64);
}

#[test]
fn pause_holds_input_back_and_resume_delivers_it() {
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    let rig = Rig::new(|b| b.input(SerialInput::Reader(Box::new(guest_side))));
    rig.dev.pause().unwrap();
    assert_eq!(rig.dev.enqueue_input(b"no"), 0, "paused: FIFO unchanged");
    host.write_all(b"held").unwrap();
    let state = rig.dev.save().unwrap();
    assert!(state.in_buffer.is_empty());
    rig.dev.resume().unwrap();
    assert_eq!(rig.read_n(4), b"held");
    assert_eq!(rig.dev.enqueue_input(b"ok"), 2);
}

#[test]
fn loopback_mode() {
    let sink = SharedBuf::default();
    let s2 = sink.clone();
    let rig = Rig::new(|b| b.output(SerialOutput::Writer(Box::new(s2))));
    rig.out(MCR, 0x10);
    rig.out(THR, b'l');
    assert!(lock(&sink.0).is_empty());
    assert_eq!(rig.dev.enqueue_input(b"host"), 0, "line disconnected");
    assert_eq!(rig.read_available(), b"l");
}

#[test]
fn wide_and_odd_accesses() {
    let sink = SharedBuf::default();
    let s2 = sink.clone();
    let rig = Rig::new(|b| b.output(SerialOutput::Writer(Box::new(s2))));
    // A 2-byte write at THR is THR then IER, as on the ISA bus.
    rig.bus.write(BASE, &[b'w', 0x01]).unwrap();
    assert_eq!(lock(&sink.0).as_slice(), b"w");
    assert_eq!(rig.inb(IER), 0x01);
    rig.out(SCR, 0x5a);
    let mut four = [0u8; 4];
    rig.bus.read(BASE + 4, &mut four).unwrap();
    assert_eq!(four[3], 0x5a, "MCR, LSR, MSR, SCR");
    let mut buf = [0u8; 16];
    for offset in [0, 7, 8, 255, 256, u64::MAX - 3, u64::MAX] {
        rig.dev.read(BASE, offset, &mut buf);
        rig.dev.write(BASE, offset, &buf);
        rig.dev.read(BASE, offset, &mut []);
        rig.dev.write(BASE, offset, &[]);
    }
}

#[test]
fn file_sink_appends_and_names_the_path_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    std::fs::write(&path, b"old\n").unwrap();
    let rig = Rig::new(|b| b.output(SerialOutput::File(path.clone())));
    rig.puts(b"new\n");
    assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");

    let missing = dir.path().join("no/such/dir/console.log");
    let irq = Arc::new(CountingLine::new(TriggerMode::Edge));
    let err = Serial::builder(irq)
        .output(SerialOutput::File(missing.clone()))
        .build()
        .unwrap_err();
    assert!(matches!(&err, DevicesError::CreateFile { path, .. } if *path == missing));
    assert!(err.to_string().contains(&*missing.to_string_lossy()));
}

#[test]
fn socket_sink_and_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serial.sock");
    let rig = Rig::new(|b| b.output(SerialOutput::Socket(path.clone())));
    assert_eq!(rig.dev.socket_path(), Some(path.as_path()));

    // Output with no client is dropped and counted.
    rig.puts(b"lost");
    assert_eq!(rig.dev.lost_output_bytes(), 4);

    let mut client = UnixStream::connect(&path).unwrap();
    assert!(rig.dev.wait_for_socket_client(Duration::from_secs(30)));
    rig.puts(b"hello\n");
    let mut got = [0u8; 6];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello\n");

    // The client's input reaches the guest.
    client.write_all(b"ls\r").unwrap();
    assert_eq!(rig.read_n(3), b"ls\r");

    // A second client is closed while the first stays.
    let mut second = UnixStream::connect(&path).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(second.read(&mut buf).unwrap(), 0, "refused with EOF");
    assert!(rig.dev.socket_client_connected());

    // After the first leaves, a new client takes over.
    drop(client);
    wait_until(|| !rig.dev.socket_client_connected());
    let mut third = UnixStream::connect(&path).unwrap();
    assert!(rig.dev.wait_for_socket_client(Duration::from_secs(30)));
    rig.puts(b"again");
    let mut got = [0u8; 5];
    third.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"again");

    // Dropping the device closes the client and removes the socket file.
    let Rig { bus, dev, .. } = rig;
    drop(bus);
    drop(dev);
    assert_eq!(third.read(&mut buf).unwrap(), 0);
    assert!(!path.exists());
}

#[test]
fn socket_path_in_use_stale_and_occupied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let irq = || Arc::new(CountingLine::new(TriggerMode::Edge)) as Arc<dyn InterruptLine>;
    let first = Serial::builder(irq())
        .output(SerialOutput::Socket(path.clone()))
        .build()
        .unwrap();
    let err = Serial::builder(irq())
        .output(SerialOutput::Socket(path.clone()))
        .build()
        .unwrap_err();
    assert!(matches!(&err, DevicesError::SocketInUse { path: p } if *p == path));
    assert!(err.to_string().contains(&*path.to_string_lossy()));
    assert!(first.socket_path().is_some());
    drop(first);

    // A socket file nobody listens on (left by a crashed process) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let serial = Serial::builder(irq())
        .output(SerialOutput::Socket(path.clone()))
        .build()
        .unwrap();
    let _client = UnixStream::connect(&path).unwrap();
    assert!(serial.wait_for_socket_client(Duration::from_secs(30)));
    drop(serial);

    // A server dropped before it started (as when building the device fails after the
    // bind) removes its socket file.
    let server = socket::SocketServer::bind(&path).unwrap();
    assert!(path.exists());
    drop(server);
    assert!(
        !path.exists(),
        "an unstarted server removes its socket file"
    );

    // A regular file is never removed.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"keep").unwrap();
    let err = Serial::builder(irq())
        .output(SerialOutput::Socket(file.clone()))
        .build()
        .unwrap_err();
    assert!(matches!(&err, DevicesError::SocketBind { path: p, .. } if *p == file));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

#[test]
fn stdin_and_stdout_build() {
    // Under the test harness stdin is usually not a terminal, so nothing is read; either
    // way the device builds and works.
    let rig = Rig::new(|b| b.output(SerialOutput::Stdout).input(SerialInput::Stdin));
    rig.puts(b"");
    assert_eq!(rig.inb(LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
}

#[test]
fn save_restore_round_trip() {
    let rig = Rig::new(|b| b);
    rig.out(LCR, 0x83);
    rig.out(0, 0x01);
    rig.out(1, 0x02);
    rig.out(LCR, 0x1b);
    rig.out(IER, 0x01);
    rig.out(MCR, 0x0b);
    rig.out(SCR, 0x42);
    rig.dev.enqueue_input(b"pending");
    let state = rig.dev.save().unwrap();
    assert_eq!(state.in_buffer, b"pending");
    assert_eq!((state.baud_divisor_low, state.baud_divisor_high), (1, 2));

    let bytes = vmkit_migration::encode(&state).unwrap();
    let back: UartState = vmkit_migration::decode(&bytes).unwrap();
    assert_eq!(back, state);
    let irq = Arc::new(CountingLine::new(TriggerMode::Edge));
    let sink = SharedBuf::default();
    let restored = Arc::new(
        Serial::restore(
            Serial::builder(irq.clone()).output(SerialOutput::Writer(Box::new(sink.clone()))),
            &back,
        )
        .unwrap(),
    );
    assert_eq!(restored.save().unwrap(), state);
    assert_eq!(irq.count(), 1, "pending receive interrupt raised again");
    let r2 = Rig {
        bus: Bus::new(),
        dev: restored.clone(),
        irq,
    };
    r2.bus.insert(restored.range(), restored.clone()).unwrap();
    assert_eq!(r2.inb(SCR), 0x42);
    assert_eq!(r2.inb(LCR), 0x1b);
    assert_eq!(r2.read_available(), b"pending");
    r2.out(THR, b'!');
    assert_eq!(lock(&sink.0).as_slice(), b"!");

    let mut bad = state;
    bad.in_buffer = vec![0; FIFO_CAPACITY + 1];
    let irq = Arc::new(CountingLine::new(TriggerMode::Edge));
    assert!(matches!(
        Serial::restore(Serial::builder(irq), &bad),
        Err(MigrationError::InvalidState { .. })
    ));
}

#[test]
fn base_and_range() {
    let irq = Arc::new(CountingLine::new(TriggerMode::Edge));
    let s = Serial::builder(irq).base(COM2_BASE).build().unwrap();
    assert_eq!(s.base(), COM2_BASE);
    assert_eq!(s.range(), BusRange::new(0x2f8, 8).unwrap());
}
