// SPDX-License-Identifier: Apache-2.0 OR MIT
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::control::{event, ControlMessage};
use super::*;
use crate::devices::testutil::{atomic, memory, TestInterrupt, TestQueue, D};
use crate::ActiveQueue;

fn qbase(index: u16) -> u64 {
    0x1_0000 * (u64::from(index) + 1)
}

fn buf_addr(index: u16, n: u64) -> u64 {
    0x40_0000 + 0x1_0000 * u64::from(index) + 0x100 * n
}

fn ctrl(id: u32, ev: u16, value: u16) -> Vec<u8> {
    ControlMessage {
        id,
        event: ev,
        value,
    }
    .encode(&[])
}

/// Host ends of a port over a socket pair: (port backend, host side).
fn pair_backend() -> (PortBackend, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    let input: OwnedFd = a.try_clone().unwrap().into();
    let output: OwnedFd = a.into();
    (
        PortBackend::Fds {
            input: Some(input),
            output: Some(output),
        },
        b,
    )
}

struct Rig<'a> {
    mem: &'a GuestMem,
    queues: BTreeMap<u16, TestQueue<'a>>,
    posted: BTreeMap<u16, u64>,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMem, indices: &[u16]) -> Self {
        let queues = indices
            .iter()
            .map(|i| (*i, TestQueue::new(mem, qbase(*i), 16)))
            .collect();
        Rig {
            mem,
            queues,
            posted: BTreeMap::new(),
        }
    }

    /// Posts a 256-byte receive buffer on `index`.
    fn post_rx(&mut self, index: u16) {
        let n = self.posted.entry(index).or_insert(0);
        let addr = buf_addr(index, *n % 64);
        *n += 1;
        self.queues
            .get_mut(&index)
            .unwrap()
            .add(&[D(addr, 256, true)]);
    }

    /// Posts `data` for the device on `index`.
    fn post_tx(&mut self, index: u16, data: &[u8]) {
        let n = self.posted.entry(index).or_insert(0);
        let addr = buf_addr(index, *n % 64);
        *n += 1;
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        self.queues
            .get_mut(&index)
            .unwrap()
            .add(&[D(addr, data.len() as u32, false)]);
    }

    /// Used entries of a receive queue, as byte strings, from entry `from`.
    fn received(&self, index: u16, from: u16) -> Vec<Vec<u8>> {
        let q = &self.queues[&index];
        (from..q.used_idx())
            .map(|i| {
                let (_, len) = q.used(i);
                let addr = buf_addr(index, u64::from(i) % 64);
                let mut v = vec![0u8; len as usize];
                self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
                v
            })
            .collect()
    }

    fn active_queues(&self) -> Vec<ActiveQueue> {
        self.queues
            .iter()
            .map(|(i, q)| ActiveQueue {
                index: *i,
                queue: q.queue(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect()
    }
}

fn handler(
    mem: &GuestMem,
    rig: &Rig<'_>,
    multiport: bool,
    ports: Vec<(u32, PortStatus, PortBackend)>,
) -> (ConsoleHandler, Arc<TestInterrupt>) {
    let irq = Arc::new(TestInterrupt::default());
    let mut h = ConsoleHandler {
        mem: atomic(mem),
        interrupt: irq.clone(),
        multiport,
        queues: rig.queues.iter().map(|(i, q)| (*i, q.queue())).collect(),
        state: ControlState::new(),
        ports: BTreeMap::new(),
        ctrl_out: VecDeque::new(),
        commands: None,
    };
    for (id, st, be) in ports {
        h.add_port(id, st, PortIo::open(be).unwrap(), None);
    }
    (h, irq)
}

fn parse(msgs: &[Vec<u8>]) -> Vec<(u32, u16, u16)> {
    msgs.iter()
        .map(|m| {
            let c = ControlMessage::parse(m).unwrap();
            (c.id, c.event, c.value)
        })
        .collect()
}

#[test]
fn multiport_handshake_and_data() {
    let mem = memory();
    let mut rig = Rig::new(&mem, &[0, 1, 2, 3, 4, 5]);
    let (b0, mut host0) = pair_backend();
    let (b1, mut host1) = pair_backend();
    let (mut h, irq) = handler(
        &mem,
        &rig,
        true,
        vec![
            (
                0,
                PortStatus {
                    console: true,
                    size: Some((80, 25)),
                    ..Default::default()
                },
                b0,
            ),
            (
                1,
                PortStatus {
                    name: Some("org.vmkit.test".into()),
                    ..Default::default()
                },
                b1,
            ),
        ],
    );
    for _ in 0..8 {
        rig.post_rx(CONTROL_RX);
    }
    h.process_index(CONTROL_RX, None);
    rig.post_tx(CONTROL_TX, &ctrl(0, event::DEVICE_READY, 1));
    h.process_index(CONTROL_TX, None);
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 0)),
        vec![(0, event::DEVICE_ADD, 0), (1, event::DEVICE_ADD, 0)]
    );
    rig.post_tx(CONTROL_TX, &ctrl(0, event::PORT_READY, 1));
    rig.post_tx(CONTROL_TX, &ctrl(1, event::PORT_READY, 1));
    h.process_index(CONTROL_TX, None);
    let got = rig.received(CONTROL_RX, 2);
    assert_eq!(
        parse(&got),
        vec![
            (0, event::CONSOLE_PORT, 1),
            (0, event::RESIZE, 0),
            (0, event::PORT_OPEN, 1),
            (1, event::PORT_NAME, 1),
            (1, event::PORT_OPEN, 1),
        ]
    );
    assert_eq!(&got[1][8..], &[80, 0, 25, 0]);
    assert_eq!(&got[3][8..], b"org.vmkit.test");
    assert!(irq.count(VirtioInterruptType::Queue(CONTROL_RX)) >= 2);

    // Guest output on both ports reaches the right backend.
    rig.post_tx(tx_queue(1), b"hello port one");
    h.process_index(tx_queue(1), None);
    rig.post_tx(tx_queue(0), b"console!");
    h.process_index(tx_queue(0), None);
    let mut buf = [0u8; 14];
    host1.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello port one");
    let mut buf = [0u8; 8];
    host0.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"console!");
    host0.write_all(b"x").unwrap();

    // Guest opens the ports.
    rig.post_tx(CONTROL_TX, &ctrl(0, event::PORT_OPEN, 1));
    rig.post_tx(CONTROL_TX, &ctrl(1, event::PORT_OPEN, 1));
    h.process_index(CONTROL_TX, None);
    assert!(h.control_state().port(1).unwrap().guest_open);

    // Host input waits for receive buffers.
    h.push_input(1, b"queued until buffers arrive");
    assert_eq!(h.pending_input(1), 27);
    rig.post_rx(rx_queue(1));
    h.process_index(rx_queue(1), None);
    assert_eq!(h.pending_input(1), 0);
    assert_eq!(
        rig.received(rx_queue(1), 0),
        vec![b"queued until buffers arrive".to_vec()]
    );
    // Input larger than one buffer is split across buffers.
    h.push_input(0, &[7u8; 300]);
    rig.post_rx(0);
    rig.post_rx(0);
    h.process_index(0, None);
    let got = rig.received(0, 0);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].len() + got[1].len(), 300);
    assert!(!irq.needs_reset());
}

