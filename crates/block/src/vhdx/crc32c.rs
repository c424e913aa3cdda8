// SPDX-License-Identifier: Apache-2.0 OR MIT
//! CRC-32C (Castagnoli), the checksum of every VHDX header, region table and log entry.

const POLY: u32 = 0x82f6_3b78; // reflected 0x1EDC6F41

const fn make_table() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

static TABLE: [[u32; 256]; 8] = make_table();

/// Continues a CRC-32C over `data`. Start with `crc = 0`.
pub fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = TABLE[7][(lo & 0xff) as usize]
            ^ TABLE[6][((lo >> 8) & 0xff) as usize]
            ^ TABLE[5][((lo >> 16) & 0xff) as usize]
            ^ TABLE[4][(lo >> 24) as usize]
            ^ TABLE[3][(hi & 0xff) as usize]
            ^ TABLE[2][((hi >> 8) & 0xff) as usize]
            ^ TABLE[1][((hi >> 16) & 0xff) as usize]
            ^ TABLE[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ TABLE[0][((c ^ u32::from(b)) & 0xff) as usize];
    }
    !c
}

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_update(0, data)
}

/// CRC-32C of `data` with the 4 bytes at `field` counted as zeroes (how VHDX structures
/// checksum themselves).
pub fn crc32c_with_zero_field(data: &[u8], field: usize) -> u32 {
    let (Some(before), Some(after)) = (data.get(..field), data.get(field + 4..)) else {
        return crc32c(data);
    };
    let c = crc32c_update(0, before);
    let c = crc32c_update(c, &[0u8; 4]);
    crc32c_update(c, after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // RFC 3720 / iSCSI test vectors.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
        let mut v = b"abcd1234efgh".to_vec();
        let c = crc32c_with_zero_field(&v, 4);
        v[4..8].fill(0);
        assert_eq!(c, crc32c(&v));
        assert_eq!(
            crc32c_update(crc32c(b"1234"), b"56789"),
            crc32c(b"123456789")
        );
    }
}
