// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The i8042 controller of vmkit-devices under arbitrary port accesses, save/restore and
//! restore from arbitrary state bytes. Nothing may panic; reads never request a reset; a
//! saved state restores to an equal state.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_device::testing::CountingLine;
use vmkit_device::{BusDevice, InterruptLine, TriggerMode};
use vmkit_devices::i8042::{I8042Args, I8042State, I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
use vmkit_migration::{decode, encode, Restore, Snapshot};

#[derive(Arbitrary, Debug)]
enum Op {
    /// Data port (false) or command/status port (true), as the bus delivers them.
    Read {
        command: bool,
    },
    Write {
        command: bool,
        value: u8,
    },
    /// Accesses no bus would deliver.
    WildRead {
        base: u64,
        offset: u64,
        size: u8,
    },
    WildWrite {
        base: u64,
        offset: u64,
        data: Vec<u8>,
    },
    SaveRestore,
    RestoreBytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    irq: Option<bool>,
    ops: Vec<Op>,
}

fn port(command: bool) -> u64 {
    u64::from(if command {
        I8042_COMMAND_PORT
    } else {
        I8042_DATA_PORT
    })
}

fuzz_target!(|input: Input| {
    let resets = Arc::new(AtomicU64::new(0));
    let line: Option<Arc<dyn InterruptLine>> = input.irq.map(|level| {
        let mode = if level {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        Arc::new(CountingLine::new(mode)) as Arc<dyn InterruptLine>
    });
    let args = || {
        let r = resets.clone();
        I8042Args {
            reset: Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
            keyboard_irq: line.clone(),
        }
    };
    let a = args();
    let mut dev = I8042::new(a.reset);
    if let Some(l) = a.keyboard_irq {
        dev = dev.with_keyboard_irq(l);
    }
    for op in input.ops.into_iter().take(4096) {
        let before = resets.load(Ordering::SeqCst);
        match op {
            Op::Read { command } => {
                let mut b = [0u8];
                dev.read(port(command), 0, &mut b);
                assert_eq!(
                    resets.load(Ordering::SeqCst),
                    before,
                    "a read reset the CPU"
                );
            }
            Op::Write { command, value } => {
                dev.write(port(command), 0, &[value]);
                let after = resets.load(Ordering::SeqCst);
                assert!(after - before <= 1);
                if !command && after != before {
                    // Only the output port (0xd1 then a value with bit 0 clear) resets
                    // through the data port.
                    assert_eq!(value & 1, 0);
                }
            }
            Op::WildRead { base, offset, size } => {
                let mut buf = vec![0u8; usize::from(size)];
                dev.read(base, offset, &mut buf);
            }
            Op::WildWrite { base, offset, data } => dev.write(base, offset, &data),
            Op::SaveRestore => {
                let state = dev.save().expect("save");
                let bytes = encode(&state).expect("encode");
                let back: I8042State = decode(&bytes).expect("decode what was encoded");
                assert_eq!(back, state);
                dev = I8042::restore(args(), &back).expect("a saved state restores");
                assert_eq!(dev.save().expect("save"), state);
            }
            Op::RestoreBytes(bytes) => {
                if let Ok(state) = decode::<I8042State>(&bytes) {
                    if let Ok(d) = I8042::restore(args(), &state) {
                        dev = d;
                    }
                }
            }
        }
    }
});