/// Address of the `avail_event` field of the test queue at `index` (16 entries).
fn avail_event_addr(index: u16) -> GuestAddress {
    let size = 16u64;
    let avail = qbase(index) + 16 * size;
    let used = (avail + 6 + 2 * size + 3) & !3;
    GuestAddress(used + 4 + 8 * size)
}

/// Whether a driver that moved the available index of `index` from `old` to `new` must
/// kick the device under `EVENT_IDX` (`vring_need_event`).
fn driver_must_kick(mem: &GuestMem, index: u16, old: u16, new: u16) -> bool {
    let event: u16 = mem.read_obj(avail_event_addr(index)).unwrap();
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn with_event_idx(h: &mut ConsoleHandler) {
    for (_, q) in &mut h.queues {
        q.set_event_idx(true);
    }
}

#[test]
fn event_idx_rx_asks_for_a_kick_when_input_waits_for_buffers() {
    let mem = memory();
    let mut rig = Rig::new(&mem, &[0, 1]);
    let (mut h, irq) = handler(
        &mem,
        &rig,
        false,
        vec![(0, PortStatus::default(), PortBackend::Null)],
    );
    with_event_idx(&mut h);
    let input: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    rig.post_rx(0);
    h.process_index(0, None);
    h.push_input(0, &input);
    assert_eq!(h.pending_input(0), 600 - 256);
    // The guest reposts buffers one at a time; each repost must be kicked, and the kick
    // delivers the next part.
    for n in 1..3u16 {
        rig.post_rx(0);
        assert!(
            driver_must_kick(&mem, 0, n, n + 1),
            "avail_event not armed after {n} buffers"
        );
        h.process_index(0, None);
    }
    assert_eq!(h.pending_input(0), 0);
    assert_eq!(rig.received(0, 0).concat(), input);
    // Nothing left to deliver: further buffers need no kick.
    rig.post_rx(0);
    assert!(!driver_must_kick(&mem, 0, 4, 5));
    assert!(!irq.needs_reset());
}

#[test]
fn event_idx_control_rx_asks_for_a_kick_when_messages_wait() {
    let mem = memory();
    let mut rig = Rig::new(&mem, &[0, 1, 2, 3]);
    let ports = (0..3)
        .map(|i| (i, PortStatus::default(), PortBackend::Null))
        .collect();
    let (mut h, irq) = handler(&mem, &rig, true, ports);
    with_event_idx(&mut h);
    rig.post_rx(CONTROL_RX);
    h.process_index(CONTROL_RX, None);
    rig.post_tx(CONTROL_TX, &ctrl(0, event::DEVICE_READY, 1));
    h.process_index(CONTROL_TX, None);
    assert_eq!(rig.queues[&CONTROL_RX].used_idx(), 1);
    for n in 1..3u16 {
        rig.post_rx(CONTROL_RX);
        assert!(
            driver_must_kick(&mem, CONTROL_RX, n, n + 1),
            "avail_event not armed after {n} buffers"
        );
        h.process_index(CONTROL_RX, None);
    }
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 0)),
        vec![
            (0, event::DEVICE_ADD, 0),
            (1, event::DEVICE_ADD, 0),
            (2, event::DEVICE_ADD, 0)
        ]
    );
    assert!(!irq.needs_reset());
}

