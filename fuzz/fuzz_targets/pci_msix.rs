// SPDX-License-Identifier: Apache-2.0 OR MIT
//! MSI-X table / PBA accesses, Message Control writes and triggers never panic and follow
//! the masking rules: a trigger on an unmasked vector is delivered, on a masked one it sets
//! the pending bit, and unmasking delivers and clears it. Restoring arbitrary MSI-X states
//! never panics either.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmkit_device::testing::RecordingMsi;
use vmkit_pci::{MsixConfig, MsixEntryState, PciBarKind, PciConfigSpace, PciHeader, CAP_ID_MSIX};

const VECTORS: u16 = 70;

#[derive(Arbitrary, Debug)]
enum Op {
    TableWrite {
        offset: u16,
        len: u8,
        value: u64,
    },
    TableRead {
        offset: u16,
        len: u8,
    },
    PbaRead {
        offset: u8,
        len: u8,
    },
    BarWrite {
        offset: u16,
        len: u8,
        value: u64,
    },
    Control {
        value: u16,
        byte: bool,
    },
    ConfigWrite {
        reg: u16,
        len: u8,
        value: u32,
    },
    Trigger {
        vector: u8,
    },
    Restore {
        entries: Option<Vec<(u64, u32, u32)>>,
        pba: Option<Vec<u64>>,
        enabled: bool,
        masked: bool,
        flip: Option<(u16, u8)>,
    },
}

fn len_of(len: u8) -> usize {
    usize::from(len % 9)
}

fuzz_target!(|ops: Vec<Op>| {
    let mut cfg = PciConfigSpace::new(PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        revision: 1,
        class_code: 2,
        subclass: 0,
        prog_if: 0,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 1,
    });
    let group = Arc::new(RecordingMsi::new(usize::from(VECTORS)));
    if cfg.add_bar(0, PciBarKind::Memory64, 0x2000, false).is_err() {
        return;
    }
    let Ok(msix) = cfg.add_msix(
        MsixConfig {
            vectors: VECTORS,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x1000,
        },
        group.clone(),
    ) else {
        return;
    };
    let cap = cfg.find_capabilities(CAP_ID_MSIX)[0];

    for op in ops {
        match op {
            Op::TableWrite { offset, len, value } => {
                let l = len_of(len);
                msix.table_write(u64::from(offset), &value.to_le_bytes()[..l]);
            }
            Op::TableRead { offset, len } => {
                let mut d = vec![0u8; len_of(len)];
                msix.table_read(u64::from(offset), &mut d);
            }
            Op::PbaRead { offset, len } => {
                let mut d = vec![0u8; len_of(len)];
                msix.pba_read(u64::from(offset), &mut d);
            }
            Op::BarWrite { offset, len, value } => {
                let l = len_of(len);
                let _ = msix.bar_write(0, u64::from(offset), &value.to_le_bytes()[..l]);
            }
            Op::Control { value, byte } => {
                if byte {
                    cfg.write(cap + 3, &[(value >> 8) as u8]);
                } else {
                    cfg.write(cap + 2, &value.to_le_bytes());
                }
            }
            Op::ConfigWrite { reg, len, value } => {
                let l = len_of(len).min(4);
                cfg.write(reg % 0x1000, &value.to_le_bytes()[..l]);
            }
            Op::Trigger { vector } => {
                let v = u16::from(vector);
                let masked = msix.vector_masked(v);
                let before = group.delivered(usize::from(v));
                let r = msix.trigger(v);
                if v >= VECTORS {
                    assert!(r.is_err());
                    continue;
                }
                assert!(r.is_ok());
                if masked {
                    assert!(msix.pending(v));
                    assert_eq!(group.delivered(usize::from(v)), before);
                } else {
                    assert_eq!(group.delivered(usize::from(v)), before + 1);
                }
            }
            Op::Restore {
                entries,
                pba,
                enabled,
                masked,
                flip,
            } => {
                // A saved state, possibly damaged: restore either succeeds or is refused
                // without changing anything.
                let mut state = cfg.save();
                if let Some(m) = state.msix.as_mut() {
                    if let Some(e) = entries {
                        m.entries = e
                            .into_iter()
                            .map(|(address, data, control)| MsixEntryState {
                                address,
                                data,
                                control,
                            })
                            .collect();
                    }
                    if let Some(p) = pba {
                        m.pba = p;
                    }
                    m.enabled = enabled;
                    m.function_masked = masked;
                }
                if let Some((reg, x)) = flip {
                    if let Some(b) = state.regs.get_mut(usize::from(reg)) {
                        *b ^= x;
                    }
                }
                let before = cfg.save();
                if cfg.restore_state(&state).is_err() {
                    assert_eq!(cfg.save(), before, "a refused restore changes nothing");
                }
            }
        }
        // Invariants: the configuration space and the capability agree on Message
        // Control, and no unmasked vector is left pending.
        let mut c = [0u8; 2];
        cfg.read(cap + 2, &mut c);
        let ctrl = u16::from_le_bytes(c);
        assert_eq!(ctrl & 0x7ff, VECTORS - 1);
        assert_eq!(ctrl & 0x8000 != 0, msix.enabled());
        assert_eq!(ctrl & 0x4000 != 0, msix.function_masked());
        for v in 0..VECTORS {
            let masked = msix.vector_masked(v);
            assert_eq!(
                group.masked(usize::from(v)),
                Some(masked),
                "backend mask of {v}"
            );
            if !masked {
                assert!(!msix.pending(v), "vector {v} unmasked but pending");
            }
        }
    }
});
