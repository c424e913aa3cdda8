// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The Bus under arbitrary insert / remove / transaction / access patterns never panics and
//! agrees with a naive model of the range map.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_device::testing::RecordingDevice;
use vmkit_device::{Bus, BusRange};

#[derive(Arbitrary, Debug)]
enum Op {
    Insert { base: u16, len: u16 },
    Remove { base: u16 },
    Batch { inserts: Vec<(u16, u16)>, removes: Vec<u16> },
    Read { addr: u16, len: u8 },
    Write { addr: u16, data: Vec<u8> },
}

fuzz_target!(|ops: Vec<Op>| {
    let bus = Bus::new();
    let mut model: Vec<BusRange> = Vec::new();
    for op in ops {
        match op {
            Op::Insert { base, len } => {
                let Ok(r) = BusRange::new(u64::from(base), u64::from(len)) else {
                    continue;
                };
                let ok = bus.insert(r, Arc::new(RecordingDevice::default())).is_ok();
                assert_eq!(ok, model.iter().all(|m| !m.overlaps(&r)));
                if ok {
                    model.push(r);
                }
            }
            Op::Remove { base } => {
                let ok = bus.remove(u64::from(base)).is_ok();
                let pos = model.iter().position(|r| r.base() == u64::from(base));
                assert_eq!(ok, pos.is_some());
                if let Some(p) = pos {
                    model.remove(p);
                }
            }
            Op::Batch { inserts, removes } => {
                let mut tx = bus.transaction();
                for (b, l) in inserts {
                    if let Ok(r) = BusRange::new(u64::from(b), u64::from(l)) {
                        tx.insert(r, Arc::new(RecordingDevice::default()));
                    }
                }
                for b in removes {
                    tx.remove(u64::from(b));
                }
                let before = bus.ranges();
                if tx.commit().is_err() {
                    assert_eq!(bus.ranges(), before, "failed transaction must not apply");
                }
                model = bus.ranges();
            }
            Op::Read { addr, len } => {
                let mut buf = vec![0u8; usize::from(len)];
                let _ = bus.read(u64::from(addr), &mut buf);
            }
            Op::Write { addr, data } => {
                let _ = bus.write(u64::from(addr), &data);
            }
        }
        let mut sorted = model.clone();
        sorted.sort();
        assert_eq!(bus.ranges(), sorted);
    }
});
