// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Read access to physical memory for the boot-information, ACPI and MP-table parsers.
//!
//! The parsers only see this trait, so they are pure code: the guest implements it over its
//! identity map, and the host-side unit tests implement it over a byte vector and feed it
//! garbage. Every read can fail (`None`), and the parsers treat a failed read as "not there".

/// Physical memory that can be read.
pub trait PhysMem {
    /// Fills `buf` from physical address `addr`. Returns `false` (and leaves `buf` in an
    /// unspecified state) if any byte of the range is not readable.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

    /// Reads a byte.
    fn read_u8(&self, addr: u64) -> Option<u8> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b).then_some(b[0])
    }

    /// Reads a little-endian `u16`.
    fn read_u16(&self, addr: u64) -> Option<u16> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b).then(|| u16::from_le_bytes(b))
    }

    /// Reads a little-endian `u32`.
    fn read_u32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b).then(|| u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64`.
    fn read_u64(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }

    /// Sum of `len` bytes at `addr` modulo 256 (ACPI / MP checksums), or `None` if unreadable.
    fn checksum(&self, addr: u64, len: u64) -> Option<u8> {
        let mut sum = 0u8;
        let mut chunk = [0u8; 256];
        let mut done = 0u64;
        while done < len {
            let n = core::cmp::min(len - done, chunk.len() as u64) as usize;
            let at = addr.checked_add(done)?;
            let buf = chunk.get_mut(..n)?;
            if !self.read(at, buf) {
                return None;
            }
            sum = buf.iter().fold(sum, |s, b| s.wrapping_add(*b));
            done += n as u64;
        }
        Some(sum)
    }
}

/// A sorted, duplicate-free set of APIC IDs with a fixed capacity (no allocator in the guest).
#[derive(Clone)]
pub struct ApicIdSet<const N: usize> {
    ids: [u32; N],
    len: usize,
    overflow: bool,
}

impl<const N: usize> Default for ApicIdSet<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> ApicIdSet<N> {
    /// An empty set.
    pub const fn new() -> Self {
        ApicIdSet {
            ids: [0; N],
            len: 0,
            overflow: false,
        }
    }

    /// Adds `id` (ignored if present; sets the overflow flag if the set is full).
    #[inline(always)]
    pub fn insert(&mut self, id: u32) {
        // Fast path (inlined): firmware lists CPUs in ascending order.
        let len = self.len;
        if len < N && (len == 0 || self.ids[len - 1] < id) {
            self.ids[len] = id;
            self.len = len + 1;
            return;
        }
        self.insert_sorted(id);
    }

    /// Adds every ID `ids` yields, as [`Self::insert`] would one by one, keeping the length
    /// and the largest ID in registers while the IDs arrive in ascending order.
    #[inline(always)]
    pub fn insert_all(&mut self, ids: impl Iterator<Item = u32>) {
        let mut len = self.len;
        let mut last = if len == 0 {
            None
        } else {
            self.ids.get(len - 1).copied()
        };
        for id in ids {
            if len < N && last.is_none_or(|l| l < id) {
                self.ids[len] = id;
                len += 1;
                last = Some(id);
            } else {
                self.len = len;
                self.insert_sorted(id);
                len = self.len;
                last = self.ids.get(len.wrapping_sub(1)).copied();
            }
        }
        self.len = len;
    }

    #[inline(never)]
    fn insert_sorted(&mut self, id: u32) {
        let cur = &self.ids[..self.len];
        match cur.binary_search(&id) {
            Ok(_) => {}
            Err(pos) => {
                if self.len == N {
                    self.overflow = true;
                    return;
                }
                self.ids.copy_within(pos..self.len, pos + 1);
                self.ids[pos] = id;
                self.len += 1;
            }
        }
    }

    /// Removes every ID.
    pub fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    /// The IDs, ascending.
    pub fn as_slice(&self) -> &[u32] {
        &self.ids[..self.len]
    }

    /// Number of IDs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` if there are no IDs.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `true` if an insert was dropped because the set was full.
    pub fn overflowed(&self) -> bool {
        self.overflow
    }
}
