// SPDX-License-Identifier: Apache-2.0 OR MIT
//! virtio-blk requests (virtio 1.2, section 5.2.6): parsing a descriptor chain into a
//! [`Request`] and executing it against a [`BlockBackend`].
//!
//! Parsing does not rely on the driver's framing: the first 16 device-readable bytes are
//! the header, the rest of the readable part is OUT/DISCARD/WRITE_ZEROES data, the last
//! device-writable byte is the status and the writable bytes before it are IN/GET_ID data.

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, VolatileSlice,
};
use vmkit_block::BlockBackend;

use crate::devices::GuestMem;

/// Bytes per sector in every virtio-blk address and length.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the serial returned by `GET_ID`.
pub const ID_BYTES: usize = 20;

/// Request types (`virtio_blk_outhdr.type`).
pub mod req_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Device ID string.
    pub const GET_ID: u32 = 8;
    /// Discard sectors.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request type not supported.
    pub const UNSUPP: u8 = 2;
}

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const FLAG_UNMAP: u32 = 1;

/// The request header (`virtio_blk_outhdr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RequestHeader {
    /// Request type.
    pub type_: u32,
    /// Reserved (was `ioprio`).
    pub reserved: u32,
    /// First sector.
    pub sector: u64,
}

// SAFETY: plain little-endian integers without padding; any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// One `virtio_blk_discard_write_zeroes` range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DiscardRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (`FLAG_UNMAP`).
    pub flags: u32,
}

// SAFETY: plain integers without padding; any bit pattern is valid.
unsafe impl ByteValued for DiscardRange {}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read into guest buffers.
    In,
    /// Write from guest buffers.
    Out,
    /// Flush.
    Flush,
    /// Return the device ID.
    GetId,
    /// Discard ranges.
    Discard,
    /// Write zeroes to ranges.
    WriteZeroes,
}

/// A guest buffer: address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A parsed, validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Type.
    pub kind: RequestKind,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Data buffers: writable for IN/GET_ID, readable otherwise.
    pub data: Vec<Segment>,
    /// Total data length.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// Device properties a request is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Disk size in sectors.
    pub capacity_sectors: u64,
    /// Most data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// `VIRTIO_BLK_F_FLUSH` was negotiated.
    pub flush: bool,
    /// `VIRTIO_BLK_F_DISCARD` was negotiated.
    pub discard: bool,
    /// `VIRTIO_BLK_F_WRITE_ZEROES` was negotiated.
    pub write_zeroes: bool,
    /// `max_discard_sectors`.
    pub max_discard_sectors: u32,
    /// `max_discard_seg`.
    pub max_discard_seg: u32,
    /// `max_write_zeroes_sectors`.
    pub max_write_zeroes_sectors: u32,
    /// `max_write_zeroes_seg`.
    pub max_write_zeroes_seg: u32,
    /// The `GET_ID` answer.
    pub serial: [u8; ID_BYTES],
}

/// Why a chain was refused; the status byte to report (if any) comes with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No device-writable byte for the status.
    #[error("no status byte")]
    NoStatus,
    /// A descriptor of length zero.
    #[error("zero-length descriptor")]
    ZeroLength,
    /// A readable descriptor after a writable one.
    #[error("readable descriptor after a writable one")]
    Order,
    /// Fewer than 16 readable bytes.
    #[error("header too short")]
    ShortHeader,
    /// The header is not in guest memory.
    #[error("header outside guest memory")]
    HeaderMemory,
    /// Data in the wrong direction for the request type.
    #[error("data buffer in the wrong direction")]
    Direction,
    /// Data length is not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}+{count} past the end of the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sector count.
        count: u64,
    },
    /// More segments than `seg_max`.
    #[error("{0} segments exceed seg_max")]
    TooManySegments(usize),
    /// Writing to a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
    /// A discard/write-zeroes range list that is malformed or exceeds the limits.
    #[error("bad discard/write-zeroes ranges")]
    BadRanges,
    /// A request type or flag the device does not support.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The status byte this error reports.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// A chain that failed to parse: the error and where to put the status, if anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseFailure {
    /// Why.
    pub error: RequestError,
    /// The status byte's address, if the chain has one.
    pub status_addr: Option<GuestAddress>,
}