#[test]
fn multiport_input_waits_until_the_guest_opens_the_port() {
    let mem = memory();
    let mut rig = Rig::new(&mem, &[0, 1, 2, 3, 4, 5]);
    let ports = (0..2)
        .map(|i| (i, PortStatus::default(), PortBackend::Null))
        .collect();
    let (mut h, irq) = handler(&mem, &rig, true, ports);
    rig.post_tx(CONTROL_TX, &ctrl(0, event::DEVICE_READY, 1));
    rig.post_tx(CONTROL_TX, &ctrl(1, event::PORT_READY, 1));
    h.process_index(CONTROL_TX, None);
    rig.post_rx(rx_queue(1));
    rig.post_rx(rx_queue(1));
    h.process_index(rx_queue(1), None);
    h.push_input(1, b"early");
    assert_eq!(rig.queues[&rx_queue(1)].used_idx(), 0, "port not open yet");
    assert_eq!(h.pending_input(1), 5);
    // PORT_OPEN 1 delivers what waited.
    rig.post_tx(CONTROL_TX, &ctrl(1, event::PORT_OPEN, 1));
    h.process_index(CONTROL_TX, None);
    assert_eq!(rig.received(rx_queue(1), 0), vec![b"early".to_vec()]);
    // Closed again: input waits once more.
    rig.post_tx(CONTROL_TX, &ctrl(1, event::PORT_OPEN, 0));
    h.process_index(CONTROL_TX, None);
    h.push_input(1, b"late");
    assert_eq!(rig.queues[&rx_queue(1)].used_idx(), 1);
    assert_eq!(h.pending_input(1), 4);
    assert!(!irq.needs_reset());
}

#[test]
fn malformed_control_messages_are_ignored() {
    let mem = memory();
    let mut rig = Rig::new(&mem, &[0, 1, 2, 3]);
    let (mut h, irq) = handler(
        &mem,
        &rig,
        true,
        vec![(0, PortStatus::default(), PortBackend::Null)],
    );
    for _ in 0..4 {
        rig.post_rx(CONTROL_RX);
    }
    rig.post_tx(CONTROL_TX, &[1, 2, 3]);
    rig.post_tx(CONTROL_TX, &ctrl(77, event::PORT_READY, 1));
    rig.post_tx(CONTROL_TX, &ctrl(0, 0x1234, 9));
    rig.post_tx(CONTROL_TX, &ctrl(0, event::DEVICE_ADD, 1));
    rig.post_tx(CONTROL_TX, &ctrl(0, event::PORT_READY, 7));
    // A chain with only writable buffers on the transmit queue.
    rig.queues
        .get_mut(&CONTROL_TX)
        .unwrap()
        .add(&[D(0x30_0000, 8, true)]);
    // A chain pointing outside guest memory.
    rig.queues
        .get_mut(&CONTROL_TX)
        .unwrap()
        .add(&[D(0xdead_0000_0000, 8, false)]);
    h.process_index(CONTROL_TX, None);
    assert_eq!(rig.queues[&CONTROL_TX].used_idx(), 7);
    assert_eq!(rig.queues[&CONTROL_RX].used_idx(), 0);
    assert!(!h.control_state().device_ready());
    // Data on a port queue of a port that does not exist is dropped.
    let mut rig2 = Rig::new(&mem, &[0, 1, 2, 3, 6, 7]);
    let (mut h2, _) = handler(&mem, &rig2, true, vec![]);
    rig2.post_tx(tx_queue(2), b"nobody home");
    h2.process_index(tx_queue(2), None);
    assert_eq!(rig2.queues[&tx_queue(2)].used_idx(), 1);
    assert!(!irq.needs_reset());
}

#[test]
fn queue_roles() {
    assert_eq!(queue_role(0), QueueRole::Rx(0));
    assert_eq!(queue_role(1), QueueRole::Tx(0));
    assert_eq!(queue_role(2), QueueRole::ControlRx);
    assert_eq!(queue_role(3), QueueRole::ControlTx);
    assert_eq!(queue_role(4), QueueRole::Rx(1));
    assert_eq!(queue_role(5), QueueRole::Tx(1));
    assert_eq!(queue_role(9), QueueRole::Tx(3));
    for p in 0..10 {
        assert_eq!(queue_role(rx_queue(p)), QueueRole::Rx(p));
        assert_eq!(queue_role(tx_queue(p)), QueueRole::Tx(p));
    }
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn activate(
    console: &mut Console,
    mem: &GuestMem,
    rig: &Rig<'_>,
) -> (Arc<TestInterrupt>, Vec<(u16, EventFd)>) {
    let irq = Arc::new(TestInterrupt::default());
    let queues = rig.active_queues();
    let kicks = queues
        .iter()
        .map(|q| (q.index, q.notify.try_clone().unwrap()))
        .collect();
    console
        .activate(ActivateContext {
            mem: atomic(mem),
            queues,
            interrupt: irq.clone(),
            acked_features: console.acked_features(),
        })
        .unwrap();
    (irq, kicks)
}

fn kick(kicks: &[(u16, EventFd)], index: u16) {
    kicks
        .iter()
        .find(|k| k.0 == index)
        .unwrap()
        .1
        .write(1)
        .unwrap();
}

#[test]
fn single_port_threaded_reset_and_reactivate() {
    let mem = memory();
    let mut console = Console::new(ConsoleConfig::default()).unwrap();
    let (b0, mut host0) = pair_backend();
    let info = console.add_port(PortConfig::new(b0)).unwrap();
    assert_eq!(info.id, 0);
    for round in 0..2u8 {
        console
            .negotiate_features(features::VERSION_1 | feature::SIZE)
            .unwrap();
        let mut rig = Rig::new(&mem, &[0, 1]);
        let (irq, kicks) = activate(&mut console, &mem, &rig);
        // Host input, then the guest posts a buffer.
        host0.write_all(&[b'a' + round; 5]).unwrap();
        rig.post_rx(0);
        kick(&kicks, 0);
        assert!(
            irq.wait_for(VirtioInterruptType::Queue(0), 1),
            "round {round}"
        );
        assert_eq!(rig.received(0, 0), vec![vec![b'a' + round; 5]]);
        // Guest output.
        rig.post_tx(1, b"out");
        kick(&kicks, 1);
        let mut buf = [0u8; 3];
        host0.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"out");
        console.reset();
    }
}

