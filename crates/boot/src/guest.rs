// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Small helpers for writing boot data into guest memory with errors that say what failed.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::error::{Error, Result};

/// Fails with [`Error::MissingMemory`] unless `start..start+len` is backed by guest memory.
pub(crate) fn require_range<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    start: u64,
    len: u64,
) -> Result<()> {
    let end = start
        .checked_add(len)
        .ok_or(Error::RangeOverflow { start, size: len })?;
    let Ok(len_usize) = usize::try_from(len) else {
        return Err(Error::MissingMemory { what, start, end });
    };
    if len_usize == 0 || GuestMemoryBackend::check_range(mem, GuestAddress(start), len_usize) {
        Ok(())
    } else {
        Err(Error::MissingMemory { what, start, end })
    }
}

/// Writes `bytes` at `addr` after checking the range is backed by guest memory.
pub(crate) fn write_bytes<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<()> {
    require_range(mem, what, addr, bytes.len() as u64)?;
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { what, addr, source })
}

/// Fills `addr..addr+len` with zeroes.
pub(crate) fn zero_range<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<()> {
    const CHUNK: usize = 64 * 1024;
    static ZEROES: [u8; CHUNK] = [0; CHUNK];
    require_range(mem, what, addr, len)?;
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64);
        let at = addr + done;
        mem.write_slice(&ZEROES[..n as usize], GuestAddress(at))
            .map_err(|source| Error::GuestMemory {
                what,
                addr: at,
                source,
            })?;
        done += n;
    }
    Ok(())
}