/// Parses a descriptor chain (any iterator of split descriptors) into a request.
pub fn parse<I, M>(descs: I, mem: &M, limits: &RequestLimits) -> Result<Request, ParseFailure>
where
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    M: GuestMemory + ?Sized,
{
    let mut readable: Vec<Segment> = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut early: Option<RequestError> = None;
    for d in descs {
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if seg.len == 0 {
            early.get_or_insert(RequestError::ZeroLength);
            continue;
        }
        if d.is_write_only() {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                early.get_or_insert(RequestError::Order);
            }
            readable.push(seg);
        }
    }
    // The status byte: the last writable byte.
    let status_addr = writable
        .last()
        .and_then(|s| s.addr.checked_add(u64::from(s.len) - 1));
    let fail = |error| ParseFailure { error, status_addr };
    let Some(status_addr) = status_addr else {
        return Err(fail(RequestError::NoStatus));
    };
    if let Some(e) = early {
        return Err(fail(e));
    }
    if let Some(last) = writable.last_mut() {
        last.len -= 1;
        if last.len == 0 {
            writable.pop();
        }
    }
    // The header: the first 16 readable bytes.
    let hdr_len = std::mem::size_of::<RequestHeader>() as u64;
    let mut header = RequestHeader::default();
    {
        let mut buf = [0u8; 16];
        let got = copy_from_segments(mem, &readable, &mut buf).map_err(&fail)?;
        if (got as u64) < hdr_len {
            return Err(fail(RequestError::ShortHeader));
        }
        if let Some(h) = RequestHeader::from_slice(&buf) {
            header = *h;
        }
    }
    let out_data = skip_segments(&readable, hdr_len);
    let in_data = writable;
    let type_ = u32::from_le(header.type_);
    let sector = u64::from_le(header.sector);
    let (kind, data) = match type_ {
        req_type::IN => (RequestKind::In, pick(in_data, &out_data).map_err(fail)?),
        req_type::OUT => (RequestKind::Out, pick(out_data, &in_data).map_err(fail)?),
        req_type::FLUSH if limits.flush => (RequestKind::Flush, Vec::new()),
        req_type::GET_ID => (RequestKind::GetId, pick(in_data, &out_data).map_err(fail)?),
        req_type::DISCARD if limits.discard => (
            RequestKind::Discard,
            pick(out_data, &in_data).map_err(fail)?,
        ),
        req_type::WRITE_ZEROES if limits.write_zeroes => (
            RequestKind::WriteZeroes,
            pick(out_data, &in_data).map_err(fail)?,
        ),
        other => return Err(fail(RequestError::Unsupported(other))),
    };
    let data_len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    match kind {
        RequestKind::In | RequestKind::Out => {
            if kind == RequestKind::Out && limits.read_only {
                return Err(fail(RequestError::ReadOnly));
            }
            if data_len % SECTOR_SIZE != 0 {
                return Err(fail(RequestError::Unaligned(data_len)));
            }
            if data.len() > limits.seg_max as usize {
                return Err(fail(RequestError::TooManySegments(data.len())));
            }
            let count = data_len >> SECTOR_SHIFT;
            match sector.checked_add(count) {
                Some(end) if end <= limits.capacity_sectors => {}
                _ => return Err(fail(RequestError::OutOfRange { sector, count })),
            }
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            if limits.read_only {
                return Err(fail(RequestError::ReadOnly));
            }
        }
        RequestKind::Flush | RequestKind::GetId => {}
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status_addr,
    })
}

/// The data list of the request's direction; the other direction must be empty.
fn pick(data: Vec<Segment>, other: &[Segment]) -> Result<Vec<Segment>, RequestError> {
    if other.is_empty() {
        Ok(data)
    } else {
        Err(RequestError::Direction)
    }
}

