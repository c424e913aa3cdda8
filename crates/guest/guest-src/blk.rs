// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio-blk: pattern write / flush / read-back verification, then a benchmark with many
//! requests in flight on every queue.
//!
//! The pattern is one 64-bit word per 8 bytes, derived from the sector number, the word's
//! place in the sector and a per-boot seed (from the TSC), so that neither a stale disk nor
//! a request landing on the wrong sector can pass.

use crate::cpu::{mmio_read, mmio_write, rdtsc};
use crate::virtio::{Error, Transport, Virtqueue};

/// `VIRTIO_BLK_F_RO`.
pub const F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_FLUSH`.
pub const F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_BLK_F_MQ`.
pub const F_MQ: u64 = 1 << 12;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// Most queues driven.
pub const MAX_QUEUES: usize = 64;
/// Bytes per verification request.
pub const VERIFY_CHUNK: u32 = 64 * 1024;
/// Bytes per random-read benchmark request.
pub const RAND_BS: u32 = 4096;

#[derive(Clone, Copy, Default)]
struct Req {
    kind: u32,
    sector: u64,
    len: u32,
}

/// One request slot: header (16 bytes) and status byte in DMA memory, a data buffer.
#[derive(Clone, Copy, Default)]
struct Slot {
    hdr: u64,
    buf: u64,
    req: Req,
    busy: bool,
}

/// A virtio-blk device with its queues set up.
pub struct Blk<'t> {
    t: &'t Transport,
    queues: [Option<Virtqueue>; MAX_QUEUES],
    /// Queues in use.
    pub nq: usize,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Negotiated features.
    pub features: u64,
}

/// Result of [`Blk::verify`].
pub struct Verify {
    /// Bytes written and read back.
    pub bytes: u64,
    /// Sectors whose content did not match.
    pub bad_sectors: u64,
    /// Requests the device completed with a non-zero status.
    pub io_errors: u64,
    /// Flush status: `Some(true)` ok, `Some(false)` failed, `None` not offered.
    pub flush: Option<bool>,
    /// Time taken (TSC ticks).
    pub ticks: u64,
}

/// Result of [`Blk::bench`].
pub struct Bench {
    /// Requests in flight per queue.
    pub qd: usize,
    /// Sequential request size.
    pub bs: u32,
    /// Sequential write MiB/s, in hundredths.
    pub seq_write: u64,
    /// Sequential read MiB/s, in hundredths.
    pub seq_read: u64,
    /// Random 4 KiB read IOPS.
    pub rand_iops: u64,
    /// Requests completed with an error status.
    pub io_errors: u64,
}

fn pattern(seed: u64, sector: u64, word: u64) -> u64 {
    (sector << 6 | word).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed
}

fn fill(seed: u64, buf: u64, sector: u64, len: u32) {
    let words = u64::from(len) / 8;
    for i in 0..words {
        mmio_write::<u64>(buf + 8 * i, pattern(seed, sector + i / 64, i % 64));
    }
}

/// Number of mismatching sectors in `buf` (the read-back of `len` bytes from `sector`).
fn check(seed: u64, buf: u64, sector: u64, len: u32) -> u64 {
    let mut bad = 0;
    for s in 0..u64::from(len) / 512 {
        for w in 0..64 {
            if mmio_read::<u64>(buf + 512 * s + 8 * w) != pattern(seed, sector + s, w) {
                bad += 1;
                break;
            }
        }
    }
    bad
}

