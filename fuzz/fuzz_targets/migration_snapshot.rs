// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Arbitrary bytes as a snapshot file or as one encoded state never panic the decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};
use vmkit_migration::{decode, SnapshotTree, VersionedState};

#[derive(Serialize, Deserialize)]
struct Probe {
    regs: Vec<u64>,
    name: String,
    blob: Vec<u8>,
}

impl VersionedState for Probe {
    const NAME: &'static str = "fuzz/probe";
    const VERSION: u16 = 1;
}

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Probe>(data);
    if let Ok(tree) = SnapshotTree::from_bytes(data) {
        let ids: Vec<String> = tree.ids().map(str::to_owned).collect();
        for id in ids {
            let _ = tree.get::<Probe>(&id);
        }
    }
});
