// SPDX-License-Identifier: Apache-2.0 OR MIT
//! MSI-X table access and trigger costs (the vCPU exit path for table accesses, and the
//! worker thread path for triggers), with the recording interrupt backend so that only the
//! capability's own work is measured.
//!
//! `cargo bench -p vmkit-pci --bench msix`
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use vmkit_device::testing::RecordingMsi;
use vmkit_pci::{Msix, MsixConfig, PciBarKind, PciConfigSpace, PciHeader, CAP_ID_MSIX};

const VECTORS: u16 = 64;

/// A capability with every vector programmed; `enabled`: MSI-X enabled and all vectors
/// unmasked (through the configuration space, as a guest does).
fn msix(enabled: bool) -> Arc<Msix> {
    let mut cfg = PciConfigSpace::new(PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        revision: 1,
        class_code: 0x02,
        subclass: 0,
        prog_if: 0,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 1,
    });
    let group = Arc::new(RecordingMsi::new(usize::from(VECTORS)));
    let m = cfg
        .add_bar(0, PciBarKind::Memory64, 0x2000, false)
        .and_then(|()| {
            cfg.add_msix(
                MsixConfig {
                    vectors: VECTORS,
                    table_bar: 0,
                    table_offset: 0,
                    pba_bar: 0,
                    pba_offset: 0x1000,
                },
                group,
            )
        });
    let m = match m {
        Ok(m) => m,
        Err(e) => panic!("MSI-X setup: {e}"),
    };
    for v in 0..u64::from(VECTORS) {
        m.table_write(v * 16, &0xfee0_0000u64.to_le_bytes());
        m.table_write(v * 16 + 8, &(0x30 + v as u32).to_le_bytes());
        if enabled {
            m.table_write(v * 16 + 12, &0u32.to_le_bytes());
        }
    }
    if enabled {
        let cap = cfg.find_capabilities(CAP_ID_MSIX)[0];
        cfg.write(cap + 3, &[0x80]);
    }
    m
}

fn bench(c: &mut Criterion) {
    let m = msix(false);
    let mut g = c.benchmark_group("msix");
    g.bench_function("table_read_u32", |b| {
        let mut buf = [0u8; 4];
        let mut v = 0u64;
        b.iter(|| {
            v = (v + 1) % u64::from(VECTORS);
            m.table_read(black_box(v * 16 + 8), &mut buf);
            black_box(buf)
        })
    });
    g.bench_function("table_write_data_masked", |b| {
        let mut v = 0u64;
        b.iter(|| {
            v = (v + 1) % u64::from(VECTORS);
            m.table_write(black_box(v * 16 + 8), &0x41u32.to_le_bytes());
        })
    });
    g.bench_function("table_write_u64_addr_masked", |b| {
        let mut v = 0u64;
        b.iter(|| {
            v = (v + 1) % u64::from(VECTORS);
            m.table_write(black_box(v * 16), &0xfee0_1000u64.to_le_bytes());
        })
    });
    g.bench_function("pba_read_u64", |b| {
        let mut buf = [0u8; 8];
        b.iter(|| {
            m.pba_read(black_box(0), &mut buf);
            black_box(buf)
        })
    });
    g.bench_function("trigger_masked_sets_pba", |b| {
        b.iter(|| m.trigger(black_box(3)))
    });
    let live = msix(true);
    g.bench_function("trigger_delivered", |b| {
        b.iter(|| live.trigger(black_box(3)))
    });
    g.bench_function("notifier_lookup", |b| {
        b.iter(|| black_box(live.notifier(black_box(3)).is_some()))
    });
    g.bench_function("vector_mask_unmask_toggle", |b| {
        b.iter(|| {
            live.table_write(black_box(5 * 16 + 12), &1u32.to_le_bytes());
            live.table_write(black_box(5 * 16 + 12), &0u32.to_le_bytes());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
