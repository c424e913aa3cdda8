// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The virtio-console control protocol under arbitrary driver messages interleaved with
//! host port operations: nothing panics, and every message the device sends is well formed,
//! a device-to-driver event, and about a port that exists (or was just removed).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_virtio::devices::console::control::{
    event, ControlMessage, ControlState, PortStatus, CONTROL_HEADER_LEN, MAX_NAME_LEN,
};

#[derive(Arbitrary, Debug)]
enum Op {
    /// Raw bytes from the driver's control transmit queue.
    Raw(Vec<u8>),
    /// A well-formed header with arbitrary fields (more likely to reach deep states).
    Msg {
        id: u8,
        event: u8,
        value: u8,
        tail: Vec<u8>,
    },
    Add {
        id: u8,
        name: Option<String>,
        console: bool,
        connected: bool,
    },
    Remove(u8),
    Connected(u8, bool),
    Resize(u8, u16, u16),
    Reset,
}

fn check(out: &[Vec<u8>], state: &ControlState, removed: Option<u32>) {
    for m in out {
        let c = ControlMessage::parse(m).expect("header");
        assert!(m.len() >= CONTROL_HEADER_LEN);
        match c.event {
            event::DEVICE_REMOVE => assert_eq!(Some(c.id), removed),
            event::DEVICE_ADD
            | event::CONSOLE_PORT
            | event::RESIZE
            | event::PORT_OPEN
            | event::PORT_NAME => assert!(state.port(c.id).is_some(), "{c:?}"),
            other => panic!("device sent driver-side event {other}"),
        }
        if c.event == event::PORT_NAME {
            assert!(m.len() - CONTROL_HEADER_LEN <= MAX_NAME_LEN);
        }
        if c.event == event::RESIZE {
            assert_eq!(m.len(), CONTROL_HEADER_LEN + 4);
        }
        if c.event == event::DEVICE_ADD {
            assert!(state.device_ready());
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut s = ControlState::new();
    for op in ops {
        match op {
            Op::Raw(bytes) => {
                let out = s.handle_guest(&bytes);
                check(&out, &s, None);
            }
            Op::Msg {
                id,
                event,
                value,
                tail,
            } => {
                let mut bytes = ControlMessage {
                    id: u32::from(id % 8),
                    event: u16::from(event % 10),
                    value: u16::from(value % 3),
                }
                .encode(&tail);
                bytes.truncate(64);
                let out = s.handle_guest(&bytes);
                check(&out, &s, None);
            }
            Op::Add {
                id,
                name,
                console,
                connected,
            } => {
                let out = s.add_port(
                    u32::from(id % 8),
                    PortStatus {
                        name,
                        console,
                        host_connected: connected,
                        ..PortStatus::default()
                    },
                );
                check(&out, &s, None);
            }
            Op::Remove(id) => {
                let out = s.remove_port(u32::from(id % 8));
                check(&out, &s, Some(u32::from(id % 8)));
            }
            Op::Connected(id, c) => {
                let out = s.set_host_connected(u32::from(id % 8), c);
                check(&out, &s, None);
            }
            Op::Resize(id, cols, rows) => {
                let out = s.resize(u32::from(id % 8), cols, rows);
                check(&out, &s, None);
            }
            Op::Reset => s.reset(),
        }
    }
});
