// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Configuration-space and BAR accesses through the root complex (ECAM, CF8/CFC, BAR
//! windows) never panic, keep the MMIO/PIO buses in line with what the root complex says
//! is mapped, and every function's state survives a save/restore round trip.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_device::testing::RecordingMsi;
use vmkit_device::Bus;
use vmkit_pci::testing::TestDevice;
use vmkit_pci::{PciAddress, PciBarKind, PciRoot, SlotPlan, SlotRole, ECAM_BASE};

#[derive(Arbitrary, Debug)]
enum Op {
    /// ECAM access: function index (into the added functions or a missing one), register,
    /// access size, value.
    EcamWrite {
        f: u8,
        reg: u16,
        len: u8,
        value: u64,
    },
    EcamRead {
        f: u8,
        reg: u16,
        len: u8,
    },
    /// Legacy mechanism: CONFIG_ADDRESS then a data port access.
    Cf8Write {
        address: u32,
        port: u8,
        len: u8,
        value: u32,
    },
    Cf8Read {
        address: u32,
        port: u8,
        len: u8,
    },
    /// An access anywhere in the PCI MMIO window or the I/O window.
    Mmio {
        offset: u32,
        len: u8,
        write: bool,
        value: u64,
    },
    Pio {
        offset: u16,
        len: u8,
        write: bool,
        value: u32,
    },
    /// A BAR sizing sequence on one BAR register.
    Size {
        f: u8,
        bar: u8,
    },
}

fn len_of(len: u8) -> usize {
    usize::from(len % 9)
}

fuzz_target!(|ops: Vec<Op>| {
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let root = PciRoot::new(SlotPlan::default(), mmio.clone(), pio.clone());
    if root.register_config_access().is_err() {
        return;
    }
    let mut devices = Vec::new();
    for role in [SlotRole::Disk(0), SlotRole::Disk(1)] {
        let Ok(d) = TestDevice::new(Arc::new(RecordingMsi::new(4))) else {
            return;
        };
        let d = Arc::new(d);
        let Ok(addr) = root.add_role(role, d.clone()) else {
            return;
        };
        devices.push((addr, d));
    }
    let Ok(bridge_at) = PciAddress::new(0, 5, 0) else {
        return;
    };
    if root.add_bridge(bridge_at, 1).is_err() {
        return;
    }
    let mut targets: Vec<PciAddress> = devices.iter().map(|(a, _)| *a).collect();
    targets.push(bridge_at);
    if let Ok(a) = PciAddress::new(0, 0, 0) {
        targets.push(a);
    }
    if let Ok(a) = PciAddress::new(1, 0, 0) {
        targets.push(a);
    }
    let ecam = |f: u8, reg: u16| {
        let t = targets[usize::from(f) % targets.len()];
        ECAM_BASE + t.ecam_offset() + u64::from(reg & 0xfff)
    };

    for op in ops {
        match op {
            Op::EcamWrite { f, reg, len, value } => {
                let l = len_of(len);
                let _ = mmio.write(ecam(f, reg), &value.to_le_bytes()[..l]);
            }
            Op::EcamRead { f, reg, len } => {
                let mut d = vec![0u8; len_of(len)];
                let _ = mmio.read(ecam(f, reg), &mut d);
            }
            Op::Cf8Write {
                address,
                port,
                len,
                value,
            } => {
                let _ = pio.write(0xcf8, &address.to_le_bytes());
                let l = len_of(len).min(4);
                let _ = pio.write(0xcf8 + u64::from(port % 8), &value.to_le_bytes()[..l]);
            }
            Op::Cf8Read { address, port, len } => {
                let _ = pio.write(0xcf8, &address.to_le_bytes());
                let mut d = vec![0u8; len_of(len)];
                let _ = pio.read(0xcf8 + u64::from(port % 8), &mut d);
            }
            Op::Mmio {
                offset,
                len,
                write,
                value,
            } => {
                let addr = 0xc000_0000 + u64::from(offset % 0x3000_0000);
                let l = len_of(len);
                if write {
                    let _ = mmio.write(addr, &value.to_le_bytes()[..l]);
                } else {
                    let mut d = vec![0u8; l];
                    let _ = mmio.read(addr, &mut d);
                }
            }
            Op::Pio {
                offset,
                len,
                write,
                value,
            } => {
                let addr = 0xc000 + u64::from(offset % 0x4000);
                let l = len_of(len).min(4);
                if write {
                    let _ = pio.write(addr, &value.to_le_bytes()[..l]);
                } else {
                    let mut d = vec![0u8; l];
                    let _ = pio.read(addr, &mut d);
                }
            }
            Op::Size { f, bar } => {
                let reg = 0x10 + 4 * u16::from(bar % 6);
                let a = ecam(f, reg);
                let mut old = [0u8; 4];
                let _ = mmio.read(a, &mut old);
                let _ = mmio.write(a, &[0xff; 4]);
                let mut mask = [0u8; 4];
                let _ = mmio.read(a, &mut mask);
                let _ = mmio.write(a, &old);
            }
        }
    }

    // The buses hold exactly what the root complex believes is mapped (plus ECAM / CF8).
    let mut mem = vec![ECAM_BASE];
    let mut io = vec![0xcf8];
    for (addr, _) in &devices {
        for r in root.mapped_bars(*addr) {
            match r.kind {
                PciBarKind::Io => io.push(r.addr),
                _ => mem.push(r.addr),
            }
        }
    }
    mem.sort_unstable();
    io.sort_unstable();
    let got_mem: Vec<u64> = mmio.ranges().iter().map(|r| r.base()).collect();
    let got_io: Vec<u64> = pio.ranges().iter().map(|r| r.base()).collect();
    assert_eq!(got_mem, mem);
    assert_eq!(got_io, io);

    // Save / restore round trip of every function's configuration space.
    for (_, d) in &devices {
        let state = d.save();
        let Ok(fresh) = TestDevice::new(Arc::new(RecordingMsi::new(4))) else {
            return;
        };
        assert!(fresh.restore(&state).is_ok(), "own state must restore");
        assert_eq!(fresh.save(), state);
    }
});