#[test]
fn hotplug_resize_and_socket_port() {
    let mem = memory();
    let dir = tempfile::tempdir().unwrap();
    let mut console = Console::new(ConsoleConfig {
        max_ports: 4,
        ..ConsoleConfig::default()
    })
    .unwrap();
    console
        .add_port(PortConfig {
            console: true,
            ..PortConfig::new(PortBackend::Null)
        })
        .unwrap();
    console
        .negotiate_features(console.device_features())
        .unwrap();
    let mut rig = Rig::new(&mem, &[0, 1, 2, 3, 4, 5, 6, 7]);
    for _ in 0..16 {
        rig.post_rx(CONTROL_RX);
    }
    let (irq, kicks) = activate(&mut console, &mem, &rig);
    rig.post_tx(CONTROL_TX, &ctrl(0, event::DEVICE_READY, 1));
    kick(&kicks, CONTROL_TX);
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 1));
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 0)),
        vec![(0, event::DEVICE_ADD, 0)]
    );

    // Hot-add a socket port: DEVICE_ADD to the running driver.
    let sock = dir.path().join("port.sock");
    let info = console
        .add_port(PortConfig {
            name: Some("agent".into()),
            ..PortConfig::new(PortBackend::UnixSocket(sock.clone()))
        })
        .unwrap();
    assert_eq!(info.id, 1);
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 2));
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 1)),
        vec![(1, event::DEVICE_ADD, 0)]
    );
    rig.post_tx(CONTROL_TX, &ctrl(1, event::PORT_READY, 1));
    kick(&kicks, CONTROL_TX);
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 3));
    // No client yet: only the name.
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 2)),
        vec![(1, event::PORT_NAME, 1)]
    );
    // A client connects: PORT_OPEN 1; data flows both ways.
    let mut client = UnixStream::connect(&sock).unwrap();
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 4));
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 3)),
        vec![(1, event::PORT_OPEN, 1)]
    );
    rig.post_tx(CONTROL_TX, &ctrl(1, event::PORT_OPEN, 1));
    kick(&kicks, CONTROL_TX);
    client.write_all(b"ping").unwrap();
    rig.post_rx(rx_queue(1));
    kick(&kicks, rx_queue(1));
    assert!(wait_until(|| rig.queues[&rx_queue(1)].used_idx() >= 1));
    assert_eq!(rig.received(rx_queue(1), 0), vec![b"ping".to_vec()]);
    rig.post_tx(tx_queue(1), b"pong");
    kick(&kicks, tx_queue(1));
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    // The client leaves: PORT_OPEN 0.
    drop(client);
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 5));
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 4)),
        vec![(1, event::PORT_OPEN, 0)]
    );

    // Resize the console: RESIZE is sent once the port is ready; the config changes.
    rig.post_tx(CONTROL_TX, &ctrl(0, event::PORT_READY, 1));
    kick(&kicks, CONTROL_TX);
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 8));
    console.resize(0, 132, 43).unwrap();
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 9));
    let last = rig.received(CONTROL_RX, 8);
    assert_eq!(parse(&last), vec![(0, event::RESIZE, 0)]);
    assert_eq!(&last[0][8..], &[132, 0, 43, 0]);
    let mut cfg = [0u8; 4];
    console.read_config(0, &mut cfg);
    assert_eq!(cfg, [132, 0, 43, 0]);
    assert!(irq.count(VirtioInterruptType::Config) >= 1);

    // Hot-remove.
    console.remove_port(1).unwrap();
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 10));
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 9)),
        vec![(1, event::DEVICE_REMOVE, 0)]
    );
    assert!(console.remove_port(1).is_err());
    assert!(!sock.exists(), "socket file removed with the port");

    // Save while paused, restore into a fresh device with the same ports.
    console.pause().unwrap();
    let saved = console.save_state().unwrap();
    console.resume().unwrap();
    let mut other = Console::new(ConsoleConfig {
        max_ports: 4,
        ..ConsoleConfig::default()
    })
    .unwrap();
    assert!(other.restore_state(&saved).is_err(), "port list differs");
    other.add_port(PortConfig::new(PortBackend::Null)).unwrap();
    other.restore_state(&saved).unwrap();
    assert!(other.idle_state.device_ready());
    assert!(other.idle_state.port(0).unwrap().guest_ready);
    console.reset();
    assert!(!irq.needs_reset());
}