/// The segments after the first `skip` bytes.
fn skip_segments(segs: &[Segment], mut skip: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        // `skip < len <= u32::MAX`, and the address was valid for `len` bytes or will be
        // checked when accessed.
        if let Some(addr) = s.addr.checked_add(skip) {
            out.push(Segment {
                addr,
                len: (len - skip) as u32,
            });
        }
        skip = 0;
    }
    out
}

/// Reads up to `buf.len()` bytes from the start of `segs`; returns how many there were.
fn copy_from_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<usize, RequestError> {
    let mut pos = 0usize;
    for s in segs {
        if pos == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - pos);
        mem.read_slice(&mut buf[pos..pos + n], s.addr)
            .map_err(|_| RequestError::HeaderMemory)?;
        pos += n;
    }
    Ok(pos)
}

/// Host errors while executing a request (all reported as `VIRTIO_BLK_S_IOERR`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecuteError {
    /// A data buffer is outside guest memory.
    #[error("data buffer outside guest memory")]
    Memory,
    /// The backend failed.
    #[error("backend: {0}")]
    Backend(#[from] vmkit_block::BlockError),
    /// The request is malformed in a way only visible while executing (discard ranges).
    #[error("{0}")]
    Request(RequestError),
}

impl ExecuteError {
    /// The status byte this error reports.
    pub fn status(&self) -> u8 {
        match self {
            ExecuteError::Request(e) => e.status(),
            _ => status::IOERR,
        }
    }
}

/// Guest buffers as plain `VolatileSlice`s the block backend accepts, valid while `mem`
/// is borrowed. Buffers may span memory regions.
pub fn guest_slices<'m>(
    mem: &'m GuestMem,
    segs: &[Segment],
) -> Result<Vec<VolatileSlice<'m>>, ExecuteError> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        for part in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let part = part.map_err(|_| ExecuteError::Memory)?;
            // SAFETY: `part` covers `part.len()` bytes of a guest memory region mapping;
            // the mapping lives as long as `mem` (the memory guard) is borrowed, which the
            // returned slice's lifetime `'m` enforces. Guest memory is shared with the guest
            // anyway; `VolatileSlice` only performs volatile accesses.
            let plain = unsafe { VolatileSlice::new(part.ptr_guard_mut().as_ptr(), part.len()) };
            out.push(plain);
        }
    }
    Ok(out)
}

/// Marks guest buffers dirty after the device wrote them through plain slices.
fn mark_dirty(mem: &GuestMem, segs: &[Segment]) {
    for s in segs {
        for part in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize).flatten() {
            part.bitmap().mark_dirty(0, part.len());
        }
    }
}

