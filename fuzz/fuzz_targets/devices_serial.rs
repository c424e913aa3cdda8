// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The 16550 UART of vmkit-devices under arbitrary register accesses (any offset, any size),
//! host input, pause/resume, save/restore and restore from arbitrary state bytes. Nothing may
//! panic; the FIFO never exceeds its capacity; a saved state restores to an equal state.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_device::testing::CountingLine;
use vmkit_device::{BusDevice, InterruptLine, TriggerMode};
use vmkit_devices::serial::{Serial, SerialBuilder, SerialOutput, UartState, FIFO_CAPACITY};
use vmkit_migration::{decode, encode, Pausable, Restore, Snapshot};

#[derive(Arbitrary, Debug)]
enum Op {
    /// A register access as the port bus delivers it (offset inside the 8 ports).
    Read {
        offset: u8,
        size: u8,
    },
    Write {
        offset: u8,
        data: Vec<u8>,
    },
    /// Accesses no bus would deliver: the device must still not panic.
    WildRead {
        offset: u64,
        size: u8,
    },
    WildWrite {
        offset: u64,
        data: Vec<u8>,
    },
    /// Host input into the receive FIFO.
    Input(Vec<u8>),
    Pause,
    Resume,
    /// Save, encode, decode and rebuild the device from its state.
    SaveRestore,
    /// Restore from arbitrary bytes (a damaged snapshot): errors are fine.
    RestoreBytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    level: bool,
    ops: Vec<Op>,
}

fn builder(irq: &Arc<CountingLine>, capture: &Arc<Mutex<Vec<u8>>>) -> SerialBuilder {
    let line: Arc<dyn InterruptLine> = irq.clone();
    Serial::builder(line)
        .output(SerialOutput::Writer(Box::new(std::io::sink())))
        .capture(capture.clone())
        .on_line(|line| {
            std::hint::black_box(line.len());
        })
}

fuzz_target!(|input: Input| {
    let mode = if input.level {
        TriggerMode::Level
    } else {
        TriggerMode::Edge
    };
    let irq = Arc::new(CountingLine::new(mode));
    let capture = Arc::new(Mutex::new(Vec::new()));
    let Ok(mut serial) = builder(&irq, &capture).build() else {
        return;
    };
    let base = 0x3f8;
    for op in input.ops.into_iter().take(4096) {
        match op {
            Op::Read { offset, size } => {
                let mut buf = vec![0u8; usize::from(size % 9)];
                serial.read(base, u64::from(offset % 8), &mut buf);
            }
            Op::Write { offset, data } => {
                let data = data.get(..data.len().min(8)).unwrap_or_default();
                serial.write(base, u64::from(offset % 8), data);
            }
            Op::WildRead { offset, size } => {
                let mut buf = vec![0u8; usize::from(size)];
                serial.read(base, offset, &mut buf);
            }
            Op::WildWrite { offset, data } => serial.write(base, offset, &data),
            Op::Input(bytes) => {
                let before = serial.fifo_capacity();
                let taken = serial.enqueue_input(&bytes);
                assert!(taken <= bytes.len() && taken <= before);
            }
            Op::Pause => serial.pause().expect("pause"),
            Op::Resume => serial.resume().expect("resume"),
            Op::SaveRestore => {
                let state = serial.save().expect("save");
                let bytes = encode(&state).expect("encode");
                let back: UartState = decode(&bytes).expect("decode what was encoded");
                assert_eq!(back, state);
                serial = Serial::restore(builder(&irq, &capture), &back)
                    .expect("a saved state restores");
                assert_eq!(serial.save().expect("save"), state);
            }
            Op::RestoreBytes(bytes) => {
                if let Ok(state) = decode::<UartState>(&bytes) {
                    if let Ok(s) = Serial::restore(builder(&irq, &capture), &state) {
                        serial = s;
                    }
                }
            }
        }
        assert!(serial.fifo_capacity() <= FIFO_CAPACITY);
    }
});
