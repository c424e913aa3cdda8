// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Descriptor-chain walking with virtio-queue over our guest-memory type: pop one chain
//! and visit every descriptor, direct and indirect, 1 / 4 / 16 descriptors.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use virtio_queue::QueueT;

mod common;
use common::{memory, Rings};

fn bench(c: &mut Criterion) {
    let mem = memory();
    let rings = Rings::new(256);
    let mut group = c.benchmark_group("descriptor_chain");
    for indirect in [false, true] {
        for n in [1usize, 4, 16] {
            let descs: Vec<(u64, u32, bool)> = (0..n)
                .map(|i| (0x10_0000 + 0x1000 * i as u64, 512, i + 1 == n))
                .collect();
            rings.post(&mem, &descs, indirect);
            let mut queue = rings.queue();
            let name = if indirect { "indirect" } else { "direct" };
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter(|| {
                    queue.set_next_avail(0);
                    let chain = queue.pop_descriptor_chain(&mem).expect("chain");
                    let mut bytes = 0u64;
                    let mut count = 0usize;
                    for d in chain {
                        bytes += u64::from(d.len());
                        count += 1;
                    }
                    assert_eq!(count, n);
                    std::hint::black_box(bytes)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