impl<'t> Blk<'t> {
    /// Sets up the device: features, up to [`MAX_QUEUES`] queues of up to `queue_size`
    /// entries; queue `q` uses MSI-X entry `q % msix_entries` (PCI; 0 entries: none).
    /// Sets DRIVER_OK.
    pub fn new(t: &'t Transport, queue_size: u16, msix_entries: u16) -> Result<Blk<'t>, Error> {
        let features = t.init(F_RO | F_FLUSH | F_MQ)?;
        let mut nq = 1usize;
        if features & F_MQ != 0 {
            nq = usize::from(t.cfg16(34)).clamp(1, MAX_QUEUES);
        }
        if let Some(n) = t.num_queues() {
            nq = nq.min(usize::from(n));
        }
        if nq == 0 {
            return Err("no_queues");
        }
        t.no_config_vector();
        let mut queues = [const { None }; MAX_QUEUES];
        for (q, slot) in queues.iter_mut().enumerate().take(nq) {
            let entry = (msix_entries > 0).then(|| q as u16 % msix_entries);
            *slot = Some(t.setup_queue(q as u16, queue_size, entry)?);
        }
        t.driver_ok();
        Ok(Blk {
            t,
            queues,
            nq,
            capacity: t.cfg64(0).saturating_mul(512),
            features,
        })
    }

    /// Queue count needed for MSI-X planning before [`Blk::new`]: what the transport says
    /// (PCI), else 1 (MMIO devices are asked in `new`).
    pub fn queue_hint(t: &Transport) -> u16 {
        t.num_queues().unwrap_or(1).clamp(1, MAX_QUEUES as u16)
    }

    /// Allocates `per_queue` slots per queue, each with a `buf_len` buffer of its own
    /// (`shared == false`) or all sharing one.
    fn slots(
        &self,
        per_queue: usize,
        buf_len: u32,
        shared: bool,
    ) -> Result<(&'static mut [Slot], usize), Error> {
        let min_size = self
            .queues
            .iter()
            .flatten()
            .map(|q| usize::from(q.size()))
            .min()
            .unwrap_or(0);
        let per = per_queue.min(min_size / 3).max(1);
        let n = per * self.nq;
        let meta = crate::dma::alloc_zeroed((n * core::mem::size_of::<Slot>()) as u64, 64)
            .ok_or("out_of_memory")?;
        // SAFETY: freshly allocated, zeroed, suitably aligned memory for `n` slots (all-zero
        // bytes are a valid `Slot`), owned by this call's caller from now on.
        let slots = unsafe { core::slice::from_raw_parts_mut(meta as *mut Slot, n) };
        let hdrs = crate::dma::alloc(32 * n as u64, 64).ok_or("out_of_memory")?;
        let shared_buf = if shared {
            crate::dma::alloc(u64::from(buf_len), 4096).ok_or("out_of_memory")?
        } else {
            0
        };
        for (i, s) in slots.iter_mut().enumerate() {
            s.hdr = hdrs + 32 * i as u64;
            s.buf = if shared {
                shared_buf
            } else {
                crate::dma::alloc(u64::from(buf_len), 4096).ok_or("out_of_memory")?
            };
        }
        Ok((slots, per))
    }

    /// Keeps every slot busy with requests from `next` until it returns `None` and all are
    /// done. `fill` prepares a write's buffer; `done` sees each completion (buffer, status).
    fn run(
        &mut self,
        slots: &mut [Slot],
        per: usize,
        deadline: u64,
        next: &mut dyn FnMut() -> Option<Req>,
        fill: &mut dyn FnMut(&Req, u64),
        done: &mut dyn FnMut(&Req, u64, u8),
    ) -> Result<(), Error> {
        let mut exhausted = false;
        let mut inflight = 0usize;
        loop {
            for q in 0..self.nq {
                let Some(vq) = self.queues[q].as_mut() else {
                    continue;
                };
                let mut kicked = false;
                for i in q * per..(q + 1) * per {
                    let s = &mut slots[i];
                    if s.busy || exhausted {
                        continue;
                    }
                    let Some(r) = next() else {
                        exhausted = true;
                        break;
                    };
                    mmio_write::<u32>(s.hdr, r.kind);
                    mmio_write::<u32>(s.hdr + 4, 0);
                    mmio_write::<u64>(s.hdr + 8, r.sector);
                    mmio_write::<u8>(s.hdr + 16, 0xFF);
                    let head = if r.kind == T_FLUSH {
                        vq.add(&[(s.hdr, 16, false), (s.hdr + 16, 1, true)])
                    } else {
                        if r.kind == T_OUT {
                            fill(&r, s.buf);
                        }
                        vq.add(&[
                            (s.hdr, 16, false),
                            (s.buf, r.len, r.kind == T_IN),
                            (s.hdr + 16, 1, true),
                        ])
                    };
                    let Some(head) = head else {
                        return Err("queue_full");
                    };
                    // Remember the chain's head next to the status byte: completions are
                    // matched to slots by it.
                    mmio_write::<u32>(s.hdr + 20, u32::from(head));
                    s.req = r;
                    s.busy = true;
                    inflight += 1;
                    kicked = true;
                }
                if kicked {
                    vq.kick();
                }
            }
            let mut progressed = false;
            for q in 0..self.nq {
                let Some(vq) = self.queues[q].as_mut() else {
                    continue;
                };
                while let Some((head, _)) = vq.poll() {
                    progressed = true;
                    let found = slots[q * per..(q + 1) * per]
                        .iter_mut()
                        .find(|s| s.busy && mmio_read::<u32>(s.hdr + 20) == u32::from(head));
                    if let Some(s) = found {
                        s.busy = false;
                        inflight -= 1;
                        let status = mmio_read::<u8>(s.hdr + 16);
                        done(&s.req, s.buf, status);
                    }
                }
            }
            if progressed {
                self.t.ack();
            }
            if exhausted && inflight == 0 {
                return Ok(());
            }
            if rdtsc() > deadline {
                return Err("timeout");
            }
        }
    }

    /// Writes the pattern over the first `bytes` of the disk (rounded down to sectors) with
    /// two requests in flight per queue, flushes, reads it back and checks it.
    pub fn verify(&mut self, bytes: u64, tsc_khz: u64) -> Result<Verify, Error> {
        let t0 = rdtsc();
        let seed = t0.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
        let bytes = bytes.min(self.capacity) & !511;
        let (slots, per) = self.slots(2, VERIFY_CHUNK, false)?;
        let deadline = t0 + tsc_khz.saturating_mul(120_000);
        let mut io_errors = 0u64;
        let mut bad = 0u64;
        let read_only = self.features & F_RO != 0;
        let chunks = |kind: u32| {
            let mut at = 0u64;
            move || {
                if at >= bytes {
                    return None;
                }
                let len = (bytes - at).min(u64::from(VERIFY_CHUNK)) as u32;
                let r = Req {
                    kind,
                    sector: at / 512,
                    len,
                };
                at += u64::from(len);
                Some(r)
            }
        };
        if !read_only {
            self.run(
                slots,
                per,
                deadline,
                &mut chunks(T_OUT),
                &mut |r, buf| fill(seed, buf, r.sector, r.len),
                &mut |_, _, st| io_errors += u64::from(st != 0),
            )?;
        }
        let mut flush = None;
        if self.features & F_FLUSH != 0 {
            let mut once = Some(Req {
                kind: T_FLUSH,
                sector: 0,
                len: 0,
            });
            let mut ok = false;
            self.run(
                slots,
                per,
                deadline,
                &mut || once.take(),
                &mut |_, _| {},
                &mut |_, _, st| ok = st == 0,
            )?;
            flush = Some(ok);
        }
        if !read_only {
            self.run(
                slots,
                per,
                deadline,
                &mut chunks(T_IN),
                &mut |_, _| {},
                &mut |r, buf, st| {
                    io_errors += u64::from(st != 0);
                    bad += check(seed, buf, r.sector, r.len);
                },
            )?;
        }
        Ok(Verify {
            bytes: if read_only { 0 } else { bytes },
            bad_sectors: bad,
            io_errors,
            flush,
            ticks: rdtsc() - t0,
        })
    }

    /// Runs sequential write, sequential read and random 4 KiB read phases of `ms` each,
    /// `qd` requests in flight on every queue (sequential requests of `bs` bytes).
    pub fn bench(&mut self, qd: usize, bs: u32, ms: u64, tsc_khz: u64) -> Result<Bench, Error> {
        let bs = bs.clamp(512, 1 << 20) & !511;
        let (slots, per) = self.slots(qd, bs, true)?;
        let cap = self.capacity;
        let mut io_errors = 0u64;
        let mut rates = [0u64; 3];
        for (phase, rate) in rates.iter_mut().enumerate() {
            let kind = if phase == 0 { T_OUT } else { T_IN };
            let len = if phase == 2 { RAND_BS } else { bs };
            if cap < u64::from(len) || (kind == T_OUT && self.features & F_RO != 0) {
                continue;
            }
            let start = rdtsc();
            let end = start + tsc_khz.saturating_mul(ms);
            let deadline = end + tsc_khz.saturating_mul(30_000);
            let mut at = 0u64;
            let mut rng = start | 1;
            let blocks = cap / u64::from(len);
            let mut next = || {
                if rdtsc() >= end {
                    return None;
                }
                let off = if phase == 2 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    (rng % blocks) * u64::from(len)
                } else {
                    let o = at;
                    at += u64::from(len);
                    if at + u64::from(len) > cap {
                        at = 0;
                    }
                    o
                };
                Some(Req {
                    kind,
                    sector: off / 512,
                    len,
                })
            };
            let mut done_bytes = 0u64;
            let mut done_reqs = 0u64;
            self.run(
                slots,
                per,
                deadline,
                &mut next,
                &mut |_, _| {},
                &mut |r, _, st| {
                    if st == 0 {
                        done_bytes += u64::from(r.len);
                        done_reqs += 1;
                    } else {
                        io_errors += 1;
                    }
                },
            )?;
            let ticks = (rdtsc() - start).max(1);
            *rate = if phase == 2 {
                // requests per second = reqs * tsc_khz * 1000 / ticks
                done_reqs.saturating_mul(tsc_khz).saturating_mul(1000) / ticks
            } else {
                // MiB/s * 100 = bytes/ms * 1000 * 100 / 2^20
                let per_ms = done_bytes.saturating_mul(tsc_khz) / ticks;
                per_ms.saturating_mul(100_000) >> 20
            };
        }
        Ok(Bench {
            qd: per,
            bs,
            seq_write: rates[0],
            seq_read: rates[1],
            rand_iops: rates[2],
            io_errors,
        })
    }
}