#[test]
fn socket_write_failure_disconnects_the_client() {
    let mem = memory();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("port.sock");
    let mut console = Console::new(ConsoleConfig {
        max_ports: 2,
        ..ConsoleConfig::default()
    })
    .unwrap();
    console
        .add_port(PortConfig::new(PortBackend::Null))
        .unwrap();
    console
        .add_port(PortConfig::new(PortBackend::UnixSocket(sock.clone())))
        .unwrap();
    console
        .negotiate_features(console.device_features())
        .unwrap();
    let mut rig = Rig::new(&mem, &[0, 1, 2, 3, 4, 5]);
    for _ in 0..16 {
        rig.post_rx(CONTROL_RX);
    }
    rig.post_tx(CONTROL_TX, &ctrl(0, event::DEVICE_READY, 1));
    rig.post_tx(CONTROL_TX, &ctrl(1, event::PORT_READY, 1));
    let (irq, kicks) = activate(&mut console, &mem, &rig);
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 2));
    let client = UnixStream::connect(&sock).unwrap();
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 3));
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 2)),
        vec![(1, event::PORT_OPEN, 1)]
    );
    // The client stops receiving (without hanging up its sending side): writes fail.
    client.shutdown(std::net::Shutdown::Read).unwrap();
    rig.post_tx(tx_queue(1), b"nobody listens");
    kick(&kicks, tx_queue(1));
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 4));
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 3)),
        vec![(1, event::PORT_OPEN, 0)]
    );
    // The next client is announced.
    let _next = UnixStream::connect(&sock).unwrap();
    assert!(wait_until(|| rig.queues[&CONTROL_RX].used_idx() >= 5));
    assert_eq!(
        parse(&rig.received(CONTROL_RX, 4)),
        vec![(1, event::PORT_OPEN, 1)]
    );
    drop(client);
    console.reset();
    assert!(!irq.needs_reset());
}

const BIG_CHUNK: usize = 32 * 1024;

/// Guest output chain `i` of the back-pressure tests: `BIG_CHUNK` bytes in one of 8 slots
/// (at most one chain is outstanding at a time).
fn big_chunk(i: usize) -> Vec<u8> {
    (0..BIG_CHUNK).map(|j| (i * 7 + j / 3) as u8).collect()
}

fn post_big(rig: &mut Rig<'_>, index: u16, i: usize) {
    let addr = 0x80_0000 + (i as u64 % 8) * BIG_CHUNK as u64;
    rig.mem
        .write_slice(&big_chunk(i), GuestAddress(addr))
        .unwrap();
    rig.queues
        .get_mut(&index)
        .unwrap()
        .add(&[D(addr, BIG_CHUNK as u32, false)]);
}

/// Host end of an output-only port over a socket pair whose device side would block when
/// the host stops reading (a write timeout turns a blocking write into a lossy error
/// instead of a hung test).
fn output_pair() -> (PortBackend, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    (
        PortBackend::Fds {
            input: None,
            output: Some(a.into()),
        },
        b,
    )
}

#[test]
fn output_back_pressure_keeps_every_byte() {
    let mem = memory();
    let mut rig = Rig::new(&mem, &[0, 1]);
    let (backend, mut host) = output_pair();
    let (mut h, irq) = handler(&mem, &rig, false, vec![(0, PortStatus::default(), backend)]);
    const TOTAL: usize = 48;
    // The host does not read: the device buffers, then stops taking chains.
    let mut posted = 0usize;
    while posted < TOTAL {
        post_big(&mut rig, 1, posted);
        posted += 1;
        h.process_index(1, None);
        if usize::from(rig.queues[&1].used_idx()) < posted {
            break;
        }
    }
    assert!(posted < TOTAL, "the transmit queue was never held back");
    assert!(h.pending_output(0) >= OUTPUT_BUFFER_CAP);
    assert!(h.pending_output(0) < OUTPUT_BUFFER_CAP + BIG_CHUNK);
    // The host reads; every byte arrives, in order.
    host.set_nonblocking(true).unwrap();
    let want: Vec<u8> = (0..TOTAL).flat_map(big_chunk).collect();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..100_000 {
        if got.len() >= want.len() {
            break;
        }
        match host.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.process_index(1, None);
        if posted < TOTAL && usize::from(rig.queues[&1].used_idx()) == posted {
            post_big(&mut rig, 1, posted);
            posted += 1;
        }
    }
    assert_eq!(got.len(), want.len());
    assert!(got == want, "output corrupted or reordered");
    assert_eq!(usize::from(rig.queues[&1].used_idx()), TOTAL);
    assert_eq!(h.pending_output(0), 0);
    assert!(!irq.needs_reset());
}

#[test]
fn threaded_output_resumes_when_the_backend_drains() {
    let mem = memory();
    let mut console = Console::new(ConsoleConfig::default()).unwrap();
    let (backend, mut host) = output_pair();
    console.add_port(PortConfig::new(backend)).unwrap();
    console.negotiate_features(features::VERSION_1).unwrap();
    let mut rig = Rig::new(&mem, &[0, 1]);
    let (irq, kicks) = activate(&mut console, &mem, &rig);
    const TOTAL: usize = 48;
    let consumed = |rig: &Rig<'_>, n: usize| {
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if usize::from(rig.queues[&1].used_idx()) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    };
    let mut posted = 0usize;
    while posted < TOTAL {
        post_big(&mut rig, 1, posted);
        posted += 1;
        kick(&kicks, 1);
        if !consumed(&rig, posted) {
            break;
        }
    }
    assert!(posted < TOTAL, "the transmit queue was never held back");
    // Pausing and resuming a held-back port neither hangs nor loses the buffer.
    console.pause().unwrap();
    console.resume().unwrap();
    let want: Vec<u8> = (0..TOTAL).flat_map(big_chunk).collect();
    let len = want.len();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; len];
        host.read_exact(&mut got).unwrap();
        got
    });
    // Nothing kicks the queue for the held-back chain: the device resumes by itself once
    // the backend is writable.
    while posted < TOTAL {
        assert!(
            wait_until(|| usize::from(rig.queues[&1].used_idx()) >= posted),
            "stuck at chain {posted}"
        );
        post_big(&mut rig, 1, posted);
        posted += 1;
        kick(&kicks, 1);
    }
    assert!(wait_until(
        || usize::from(rig.queues[&1].used_idx()) >= TOTAL
    ));
    let got = reader.join().unwrap();
    assert!(got == want, "output corrupted or reordered");
    console.reset();
    assert!(!irq.needs_reset());
}

