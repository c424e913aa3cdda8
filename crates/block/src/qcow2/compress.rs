// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Decompression of qcow2 compressed clusters (raw deflate or zstd).

use std::path::Path;

use super::header::CompressionType;
use crate::BlockError;

/// Decompresses one cluster: `src` is the compressed data as stored (it may carry padding
/// up to the next sector), `dst` the cluster buffer, which must be filled exactly.
pub fn decompress(
    kind: CompressionType,
    src: &[u8],
    dst: &mut [u8],
    path: &Path,
    host_offset: u64,
) -> Result<(), BlockError> {
    let bad = |why: String| {
        BlockError::corrupt(
            path,
            format!("compressed cluster at 0x{host_offset:x}: {why}"),
        )
    };
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress(src, dst, flate2::FlushDecompress::Finish)
                .map_err(|e| bad(format!("deflate error: {e}")))?;
            let produced = d.total_out() as usize;
            match status {
                flate2::Status::StreamEnd | flate2::Status::BufError | flate2::Status::Ok
                    if produced == dst.len() =>
                {
                    Ok(())
                }
                _ => Err(bad(format!(
                    "inflated to {produced} bytes instead of {}",
                    dst.len()
                ))),
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut dec = Decoder::new().map_err(|e| bad(format!("zstd init: {e}")))?;
            let mut input = InBuffer::around(src);
            let mut out = OutBuffer::around(dst);
            loop {
                let before_in = input.pos();
                let before_out = out.pos();
                let hint = dec
                    .run(&mut input, &mut out)
                    .map_err(|e| bad(format!("zstd error: {e}")))?;
                if out.pos() == out.capacity() {
                    return Ok(());
                }
                if hint == 0 || (input.pos() == before_in && out.pos() == before_out) {
                    return Err(bad(format!(
                        "zstd data ended after {} of {} bytes",
                        out.pos(),
                        out.capacity()
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn deflate_and_zstd_round_trip() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0; 300]); // sector padding
        let mut out = vec![0u8; data.len()];
        decompress(CompressionType::Zlib, &c, &mut out, Path::new("x"), 0).unwrap();
        assert_eq!(out, data);
        let mut z = zstd::bulk::compress(&data, 3).unwrap();
        z.extend_from_slice(&[0; 100]);
        let mut out = vec![0u8; data.len()];
        decompress(CompressionType::Zstd, &z, &mut out, Path::new("x"), 0).unwrap();
        assert_eq!(out, data);
        // Garbage never panics and errors.
        let mut out = vec![0u8; 4096];
        assert!(decompress(
            CompressionType::Zlib,
            &[1, 2, 3],
            &mut out,
            Path::new("x"),
            0
        )
        .is_err());
        assert!(decompress(
            CompressionType::Zstd,
            &[1, 2, 3],
            &mut out,
            Path::new("x"),
            0
        )
        .is_err());
    }
}