/// Executes a parsed request; returns the number of data bytes written into guest memory
/// (not counting the status byte).
pub fn execute(
    req: &Request,
    mem: &GuestMem,
    backend: &dyn BlockBackend,
    limits: &RequestLimits,
) -> Result<u32, ExecuteError> {
    let offset = req.sector << SECTOR_SHIFT;
    match req.kind {
        RequestKind::In => {
            let slices = guest_slices(mem, &req.data)?;
            let result = backend.read_vectored(offset, &slices);
            // Even a read that failed part-way may have changed guest memory: mark it dirty
            // either way, so that live migration copies it.
            mark_dirty(mem, &req.data);
            result?;
            // Bounded by seg_max * u32::MAX in theory; a chain is at most 4 GiB (virtio
            // 2.7.5.2, enforced by the chain iterator).
            Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX))
        }
        RequestKind::Out => {
            let slices = guest_slices(mem, &req.data)?;
            backend.write_vectored(offset, &slices)?;
            Ok(0)
        }
        RequestKind::Flush => {
            backend.flush()?;
            Ok(0)
        }
        RequestKind::GetId => {
            let mut written = 0usize;
            for s in &req.data {
                if written == ID_BYTES {
                    break;
                }
                let n = (s.len as usize).min(ID_BYTES - written);
                mem.write_slice(&limits.serial[written..written + n], s.addr)
                    .map_err(|_| ExecuteError::Memory)?;
                written += n;
            }
            Ok(written as u32)
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            let zeroes = req.kind == RequestKind::WriteZeroes;
            let (max_sectors, max_seg) = if zeroes {
                (limits.max_write_zeroes_sectors, limits.max_write_zeroes_seg)
            } else {
                (limits.max_discard_sectors, limits.max_discard_seg)
            };
            let entry = std::mem::size_of::<DiscardRange>() as u64;
            if req.data_len == 0 || req.data_len % entry != 0 {
                return Err(ExecuteError::Request(RequestError::BadRanges));
            }
            let count = req.data_len / entry;
            if count > u64::from(max_seg) {
                return Err(ExecuteError::Request(RequestError::BadRanges));
            }
            let mut raw = vec![0u8; req.data_len as usize];
            let mut pos = 0usize;
            for s in &req.data {
                let n = s.len as usize;
                mem.read_slice(&mut raw[pos..pos + n], s.addr)
                    .map_err(|_| ExecuteError::Memory)?;
                pos += n;
            }
            let mut ranges = Vec::with_capacity(count as usize);
            for chunk in raw.chunks_exact(entry as usize) {
                let r = DiscardRange::from_slice(chunk)
                    .copied()
                    .ok_or(ExecuteError::Request(RequestError::BadRanges))?;
                let (sector, num, flags) = (
                    u64::from_le(r.sector),
                    u32::from_le(r.num_sectors),
                    u32::from_le(r.flags),
                );
                if flags & !FLAG_UNMAP != 0 || (!zeroes && flags & FLAG_UNMAP != 0) {
                    return Err(ExecuteError::Request(RequestError::Unsupported(flags)));
                }
                if num > max_sectors {
                    return Err(ExecuteError::Request(RequestError::BadRanges));
                }
                match sector.checked_add(u64::from(num)) {
                    Some(end) if end <= limits.capacity_sectors => {}
                    _ => {
                        return Err(ExecuteError::Request(RequestError::OutOfRange {
                            sector,
                            count: u64::from(num),
                        }))
                    }
                }
                ranges.push((sector, num, flags & FLAG_UNMAP != 0));
            }
            for (sector, num, unmap) in ranges {
                let (off, len) = (sector << SECTOR_SHIFT, u64::from(num) << SECTOR_SHIFT);
                if zeroes {
                    backend.write_zeroes(off, len, unmap)?;
                } else {
                    backend.discard(off, len)?;
                }
            }
            Ok(0)
        }
    }
}

/// Parses and executes one chain, writes its status byte, and returns the used length
/// (bytes written into the chain's writable buffers, status included; 0 if the chain has no
/// writable status byte).
pub fn process_chain<I>(
    descs: I,
    mem: &GuestMem,
    backend: &dyn BlockBackend,
    limits: &RequestLimits,
) -> u32
where
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
{
    finish(parse(descs, mem, limits), mem, backend, limits)
}

/// Executes a parsed request (or reports its parse failure) and writes the status byte;
/// returns the used length, as [`process_chain`] does. Lets a device parse chains on one
/// thread and execute them on others.
pub fn finish(
    parsed: Result<Request, ParseFailure>,
    mem: &GuestMem,
    backend: &dyn BlockBackend,
    limits: &RequestLimits,
) -> u32 {
    let (status_addr, status, written) = match parsed {
        Ok(req) => match execute(&req, mem, backend, limits) {
            Ok(n) => (Some(req.status_addr), status::OK, n),
            Err(e) => {
                log::debug!("virtio-blk: {:?} request failed: {e}", req.kind);
                (Some(req.status_addr), e.status(), 0)
            }
        },
        Err(f) => {
            log::debug!("virtio-blk: malformed request: {}", f.error);
            (f.status_addr, f.error.status(), 0)
        }
    };
    match status_addr {
        Some(addr) if mem.write_obj(status, addr).is_ok() => written.saturating_add(1),
        _ => 0,
    }
}