#[test]
fn stdio_output_leaves_the_vmm_stdout_blocking() {
    let io = PortIo::open(PortBackend::Stdio).unwrap();
    // SAFETY: F_GETFL on a descriptor number; no pointers involved.
    let flags = unsafe { libc::fcntl(libc::STDOUT_FILENO, libc::F_GETFL) };
    assert!(flags >= 0);
    assert_eq!(flags & libc::O_NONBLOCK, 0, "stdout was made non-blocking");
    drop(io);
}

#[test]
fn file_and_pty_backends() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.log");
    let inp = dir.path().join("in.txt");
    std::fs::write(&inp, b"from a file").unwrap();
    let mem = memory();
    let mut console = Console::new(ConsoleConfig::default()).unwrap();
    console
        .add_port(PortConfig::new(PortBackend::File {
            output: out.clone(),
            input: Some(inp),
        }))
        .unwrap();
    let pty = console.add_port(PortConfig::new(PortBackend::Pty)).unwrap();
    let pty_path = pty.pty_path.clone().unwrap();
    assert!(pty_path.exists(), "{}", pty_path.display());
    console
        .negotiate_features(console.device_features())
        .unwrap();
    let mut rig = Rig::new(&mem, &[0, 1, 2, 3, 4, 5]);
    rig.post_rx(0);
    // The driver opens both ports (input is only delivered to open ports).
    rig.post_tx(CONTROL_TX, &ctrl(0, event::PORT_OPEN, 1));
    rig.post_tx(CONTROL_TX, &ctrl(1, event::PORT_OPEN, 1));
    let (irq, kicks) = activate(&mut console, &mem, &rig);
    // File input is delivered as soon as there is a buffer.
    assert!(irq.wait_for(VirtioInterruptType::Queue(0), 1));
    assert_eq!(rig.received(0, 0), vec![b"from a file".to_vec()]);
    rig.post_tx(1, b"to a file");
    kick(&kicks, 1);
    assert!(wait_until(|| std::fs::read(&out).unwrap() == b"to a file"));
    // The PTY: guest output is readable on the slave, slave input reaches the guest.
    let mut slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty_path)
        .unwrap();
    rig.post_tx(tx_queue(1), b"tty out");
    kick(&kicks, tx_queue(1));
    let mut buf = [0u8; 7];
    slave.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"tty out");
    slave.write_all(b"tty in").unwrap();
    rig.post_rx(rx_queue(1));
    kick(&kicks, rx_queue(1));
    assert!(wait_until(|| rig.queues[&rx_queue(1)].used_idx() >= 1));
    assert_eq!(rig.received(rx_queue(1), 0), vec![b"tty in".to_vec()]);
    console.reset();
}

