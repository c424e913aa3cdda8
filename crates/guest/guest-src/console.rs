// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio-console echo test: find the port named `vmkit.echo_port` (default `vmkit.echo`)
//! through the multiport control queues (or use port 0 when the device has no
//! `VIRTIO_CONSOLE_F_MULTIPORT`), open it, send one message and expect the host to send the
//! same bytes back (the protocol is documented in the host crate's `abi.rs`).

use crate::cpu::{mmio_read, mmio_write, pause, rdtsc};
use crate::virtio::{Error, Transport, Virtqueue};

/// `VIRTIO_CONSOLE_F_MULTIPORT`.
const F_MULTIPORT: u64 = 1 << 1;
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;
/// Most ports set up (queues `2 + 2 * ports`).
const MAX_PORTS: u32 = 32;
const CTRL_BUF: u32 = 128;
const CTRL_BUFS: u16 = 8;
/// Longest port name kept.
pub const NAME_MAX: usize = 32;

/// Outcome of the echo test.
pub struct Echo {
    /// Port used (`-` name for port 0 without multiport).
    pub port: u32,
    /// Its name.
    pub name: [u8; NAME_MAX],
    /// Length of `name`.
    pub name_len: usize,
    /// Bytes sent (and expected back).
    pub sent: u32,
    /// Bytes received.
    pub received: u32,
    /// `"ok"`, `"mismatch"`, `"timeout"`, `"no_port"`.
    pub result: &'static str,
}

fn ctrl_send(vq: &mut Virtqueue, buf: u64, id: u32, event: u16, value: u16) {
    mmio_write::<u32>(buf, id);
    mmio_write::<u16>(buf + 4, event);
    mmio_write::<u16>(buf + 6, value);
    if vq.add(&[(buf, 8, false)]).is_some() {
        vq.kick();
    }
}

/// Waits (polling) until `vq` returns a used buffer or `deadline` passes.
fn wait_used(vq: &mut Virtqueue, deadline: u64) -> Option<(u16, u32)> {
    loop {
        if let Some(u) = vq.poll() {
            return Some(u);
        }
        if rdtsc() > deadline {
            return None;
        }
        pause();
    }
}

