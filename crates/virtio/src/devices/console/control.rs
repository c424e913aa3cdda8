// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The virtio-console control protocol (virtio 1.2, 5.3.6.2) as a pure state machine:
//! guest control messages in, host control messages out. No I/O, no queues, so it is
//! tested and fuzzed directly.

use std::collections::BTreeMap;

/// Control events (`virtio_console_control.event`).
pub mod event {
    /// Driver → device: the driver is ready (value 1) or failed (0).
    pub const DEVICE_READY: u16 = 0;
    /// Device → driver: a port was added.
    pub const DEVICE_ADD: u16 = 1;
    /// Device → driver: a port was removed.
    pub const DEVICE_REMOVE: u16 = 2;
    /// Driver → device: a port is ready (1) or failed (0).
    pub const PORT_READY: u16 = 3;
    /// Device → driver: this port is a console.
    pub const CONSOLE_PORT: u16 = 4;
    /// Device → driver: console size changed (followed by cols, rows).
    pub const RESIZE: u16 = 5;
    /// Both ways: the port was opened (1) or closed (0) on the sender's side.
    pub const PORT_OPEN: u16 = 6;
    /// Device → driver: the port's name (followed by the name bytes).
    pub const PORT_NAME: u16 = 7;
}

/// Size of `virtio_console_control`.
pub const CONTROL_HEADER_LEN: usize = 8;
/// Longest port name sent to the driver.
pub const MAX_NAME_LEN: usize = 255;

/// A control message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlMessage {
    /// Port id.
    pub id: u32,
    /// Event ([`event`]).
    pub event: u16,
    /// Value.
    pub value: u16,
}

impl ControlMessage {
    /// Parses the header at the start of `bytes` (`None` if shorter than 8 bytes).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..CONTROL_HEADER_LEN)?;
        Some(ControlMessage {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        })
    }

    /// Encodes the header followed by `payload`.
    pub fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(CONTROL_HEADER_LEN + payload.len());
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.event.to_le_bytes());
        v.extend_from_slice(&self.value.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }
}

fn msg(id: u32, event: u16, value: u16) -> Vec<u8> {
    ControlMessage { id, event, value }.encode(&[])
}

/// What the control protocol knows about one port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortStatus {
    /// Name announced with `PORT_NAME`.
    pub name: Option<String>,
    /// Announced as a console with `CONSOLE_PORT`.
    pub console: bool,
    /// The host side is connected (a socket client, or always for stdio/file/pty).
    pub host_connected: bool,
    /// The driver reported `PORT_READY`.
    pub guest_ready: bool,
    /// The driver has the port open (`PORT_OPEN` 1).
    pub guest_open: bool,
    /// Console size (cols, rows), announced with `RESIZE` for console ports.
    pub size: Option<(u16, u16)>,
}

/// The device side of the control protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlState {
    device_ready: bool,
    ports: BTreeMap<u32, PortStatus>,
}

impl ControlState {
    /// A state with no ports and the driver not ready yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the driver sent `DEVICE_READY` 1.
    pub fn device_ready(&self) -> bool {
        self.device_ready
    }

    /// Sets the driver-ready flag (restore).
    pub fn set_device_ready(&mut self, ready: bool) {
        self.device_ready = ready;
    }

    /// The ports.
    pub fn ports(&self) -> &BTreeMap<u32, PortStatus> {
        &self.ports
    }

    /// One port.
    pub fn port(&self, id: u32) -> Option<&PortStatus> {
        self.ports.get(&id)
    }

    /// Back to the state after construction (driver reset): the ports stay, the driver's
    /// flags are cleared.
    pub fn reset(&mut self) {
        self.device_ready = false;
        for p in self.ports.values_mut() {
            p.guest_ready = false;
            p.guest_open = false;
        }
    }

    /// A message from the driver; returns the messages to send back. Malformed messages
    /// and messages about unknown ports are ignored (logged).
    pub fn handle_guest(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let Some(m) = ControlMessage::parse(bytes) else {
            log::warn!(
                "virtio-console: control message of {} bytes ignored",
                bytes.len()
            );
            return Vec::new();
        };
        match m.event {
            event::DEVICE_READY => {
                if m.value != 1 {
                    log::warn!(
                        "virtio-console: driver failed to initialise (DEVICE_READY {})",
                        m.value
                    );
                    return Vec::new();
                }
                self.device_ready = true;
                self.ports
                    .keys()
                    .map(|id| msg(*id, event::DEVICE_ADD, 0))
                    .collect()
            }
            event::PORT_READY => {
                let Some(p) = self.ports.get_mut(&m.id) else {
                    log::warn!("virtio-console: PORT_READY for unknown port {}", m.id);
                    return Vec::new();
                };
                if m.value != 1 {
                    log::warn!("virtio-console: driver failed to add port {}", m.id);
                    p.guest_ready = false;
                    return Vec::new();
                }
                p.guest_ready = true;
                announce(m.id, p)
            }
            event::PORT_OPEN => {
                match self.ports.get_mut(&m.id) {
                    Some(p) => p.guest_open = m.value != 0,
                    None => log::warn!("virtio-console: PORT_OPEN for unknown port {}", m.id),
                }
                Vec::new()
            }
            other => {
                log::warn!("virtio-console: unexpected control event {other} from the driver");
                Vec::new()
            }
        }
    }

    /// Adds a port; returns `DEVICE_ADD` if the driver is ready. An existing id is replaced.
    pub fn add_port(&mut self, id: u32, status: PortStatus) -> Vec<Vec<u8>> {
        let status = PortStatus {
            guest_ready: false,
            guest_open: false,
            ..status
        };
        self.ports.insert(id, status);
        if self.device_ready {
            vec![msg(id, event::DEVICE_ADD, 0)]
        } else {
            Vec::new()
        }
    }