#[test]
fn construction_and_port_errors() {
    assert!(Console::new(ConsoleConfig {
        max_ports: 0,
        ..ConsoleConfig::default()
    })
    .is_err());
    assert!(Console::new(ConsoleConfig {
        queue_size: 3,
        ..ConsoleConfig::default()
    })
    .is_err());
    let mut c = Console::new(ConsoleConfig {
        max_ports: 1,
        ..ConsoleConfig::default()
    })
    .unwrap();
    let err = c
        .add_port(PortConfig::new(PortBackend::File {
            output: "/nonexistent-dir/x.log".into(),
            input: None,
        }))
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent-dir/x.log"), "{err}");
    c.add_port(PortConfig::new(PortBackend::Null)).unwrap();
    assert!(matches!(
        c.add_port(PortConfig::new(PortBackend::Null)),
        Err(ConsoleError::NoFreePort(1))
    ));
    assert!(c.resize(3, 1, 1).is_err());
    assert_eq!(c.queue_max_sizes().len(), 4);
    let mut cfg = [0u8; 12];
    c.read_config(0, &mut cfg);
    assert_eq!(cfg, [80, 0, 25, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    // Activation without the required queues fails.
    let mem = memory();
    c.negotiate_features(c.device_features()).unwrap();
    let rig = Rig::new(&mem, &[0, 1]);
    let r = c.activate(ActivateContext {
        mem: atomic(&mem),
        queues: rig.active_queues(),
        interrupt: Arc::new(TestInterrupt::default()),
        acked_features: c.acked_features(),
    });
    assert!(r.is_err(), "MULTIPORT needs the control queues");
}

fn conformance_device() -> Box<dyn VirtioDevice> {
    let mut c = Console::new(ConsoleConfig {
        max_ports: 2,
        ..ConsoleConfig::default()
    })
    .unwrap();
    c.add_port(PortConfig {
        console: true,
        ..PortConfig::new(PortBackend::Null)
    })
    .unwrap();
    c.add_port(PortConfig::new(PortBackend::Null)).unwrap();
    Box::new(c)
}

crate::virtio_conformance_tests!(
    conformance,
    conformance_device(),
    vec![
        crate::conformance::Probe::readable(1, &[b"console output"]),
        crate::conformance::Probe::readable(tx_queue(1), &[b"port one"]),
        crate::conformance::Probe::readable(CONTROL_TX, &[&[0, 0, 0, 0, 0, 0, 1, 0]]),
    ]
);

/// Golden file of a version-1 [`ConsoleState`] (before queued control messages and buffered
/// port data were saved). Written once by `regenerate_golden_v1` (run by hand with
/// `cargo test -p vmkit-virtio golden_v1 -- --ignored`) from a version-1 build; never
/// regenerate it: a new version gets a new file, and this one must keep decoding.
fn golden_path(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/devices/console/golden")
        .join(name)
}

/// The deterministic version-1 state stored in `golden/console_state_v1.cbor` (the
/// version-2 fields empty, as version 1 decodes).
fn expected_v1() -> ConsoleState {
    ConsoleState {
        acked_features: features::VERSION_1 | feature::SIZE | feature::MULTIPORT,
        max_ports: 4,
        size: (132, 43),
        device_ready: true,
        ports: vec![
            SavedPort {
                id: 0,
                name: None,
                console: true,
                guest_ready: true,
                guest_open: true,
                pending_input: Vec::new(),
                pending_output: Vec::new(),
            },
            SavedPort {
                id: 2,
                name: Some("org.vmkit.agent".into()),
                console: false,
                guest_ready: true,
                guest_open: false,
                pending_input: Vec::new(),
                pending_output: Vec::new(),
            },
        ],
        control_queue: Vec::new(),
    }
}

/// Writes the version-1 golden file. Run once, by hand; see [`golden_path`].
#[test]
#[ignore = "writes golden/console_state_v1.cbor; run by hand only when creating the file"]
fn regenerate_golden_v1() {
    assert_eq!(
        ConsoleState::VERSION,
        1,
        "the v1 golden file must be written by a v1 build"
    );
    let path = golden_path("console_state_v1.cbor");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, vmkit_migration::encode(&expected_v1()).unwrap()).unwrap();
}

#[test]
fn golden_v1_decodes_to_the_expected_state() {
    let path = golden_path("console_state_v1.cbor");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let state: ConsoleState = vmkit_migration::decode(&bytes).expect("version-1 golden decodes");
    assert_eq!(state, expected_v1());
    // The file really is version 1: a reader that knows only version 1 accepts it.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct V1Probe {}
    impl VersionedState for V1Probe {
        const NAME: &'static str = ConsoleState::NAME;
        const VERSION: u16 = 1;
    }
    assert!(vmkit_migration::decode::<V1Probe>(&bytes).is_ok());
    assert!(
        vmkit_migration::decode::<V1Probe>(&vmkit_migration::encode(&expected_v1()).unwrap())
            .is_err()
    );
    // A version-1 state restores: nothing queued, nothing buffered.
    let mut console = Console::new(ConsoleConfig {
        max_ports: 4,
        ..ConsoleConfig::default()
    })
    .unwrap();
    for _ in 0..3 {
        console
            .add_port(PortConfig::new(PortBackend::Null))
            .unwrap();
    }
    console.remove_port(1).unwrap();
    console
        .restore_state(&encode_section(&state).unwrap())
        .unwrap();
    assert!(console.idle_ctrl_out.is_empty());
    assert!(console.idle_buffers.is_empty());
    assert!(console.idle_state.port(0).unwrap().guest_open);
}

#[test]
fn restore_rejects_malformed_buffers() {
    let mut console = Console::new(ConsoleConfig::default()).unwrap();
    console
        .add_port(PortConfig::new(PortBackend::Null))
        .unwrap();
    let mut s = ConsoleState {
        acked_features: features::VERSION_1 | feature::MULTIPORT,
        max_ports: ConsoleConfig::default().max_ports,
        size: (80, 25),
        device_ready: true,
        ports: vec![SavedPort {
            id: 0,
            name: None,
            console: false,
            guest_ready: true,
            guest_open: true,
            pending_input: Vec::new(),
            pending_output: Vec::new(),
        }],
        control_queue: vec![vec![0; 4]],
    };
    assert!(console.restore_state(&encode_section(&s).unwrap()).is_err());
    s.control_queue = vec![ctrl(0, event::PORT_OPEN, 1)];
    s.ports[0].pending_output = vec![0; OUTPUT_BUFFER_CAP + MAX_CHAIN_BYTES + 1];
    assert!(console.restore_state(&encode_section(&s).unwrap()).is_err());
    s.ports[0].pending_output = b"out".to_vec();
    console.restore_state(&encode_section(&s).unwrap()).unwrap();
    assert_eq!(console.idle_ctrl_out.len(), 1);
    // A reset forgets what was restored.
    console.reset();
    assert!(console.idle_ctrl_out.is_empty());
    assert!(console.idle_buffers.is_empty());
}

/// Runs `f` on the paused worker's handler.
fn with_parked<T>(console: &mut Console, f: impl FnOnce(&ConsoleHandler) -> T) -> T {
    console.pause().unwrap();
    let r = f(console.workers.parked().next().unwrap());
    console.resume().unwrap();
    r
}

/// Port 1 of the migration test: input from one socket pair, output (never read by the
/// host while the source runs) to another. Returns (backend, input host end, output host
/// end).
fn migration_port() -> (PortBackend, UnixStream, UnixStream) {
    let (a, input_host) = UnixStream::pair().unwrap();
    let (c, output_host) = UnixStream::pair().unwrap();
    c.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    (
        PortBackend::Fds {
            input: Some(a.into()),
            output: Some(c.into()),
        },
        input_host,
        output_host,
    )
}

fn read_available(s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    got
}

#[test]
fn snapshot_keeps_queued_control_messages_and_port_buffers() {
    let config = ConsoleConfig {
        max_ports: 4,
        ..ConsoleConfig::default()
    };
    // Source: the driver opened port 1 but posted no receive buffers anywhere, and the
    // host end of port 1 does not read its output.
    let mem = memory();
    let mut console = Console::new(config.clone()).unwrap();
    console
        .add_port(PortConfig {
            console: true,
            ..PortConfig::new(PortBackend::Null)
        })
        .unwrap();
    let (backend, mut input_host, mut output_host) = migration_port();
    console.add_port(PortConfig::new(backend)).unwrap();
    console
        .negotiate_features(console.device_features())
        .unwrap();
    let mut rig = Rig::new(&mem, &[0, 1, 2, 3, 4, 5]);
    let (irq, kicks) = activate(&mut console, &mem, &rig);
    for m in [
        ctrl(0, event::DEVICE_READY, 1),
        ctrl(0, event::PORT_READY, 1),
        ctrl(1, event::PORT_READY, 1),
        ctrl(1, event::PORT_OPEN, 1),
    ] {
        rig.post_tx(CONTROL_TX, &m);
    }
    kick(&kicks, CONTROL_TX);
    assert!(wait_until(|| rig.queues[&CONTROL_TX].used_idx() >= 4));
    input_host.write_all(b"typed before migration").unwrap();
    assert!(wait_until(|| with_parked(&mut console, |h| h
        .pending_input(1))
        == 22));
    // Guest output until the device holds the transmit queue back.
    let tx = tx_queue(1);
    let consumed = |rig: &Rig<'_>, n: usize| {
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if usize::from(rig.queues[&tx].used_idx()) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    };
    let mut posted = 0usize;
    while posted < 64 {
        post_big(&mut rig, tx, posted);
        posted += 1;
        kick(&kicks, tx);
        if !consumed(&rig, posted) {
            break;
        }
    }
    assert!(posted < 64, "the transmit queue was never held back");

    console.pause().unwrap();
    let saved = console.save_state().unwrap();
    let taken = usize::from(rig.queues[&tx].used_idx());
    let state: ConsoleState = decode_section(&saved).unwrap();
    assert_eq!(saved.version, 2);
    assert_eq!(
        parse(&state.control_queue),
        vec![
            (0, event::DEVICE_ADD, 0),
            (1, event::DEVICE_ADD, 0),
            (0, event::CONSOLE_PORT, 1),
            (0, event::RESIZE, 0),
            (0, event::PORT_OPEN, 1),
            (1, event::PORT_OPEN, 1),
        ]
    );
    assert_eq!(state.ports[1].pending_input, b"typed before migration");
    assert!(state.ports[1].pending_output.len() >= OUTPUT_BUFFER_CAP);
    assert!(state.ports[0].pending_input.is_empty() && state.ports[0].pending_output.is_empty());
    // What the source's host end got before the snapshot, plus the saved output, is every
    // chain the device consumed.
    let mut out = read_available(&mut output_host);
    out.extend_from_slice(&state.ports[1].pending_output);
    assert!(out == (0..taken).flat_map(big_chunk).collect::<Vec<u8>>());
    console.reset();
    assert!(!irq.needs_reset());
    drop(console);

    // Destination: a fresh device with the same ports and new host ends.
    let mem2 = memory();
    let mut other = Console::new(config).unwrap();
    other
        .add_port(PortConfig {
            console: true,
            ..PortConfig::new(PortBackend::Null)
        })
        .unwrap();
    let (backend, _input_host2, mut output_host2) = migration_port();
    other.add_port(PortConfig::new(backend)).unwrap();
    other.restore_state(&saved).unwrap();
    let mut rig2 = Rig::new(&mem2, &[0, 1, 2, 3, 4, 5]);
    let out_len = state.ports[1].pending_output.len();
    // A read timeout turns missing output into a failure rather than a hang.
    output_host2
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; out_len];
        output_host2.read_exact(&mut got).map(|()| got)
    });
    let (irq2, kicks2) = activate(&mut other, &mem2, &rig2);
    // The guest posts buffers: it receives exactly the queued messages and input.
    for _ in 0..8 {
        rig2.post_rx(CONTROL_RX);
    }
    kick(&kicks2, CONTROL_RX);
    rig2.post_rx(rx_queue(1));
    kick(&kicks2, rx_queue(1));
    assert!(wait_until(|| rig2.queues[&CONTROL_RX].used_idx() >= 6));
    assert!(wait_until(|| rig2.queues[&rx_queue(1)].used_idx() >= 1));
    assert_eq!(rig2.received(CONTROL_RX, 0), state.control_queue);
    assert_eq!(
        rig2.received(rx_queue(1), 0),
        vec![b"typed before migration".to_vec()]
    );
    // The host end gets the buffered output.
    let got = reader
        .join()
        .unwrap()
        .expect("restored output reaches the host end");
    assert!(got == state.ports[1].pending_output);
    // Nothing more: no duplicate messages, input or output.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig2.queues[&CONTROL_RX].used_idx(), 6);
    assert_eq!(rig2.queues[&rx_queue(1)].used_idx(), 1);
    with_parked(&mut other, |h| {
        assert_eq!(h.pending_input(1), 0);
        assert_eq!(h.pending_output(1), 0);
    });
    other.reset();
    assert!(!irq2.needs_reset());
}