/// Runs the echo test on the console at `t` (PCI: queue `q` uses MSI-X entry
/// `q % msix_entries`).
pub fn echo(
    t: &Transport,
    want: &[u8],
    msix_entries: u16,
    tsc_khz: u64,
    timeout_ms: u64,
) -> Result<Echo, Error> {
    let features = t.init(F_MULTIPORT)?;
    let multiport = features & F_MULTIPORT != 0;
    let ports = if multiport {
        t.cfg32(4).clamp(1, MAX_PORTS)
    } else {
        1
    };
    let nq = if multiport { 2 + 2 * ports } else { 2 };
    if let Some(n) = t.num_queues() {
        if u32::from(n) < nq {
            return Err("too_few_queues");
        }
    }
    t.no_config_vector();
    let mut rx: Option<Virtqueue> = None;
    let mut tx: Option<Virtqueue> = None;
    let mut crx: Option<Virtqueue> = None;
    let mut ctx: Option<Virtqueue> = None;
    // Port queues of ports other than the chosen one are set up too (queues must exist
    // before DRIVER_OK), but only the chosen port's are kept: queue memory is never reused.
    let mut port_q: [Option<Virtqueue>; 2 * MAX_PORTS as usize] =
        [const { None }; 2 * MAX_PORTS as usize];
    for q in 0..nq as u16 {
        let entry = (msix_entries > 0).then(|| q % msix_entries);
        let size = if q == 2 || q == 3 { 16 } else { 8 };
        let vq = t.setup_queue(q, size, entry)?;
        match q {
            0 => rx = Some(vq),
            1 => tx = Some(vq),
            2 => crx = Some(vq),
            3 => ctx = Some(vq),
            _ => port_q[usize::from(q) - 4] = Some(vq),
        }
    }
    t.driver_ok();
    let mut result = Echo {
        port: 0,
        name: [0; NAME_MAX],
        name_len: 0,
        sent: 0,
        received: 0,
        result: "no_port",
    };
    let deadline = rdtsc() + tsc_khz.saturating_mul(timeout_ms);
    let bufs =
        crate::dma::alloc_zeroed(u64::from(CTRL_BUF) * (u64::from(CTRL_BUFS) + 4) + 4096, 64)
            .ok_or("out_of_memory")?;
    let tx_ctrl = bufs + u64::from(CTRL_BUF) * u64::from(CTRL_BUFS);
    let data_out = tx_ctrl + u64::from(CTRL_BUF);
    let data_in = data_out + 2048;
    let (mut rx, mut tx) = (rx.ok_or("queue_missing")?, tx.ok_or("queue_missing")?);
    if multiport {
        let (Some(mut crx), Some(mut ctx)) = (crx, ctx) else {
            return Err("queue_missing");
        };
        for i in 0..u64::from(CTRL_BUFS) {
            let b = bufs + i * u64::from(CTRL_BUF);
            crx.add(&[(b, CTRL_BUF, true)]);
        }
        crx.kick();
        ctrl_send(&mut ctx, tx_ctrl, 0, DEVICE_READY, 1);
        let _ = wait_used(&mut ctx, deadline);
        // Find the port: DEVICE_ADD -> PORT_READY, then PORT_NAME arrives.
        let mut found: Option<u32> = None;
        let mut host_open = [false; MAX_PORTS as usize];
        loop {
            if let Some(p) = found {
                if host_open[p as usize] {
                    break;
                }
            }
            let Some((head, len)) = wait_used(&mut crx, deadline) else {
                break;
            };
            let b = bufs + u64::from(head % CTRL_BUFS) * u64::from(CTRL_BUF);
            // Our buffers were added in order 0..CTRL_BUFS on a fresh ring: head == index.
            let id: u32 = mmio_read(b);
            let event: u16 = mmio_read(b + 4);
            let value: u16 = mmio_read(b + 6);
            if len >= 8 && id < ports {
                match event {
                    DEVICE_ADD => {
                        ctrl_send(&mut ctx, tx_ctrl, id, PORT_READY, 1);
                        let _ = wait_used(&mut ctx, deadline);
                    }
                    PORT_NAME => {
                        let n = ((len - 8) as usize).min(NAME_MAX);
                        let mut name = [0u8; NAME_MAX];
                        for (k, c) in name.iter_mut().enumerate().take(n) {
                            *c = mmio_read(b + 8 + k as u64);
                        }
                        let n = name[..n].iter().position(|&c| c == 0).unwrap_or(n);
                        if &name[..n] == want && found.is_none() {
                            found = Some(id);
                            result.name = name;
                            result.name_len = n;
                        }
                    }
                    PORT_OPEN => host_open[id as usize] = value != 0,
                    _ => {}
                }
            }
            crx.add(&[(b, CTRL_BUF, true)]);
            crx.kick();
        }
        let Some(port) = found else {
            return Ok(result);
        };
        result.port = port;
        if port != 0 {
            let base = 2 * (port as usize - 1);
            match (port_q[base].take(), port_q[base + 1].take()) {
                (Some(r), Some(w)) => {
                    rx = r;
                    tx = w;
                }
                _ => return Err("queue_missing"),
            }
        }
        ctrl_send(&mut ctx, tx_ctrl, port, PORT_OPEN, 1);
        let _ = wait_used(&mut ctx, deadline);
    }
    // The message: "vmkit-echo <tsc in hex>\n".
    let mut msg = [0u8; 40];
    let prefix = b"vmkit-echo 0x";
    msg[..prefix.len()].copy_from_slice(prefix);
    let mut n = prefix.len();
    let tsc = rdtsc();
    for k in (0..16).rev() {
        msg[n] = b"0123456789abcdef"[((tsc >> (4 * k)) & 0xF) as usize];
        n += 1;
    }
    msg[n] = b'\n';
    n += 1;
    for (k, &c) in msg[..n].iter().enumerate() {
        mmio_write::<u8>(data_out + k as u64, c);
    }
    for k in 0..4u64 {
        rx.add(&[(data_in + 256 * k, 256, true)]);
    }
    rx.kick();
    tx.add(&[(data_out, n as u32, false)]);
    tx.kick();
    result.sent = n as u32;
    let _ = wait_used(&mut tx, deadline);
    let mut got = [0u8; 64];
    let mut have = 0usize;
    while have < n {
        let Some((head, len)) = wait_used(&mut rx, deadline) else {
            result.received = have as u32;
            result.result = "timeout";
            return Ok(result);
        };
        let b = data_in + 256 * u64::from(head % 4);
        for k in 0..(len as usize).min(256) {
            if have < got.len() {
                got[have] = mmio_read(b + k as u64);
            }
            have += 1;
        }
        rx.add(&[(b, 256, true)]);
        rx.kick();
    }
    result.received = have as u32;
    result.result = if have == n && got[..n] == msg[..n] {
        "ok"
    } else {
        "mismatch"
    };
    Ok(result)
}