    /// Inserts a port with its flags as given (restore); sends nothing.
    pub fn restore_port(&mut self, id: u32, status: PortStatus) {
        self.ports.insert(id, status);
    }

    /// Removes a port; returns `DEVICE_REMOVE` if the driver is ready.
    pub fn remove_port(&mut self, id: u32) -> Vec<Vec<u8>> {
        if self.ports.remove(&id).is_some() && self.device_ready {
            vec![msg(id, event::DEVICE_REMOVE, 0)]
        } else {
            Vec::new()
        }
    }

    /// The host side of a port connected or disconnected; returns `PORT_OPEN` if the driver
    /// knows the port.
    pub fn set_host_connected(&mut self, id: u32, connected: bool) -> Vec<Vec<u8>> {
        match self.ports.get_mut(&id) {
            Some(p) if p.host_connected != connected => {
                p.host_connected = connected;
                if p.guest_ready {
                    vec![msg(id, event::PORT_OPEN, u16::from(connected))]
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    /// A console port's size changed; returns `RESIZE` if the driver knows the port.
    pub fn resize(&mut self, id: u32, cols: u16, rows: u16) -> Vec<Vec<u8>> {
        match self.ports.get_mut(&id) {
            Some(p) => {
                p.size = Some((cols, rows));
                if p.guest_ready && p.console {
                    vec![resize_msg(id, cols, rows)]
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        }
    }
}

fn resize_msg(id: u32, cols: u16, rows: u16) -> Vec<u8> {
    let mut payload = [0u8; 4];
    payload[..2].copy_from_slice(&cols.to_le_bytes());
    payload[2..].copy_from_slice(&rows.to_le_bytes());
    ControlMessage {
        id,
        event: event::RESIZE,
        value: 0,
    }
    .encode(&payload)
}

/// What a port announces after `PORT_READY`: console, size, name, host open.
fn announce(id: u32, p: &PortStatus) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if p.console {
        out.push(msg(id, event::CONSOLE_PORT, 1));
        if let Some((cols, rows)) = p.size {
            out.push(resize_msg(id, cols, rows));
        }
    }
    if let Some(name) = &p.name {
        let bytes = name.as_bytes();
        let n = bytes.len().min(MAX_NAME_LEN);
        out.push(
            ControlMessage {
                id,
                event: event::PORT_NAME,
                value: 1,
            }
            .encode(&bytes[..n]),
        );
    }
    if p.host_connected {
        out.push(msg(id, event::PORT_OPEN, 1));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse_all(v: &[Vec<u8>]) -> Vec<(u32, u16, u16)> {
        v.iter()
            .map(|b| {
                let m = ControlMessage::parse(b).unwrap();
                (m.id, m.event, m.value)
            })
            .collect()
    }

    #[test]
    fn handshake() {
        let mut s = ControlState::new();
        assert!(s
            .add_port(
                0,
                PortStatus {
                    console: true,
                    host_connected: true,
                    size: Some((80, 25)),
                    ..Default::default()
                },
            )
            .is_empty());
        s.add_port(
            1,
            PortStatus {
                name: Some("org.vmkit.agent".into()),
                ..Default::default()
            },
        );
        let out = s.handle_guest(&msg(0, event::DEVICE_READY, 1));
        assert_eq!(parse_all(&out), vec![(0, 1, 0), (1, 1, 0)]);
        let out = s.handle_guest(&msg(0, event::PORT_READY, 1));
        assert_eq!(parse_all(&out), vec![(0, 4, 1), (0, 5, 0), (0, 6, 1)]);
        assert_eq!(&out[1][8..], &[80, 0, 25, 0]);
        let out = s.handle_guest(&msg(1, event::PORT_READY, 1));
        assert_eq!(parse_all(&out), vec![(1, 7, 1)]);
        assert_eq!(&out[0][8..], b"org.vmkit.agent");
        assert!(s.handle_guest(&msg(1, event::PORT_OPEN, 1)).is_empty());
        assert!(s.port(1).unwrap().guest_open);
        // Host connects port 1: PORT_OPEN to the guest.
        assert_eq!(parse_all(&s.set_host_connected(1, true)), vec![(1, 6, 1)]);
        assert!(s.set_host_connected(1, true).is_empty());
        // Resize of the console.
        let out = s.resize(0, 120, 40);
        assert_eq!(&out[0][8..], &[120, 0, 40, 0]);
        // Hot add and remove.
        assert_eq!(
            parse_all(&s.add_port(5, PortStatus::default())),
            vec![(5, 1, 0)]
        );
        assert_eq!(parse_all(&s.remove_port(5)), vec![(5, 2, 0)]);
        assert!(s.remove_port(5).is_empty());
        s.reset();
        assert!(!s.device_ready());
        assert!(!s.port(1).unwrap().guest_open);
    }

    #[test]
    fn malformed_and_unknown_messages_are_ignored() {
        let mut s = ControlState::new();
        assert!(s.handle_guest(&[1, 2, 3]).is_empty());
        assert!(s.handle_guest(&msg(9, event::PORT_READY, 1)).is_empty());
        assert!(s.handle_guest(&msg(9, event::PORT_OPEN, 1)).is_empty());
        assert!(s.handle_guest(&msg(0, event::DEVICE_READY, 0)).is_empty());
        assert!(!s.device_ready());
        assert!(s.handle_guest(&msg(0, event::RESIZE, 0)).is_empty());
        assert!(s.handle_guest(&msg(0, 0xffff, 0xffff)).is_empty());
        s.add_port(0, PortStatus::default());
        assert!(s.handle_guest(&msg(0, event::PORT_READY, 0)).is_empty());
        assert!(!s.port(0).unwrap().guest_ready);
    }
}
