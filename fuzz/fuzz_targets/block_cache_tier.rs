// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The caching tier's persistent metadata from the fuzzer: the superblock, commit record
//! and mapping table parsers on arbitrary bytes, and a formatted cache device (in memory)
//! with fuzzer-chosen patches to its superblock, commit records and table copies (CRCs
//! optionally recomputed) opened in front of an origin and driven with fuzzer-chosen I/O.
//! Nothing may panic.

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::VolatileSlice;
use vmkit_block::backend::{check_range, gather, scatter, total_len};
use vmkit_block::cache_tier::meta::{parse_table, CommitRecord, Superblock};
use vmkit_block::cache_tier::{CacheTier, CacheTierOptions, WritePolicy};
use vmkit_block::vhdx::crc32c::crc32c;
use vmkit_block::{read_at, write_at, BlockBackend, BlockError, BlockStatus, CacheMode};

/// A disk in memory.
struct Mem(Mutex<Vec<u8>>);

impl BlockBackend for Mem {
    fn virtual_size(&self) -> u64 {
        self.0.lock().map(|v| v.len() as u64).unwrap_or(0)
    }
    fn format(&self) -> &'static str {
        "raw"
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let v = self
            .0
            .lock()
            .map_err(|_| BlockError::InvalidArgument("poisoned".into()))?;
        let len = total_len(bufs);
        check_range(offset, len, v.len() as u64)?;
        scatter(bufs, 0, &v[offset as usize..(offset + len) as usize]);
        Ok(())
    }
    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), BlockError> {
        let mut v = self
            .0
            .lock()
            .map_err(|_| BlockError::InvalidArgument("poisoned".into()))?;
        let len = total_len(bufs);
        check_range(offset, len, v.len() as u64)?;
        gather(bufs, 0, &mut v[offset as usize..(offset + len) as usize]);
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), BlockError> {
        let mut v = self
            .0
            .lock()
            .map_err(|_| BlockError::InvalidArgument("poisoned".into()))?;
        check_range(offset, len, v.len() as u64)?;
        v[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        let size = self.virtual_size();
        check_range(offset, 1, size)?;
        Ok(BlockStatus {
            offset,
            len: len.min(size - offset).max(1),
            allocated: true,
            zero: false,
        })
    }
    fn cache_mode(&self) -> CacheMode {
        CacheMode::Unsafe
    }
    fn set_cache_mode(&self, _mode: CacheMode) -> Result<(), BlockError> {
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
struct Patch {
    /// 0 superblock, 1/2 commit records, 3/4 table copies.
    area: u8,
    offset: u16,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { off: u32, len: u16 },
    Write { off: u32, len: u16, fill: u8 },
    Zero { off: u32, len: u32, unmap: bool },
    Flush,
    Writeback,
    Policy(bool),
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Patched {
        patches: Vec<Patch>,
        fix_crcs: bool,
        ops: Vec<Op>,
    },
}

const ORIGIN: u64 = 256 << 10;
const CACHE: u64 = 96 << 10;

fn exercise(t: &CacheTier, ops: &[Op]) {
    let size = t.virtual_size();
    for op in ops.iter().take(32) {
        match *op {
            Op::Read { off, len } => {
                let o = u64::from(off) % size;
                let n = u64::from(len).min(size - o) as usize;
                let mut b = vec![0u8; n];
                let _ = read_at(t, o, &mut b);
            }
            Op::Write { off, len, fill } => {
                let o = u64::from(off) % size;
                let n = u64::from(len).min(size - o) as usize;
                let _ = write_at(t, o, &vec![fill; n]);
            }
            Op::Zero { off, len, unmap } => {
                let o = u64::from(off) % size;
                let _ = t.write_zeroes(o, u64::from(len).min(size - o), unmap);
            }
            Op::Flush => {
                let _ = t.flush();
            }
            Op::Writeback => {
                let _ = t.writeback_now();
            }
            Op::Policy(wt) => {
                let _ = t.set_policy(if wt {
                    WritePolicy::Writethrough
                } else {
                    WritePolicy::Writeback
                });
            }
        }
        let _ = t.stats();
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(b) => {
            let _ = Superblock::parse(&b);
            let _ = CommitRecord::parse(&b);
            let _ = parse_table(&b, (b.len() / 16) as u64, 1 << 20);
        }
        Input::Patched {
            patches,
            fix_crcs,
            ops,
        } => {
            let cache = Arc::new(Mem(Mutex::new(vec![0u8; CACHE as usize])));
            let origin = Arc::new(Mem(Mutex::new(vec![0u8; ORIGIN as usize])));
            if CacheTier::format(&*cache, ORIGIN, 4096).is_err() {
                return;
            }
            {
                let Ok(mut dev) = cache.0.lock() else {
                    return;
                };
                let Ok(sb) = Superblock::parse(&dev) else {
                    return;
                };
                let tables = [sb.table_offset(0) as usize, sb.table_offset(1) as usize];
                for p in patches.iter().take(16) {
                    let (base, span) = match p.area % 5 {
                        0 => (0, 128),
                        1 => (4096, 64),
                        2 => (8192, 64),
                        3 => (tables[0], 256),
                        _ => (tables[1], 256),
                    };
                    let start = base + usize::from(p.offset) % span;
                    for (i, v) in p.bytes.iter().take(32).enumerate() {
                        if let Some(x) = dev.get_mut(start + i) {
                            *x = *v;
                        }
                    }
                }
                if fix_crcs {
                    let c = crc32c(&dev[..4092]);
                    dev[4092..4096].copy_from_slice(&c.to_le_bytes());
                    let entries = (sb.nr_slots * 16) as usize;
                    for rec in [4096usize, 8192] {
                        let copy = u32::from_le_bytes([
                            dev[rec + 16],
                            dev[rec + 17],
                            dev[rec + 18],
                            dev[rec + 19],
                        ]) as usize;
                        if let Some(&t) = tables.get(copy) {
                            let tc = crc32c(&dev[t..t + entries]);
                            dev[rec + 24..rec + 28].copy_from_slice(&tc.to_le_bytes());
                        }
                        let c = crc32c(&dev[rec..rec + 44]);
                        dev[rec + 44..rec + 48].copy_from_slice(&c.to_le_bytes());
                    }
                }
            }
            let opts = CacheTierOptions {
                writeback_interval: None,
                ..Default::default()
            };
            if let Ok(t) = CacheTier::open(cache.clone(), origin.clone(), opts) {
                exercise(&t, &ops);
                let _ = t.close();
            }
        }
    }
});
