// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The CMOS RTC/NVRAM of vmkit-devices under arbitrary accesses, with a fuzzer-driven clock,
//! save/restore and restore from arbitrary state bytes. Nothing may panic; a saved state
//! restores to an equal state.
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_device::BusDevice;
use vmkit_devices::cmos::{Cmos, CmosState, WallClock, CMOS_PORT};
use vmkit_migration::{decode, encode, Restore, Snapshot};

#[derive(Arbitrary, Debug)]
enum Op {
    /// Select a register (bit 7 is the NMI-disable bit).
    Index(u8),
    ReadData,
    WriteData(u8),
    /// Move the host clock (any time, also before 1970 and far in the future).
    Clock {
        before_epoch: bool,
        secs: u64,
        nanos: u32,
    },
    /// Accesses of any offset and size.
    WildRead {
        offset: u64,
        size: u8,
    },
    WildWrite {
        offset: u64,
        data: Vec<u8>,
    },
    SaveRestore,
    RestoreBytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    below_4g: u64,
    above_4g: u64,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let now = Arc::new(Mutex::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
    let clock: WallClock = {
        let now = now.clone();
        Arc::new(move || *now.lock().unwrap_or_else(|e| e.into_inner()))
    };
    let mut dev = Cmos::with_clock(input.below_4g, input.above_4g, clock.clone());
    let base = u64::from(CMOS_PORT);
    for op in input.ops.into_iter().take(4096) {
        match op {
            Op::Index(i) => dev.write(base, 0, &[i]),
            Op::ReadData => {
                let mut b = [0u8];
                dev.read(base, 1, &mut b);
            }
            Op::WriteData(v) => dev.write(base, 1, &[v]),
            Op::Clock {
                before_epoch,
                secs,
                nanos,
            } => {
                // Keep within what SystemTime can represent.
                let d = Duration::new(secs % (1 << 40), nanos % 1_000_000_000);
                let t = if before_epoch {
                    UNIX_EPOCH.checked_sub(d)
                } else {
                    UNIX_EPOCH.checked_add(d)
                };
                if let Some(t) = t {
                    *now.lock().unwrap_or_else(|e| e.into_inner()) = t;
                }
            }
            Op::WildRead { offset, size } => {
                let mut buf = vec![0u8; usize::from(size)];
                dev.read(base, offset, &mut buf);
            }
            Op::WildWrite { offset, data } => dev.write(base, offset, &data),
            Op::SaveRestore => {
                let state = dev.save().expect("save");
                let bytes = encode(&state).expect("encode");
                let back: CmosState = decode(&bytes).expect("decode what was encoded");
                assert_eq!(back, state);
                dev = Cmos::restore(Some(clock.clone()), &back).expect("a saved state restores");
                assert_eq!(dev.save().expect("save"), state);
            }
            Op::RestoreBytes(bytes) => {
                if let Ok(state) = decode::<CmosState>(&bytes) {
                    if let Ok(d) = Cmos::restore(Some(clock.clone()), &state) {
                        dev = d;
                    }
                }
            }
        }
    }
    let _: SystemTime = clock();
});
