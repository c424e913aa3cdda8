// SPDX-License-Identifier: Apache-2.0 OR MIT
//! A small, bounds-checked ELF64 reader: what a loader needs to know about the guest image.

use thiserror::Error;

/// Why an image is not a loadable x86_64 ELF for us.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ElfError {
    /// Fewer bytes than the structure being read.
    #[error("ELF image truncated: {what} needs bytes up to {end}, image has {len}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// End offset needed.
        end: u64,
        /// Image length.
        len: usize,
    },
    /// Missing `\x7fELF` magic.
    #[error("not an ELF image (bad magic)")]
    BadMagic,
    /// Not ELFCLASS64 / little endian.
    #[error("not a 64-bit little-endian ELF (class {class}, data {data})")]
    NotElf64 {
        /// EI_CLASS.
        class: u8,
        /// EI_DATA.
        data: u8,
    },
    /// `e_machine` is not EM_X86_64.
    #[error("ELF machine is {0}, not x86_64 (62)")]
    NotX86_64(u16),
    /// `e_type` is not ET_EXEC.
    #[error("ELF type is {0}, not an executable (2)")]
    NotExecutable(u16),
    /// Program header entries of an unexpected size.
    #[error("ELF program header entry size is {0}, expected 56")]
    BadProgramHeaderSize(u16),
    /// A segment's file range lies outside the image, or its sizes are inconsistent.
    #[error("ELF segment {index} is invalid: {reason}")]
    BadSegment {
        /// Program header index.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

/// A `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the segment's bytes in the file.
    pub offset: u64,
    /// Virtual address.
    pub vaddr: u64,
    /// Physical (load) address.
    pub paddr: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zero).
    pub memsz: u64,
    /// `p_flags` (1 = X, 2 = W, 4 = R).
    pub flags: u32,
}

/// What a loader needs from the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_entry`: the 64-bit (Linux boot protocol) entry point.
    pub entry: u64,
    /// The PVH entry point from the `XEN_ELFNOTE_PHYS32_ENTRY` note, if any.
    pub pvh_entry: Option<u32>,
    /// The `PT_LOAD` segments, in file order.
    pub segments: Vec<Segment>,
}

impl ElfInfo {
    /// The file bytes of the segment containing physical address `paddr`, from `paddr` to the
    /// end of the segment's file data.
    pub fn bytes_at<'a>(&self, image: &'a [u8], paddr: u64) -> Option<&'a [u8]> {
        let s = self
            .segments
            .iter()
            .find(|s| paddr >= s.paddr && paddr - s.paddr < s.filesz)?;
        let start = usize::try_from(s.offset.checked_add(paddr - s.paddr)?).ok()?;
        let end = usize::try_from(s.offset.checked_add(s.filesz)?).ok()?;
        image.get(start..end)
    }
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn slice<'a>(b: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let end = off.checked_add(len).ok_or(ElfError::Truncated {
        what,
        end: u64::MAX,
        len: b.len(),
    })?;
    let (s, e) = (usize::try_from(off), usize::try_from(end));
    match (s, e) {
        (Ok(s), Ok(e)) if e <= b.len() => Ok(&b[s..e]),
        _ => Err(ElfError::Truncated {
            what,
            end,
            len: b.len(),
        }),
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Reads the notes of one `PT_NOTE` segment; returns the PVH entry if present.
fn pvh_note(notes: &[u8]) -> Option<u32> {
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let namesz = u32_at(notes, at) as usize;
        let descsz = u32_at(notes, at + 4) as usize;
        let kind = u32_at(notes, at + 8);
        let name_start = at + 12;
        let desc_start = name_start.checked_add(namesz.checked_add(3)? & !3)?;
        let next = desc_start.checked_add(descsz.checked_add(3)? & !3)?;
        let name = notes.get(name_start..name_start.checked_add(namesz)?)?;
        let desc = notes.get(desc_start..desc_start.checked_add(descsz)?)?;
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY && desc.len() >= 4 {
            return Some(u32_at(desc, 0));
        }
        at = next;
    }
    None
}

/// Checks that `image` is an x86_64 ELF executable and returns its entry points and load
/// segments. Never panics, whatever the bytes.
pub fn inspect_elf(image: &[u8]) -> Result<ElfInfo, ElfError> {
    let eh = slice(image, 0, 64, "ELF header")?;
    if &eh[0..4] != b"\x7fELF" {
        return Err(ElfError::BadMagic);
    }
    if eh[4] != 2 || eh[5] != 1 {
        return Err(ElfError::NotElf64 {
            class: eh[4],
            data: eh[5],
        });
    }
    let e_type = u16_at(eh, 16);
    let machine = u16_at(eh, 18);
    if machine != 62 {
        return Err(ElfError::NotX86_64(machine));
    }
    if e_type != 2 {
        return Err(ElfError::NotExecutable(e_type));
    }
    let entry = u64_at(eh, 24);
    let phoff = u64_at(eh, 32);
    let phentsize = u16_at(eh, 54);
    let phnum = u16_at(eh, 56);
    if phnum > 0 && phentsize != 56 {
        return Err(ElfError::BadProgramHeaderSize(phentsize));
    }
    let phdrs = slice(image, phoff, u64::from(phnum) * 56, "program headers")?;
    let mut info = ElfInfo {
        entry,
        pvh_entry: None,
        segments: Vec::new(),
    };
    for (index, ph) in phdrs.chunks_exact(56).enumerate() {
        let kind = u32_at(ph, 0);
        let flags = u32_at(ph, 4);
        let offset = u64_at(ph, 8);
        let vaddr = u64_at(ph, 16);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        match kind {
            PT_LOAD => {
                if filesz > memsz {
                    return Err(ElfError::BadSegment {
                        index,
                        reason: "file size exceeds memory size",
                    });
                }
                if paddr.checked_add(memsz).is_none() {
                    return Err(ElfError::BadSegment {
                        index,
                        reason: "address range overflows",
                    });
                }
                slice(image, offset, filesz, "segment data").map_err(|_| ElfError::BadSegment {
                    index,
                    reason: "data outside the image",
                })?;
                info.segments.push(Segment {
                    offset,
                    vaddr,
                    paddr,
                    filesz,
                    memsz,
                    flags,
                });
            }
            PT_NOTE => {
                let notes = slice(image, offset, filesz, "note segment").map_err(|_| {
                    ElfError::BadSegment {
                        index,
                        reason: "notes outside the image",
                    }
                })?;
                if info.pvh_entry.is_none() {
                    info.pvh_entry = pvh_note(notes);
                }
            }
            _ => {}
        }
    }
    Ok(info)
}
