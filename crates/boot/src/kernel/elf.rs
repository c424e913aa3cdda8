// SPDX-License-Identifier: Apache-2.0 OR MIT
//! ELF64 header inspection: loadable segments and the PVH entry note.
//!
//! linux-loader copies the segments into guest memory; this module reads the headers first so
//! that a kernel which does not fit, or an ELF we cannot boot, gets a clear error before any
//! guest memory is touched. It also finds the PVH note itself: linux-loader 0.14 keeps only the
//! result of the *last* `PT_NOTE` segment, so a PVH note followed by another note segment would
//! be missed.

use std::io::{Read, Seek, SeekFrom};

/// ELF magic.
pub const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH 32-bit entry point note type.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PN_XNUM: u16 = 0xffff;
/// Note segments larger than this are only searched in their first part.
const MAX_NOTE_BYTES: u64 = 1 << 20;

/// One `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElfSegment {
    /// Offset of the segment's bytes in the file.
    pub offset: u64,
    /// Guest-physical load address.
    pub paddr: u64,
    /// Bytes copied from the file.
    pub filesz: u64,
    /// Bytes occupied in memory (the rest after `filesz` is zeroed).
    pub memsz: u64,
}

/// What the ELF headers say about booting the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_entry`: the 64-bit entry point.
    pub entry: u64,
    /// PVH 32-bit entry point from the `XEN_ELFNOTE_PHYS32_ENTRY` note, if present.
    pub pvh_entry: Option<u64>,
    /// Loadable segments with a non-zero memory size.
    pub segments: Vec<ElfSegment>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

fn read_at<R: Read + Seek>(r: &mut R, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    r.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("cannot seek to {offset:#x}: {e}"))?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .map_err(|e| format!("cannot read {len} bytes at {offset:#x}: {e}"))?;
    Ok(buf)
}

/// Parses the ELF headers of `image` (whose total size is `file_len`).
///
/// Errors are reasons to put in [`Error::BadElf`](crate::Error::BadElf).
pub fn parse_elf<R: Read + Seek>(image: &mut R, file_len: u64) -> Result<ElfInfo, String> {
    if file_len < EHDR_SIZE as u64 {
        return Err(format!(
            "file is {file_len} bytes, shorter than an ELF64 header"
        ));
    }
    let ehdr = read_at(image, 0, EHDR_SIZE)?;
    if ehdr.get(0..4) != Some(&ELF_MAGIC[..]) {
        return Err("no ELF magic".into());
    }
    match ehdr.get(4) {
        Some(2) => {}
        Some(1) => {
            return Err("32-bit ELF (ELFCLASS32) is not supported; build an ELF64 kernel".into())
        }
        other => return Err(format!("unknown ELF class {other:?}")),
    }
    if ehdr.get(5) != Some(&1) {
        return Err("not a little-endian ELF".into());
    }
    let bad = || "truncated ELF header".to_string();
    let e_type = u16_at(&ehdr, 16).ok_or_else(bad)?;
    let e_machine = u16_at(&ehdr, 18).ok_or_else(bad)?;
    let entry = u64_at(&ehdr, 24).ok_or_else(bad)?;
    let phoff = u64_at(&ehdr, 32).ok_or_else(bad)?;
    let phentsize = u16_at(&ehdr, 54).ok_or_else(bad)?;
    let phnum = u16_at(&ehdr, 56).ok_or_else(bad)?;
    if e_machine != EM_X86_64 {
        return Err(format!(
            "machine type {e_machine} is not x86_64 ({EM_X86_64})"
        ));
    }
    if e_type != ET_EXEC {
        return Err(format!(
            "ELF type {e_type} is not an executable (ET_EXEC = {ET_EXEC})"
        ));
    }
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(format!(
            "program header size {phentsize} is not {PHDR_SIZE}"
        ));
    }
    if phnum == 0 || phnum == PN_XNUM {
        return Err(format!("unsupported program header count {phnum}"));
    }
    if phoff < EHDR_SIZE as u64 {
        return Err(format!(
            "program headers at {phoff:#x} overlap the ELF header"
        ));
    }
    let ph_len = usize::from(phnum) * PHDR_SIZE;
    if phoff
        .checked_add(ph_len as u64)
        .is_none_or(|end| end > file_len)
    {
        return Err(format!(
            "program headers at {phoff:#x} run past the end of the file"
        ));
    }
    let phdrs = read_at(image, phoff, ph_len)?;

    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for ph in phdrs.chunks_exact(PHDR_SIZE) {
        let bad = || "truncated program header".to_string();
        let p_type = u32_at(ph, 0).ok_or_else(bad)?;
        let offset = u64_at(ph, 8).ok_or_else(bad)?;
        let paddr = u64_at(ph, 24).ok_or_else(bad)?;
        let filesz = u64_at(ph, 32).ok_or_else(bad)?;
        let memsz = u64_at(ph, 40).ok_or_else(bad)?;
        let in_file = offset
            .checked_add(filesz)
            .is_some_and(|end| end <= file_len);
        match p_type {
            PT_LOAD => {
                if filesz > memsz {
                    return Err(format!(
                        "segment at {paddr:#x} has file size {filesz:#x} above its memory size {memsz:#x}"
                    ));
                }
                if !in_file {
                    return Err(format!(
                        "segment at {paddr:#x} (file offset {offset:#x}, {filesz:#x} bytes) runs past the end of the file"
                    ));
                }
                if paddr.checked_add(memsz).is_none() {
                    return Err(format!(
                        "segment at {paddr:#x} with size {memsz:#x} overflows"
                    ));
                }
                if memsz > 0 {
                    segments.push(ElfSegment {
                        offset,
                        paddr,
                        filesz,
                        memsz,
                    });
                }
            }
            PT_NOTE => {
                // Checked for every note segment: linux-loader reads them all.
                if !in_file {
                    return Err(format!(
                        "note segment at file offset {offset:#x} runs past the end of the file"
                    ));
                }
                if pvh_entry.is_none() && filesz > 0 {
                    let len = filesz.min(MAX_NOTE_BYTES) as usize;
                    let notes = read_at(image, offset, len)?;
                    pvh_entry = find_pvh_note(&notes).map(u64::from);
                }
            }
            _ => {}
        }
    }
    if segments.is_empty() {
        return Err("no loadable (PT_LOAD) segment".into());
    }
    Ok(ElfInfo {
        entry,
        pvh_entry,
        segments,
    })
}

/// Searches a note segment for `XEN_ELFNOTE_PHYS32_ENTRY` with name "Xen" and returns the
/// 32-bit entry it holds. Never panics on malformed notes; stops at the first malformed one.
pub fn find_pvh_note(notes: &[u8]) -> Option<u32> {
    let align4 =
        |n: u32| -> Option<usize> { usize::try_from(n).ok()?.checked_add(3).map(|v| v & !3) };
    let mut pos = 0usize;
    loop {
        let namesz = u32_at(notes, pos)?;
        let descsz = u32_at(notes, pos.checked_add(4)?)?;
        let n_type = u32_at(notes, pos.checked_add(8)?)?;
        let name_start = pos.checked_add(12)?;
        let desc_start = name_start.checked_add(align4(namesz)?)?;
        let next = desc_start.checked_add(align4(descsz)?)?;
        if n_type == XEN_ELFNOTE_PHYS32_ENTRY
            && notes.get(name_start..name_start.checked_add(usize::try_from(namesz).ok()?)?)
                == Some(&b"Xen\0"[..])
            && descsz >= 4
        {
            return u32_at(notes, desc_start);
        }
        if next <= pos {
            return None;
        }
        pos = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], n_type: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&n_type.to_le_bytes());
        v.extend_from_slice(name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend_from_slice(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    #[test]
    fn pvh_note_is_found_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1; 20]);
        notes.extend(note(b"Xen\0", 6, b"linux\0"));
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0850u32.to_le_bytes(),
        ));
        assert_eq!(find_pvh_note(&notes), Some(0x0100_0850));
    }

    #[test]
    fn malformed_notes_do_not_panic() {
        assert_eq!(find_pvh_note(&[]), None);
        assert_eq!(find_pvh_note(&[0xff; 11]), None);
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        assert_eq!(find_pvh_note(&huge), None);
        // Wrong name, short descriptor.
        assert_eq!(
            find_pvh_note(&note(b"Xe\0", XEN_ELFNOTE_PHYS32_ENTRY, &[1, 2, 3, 4])),
            None
        );
        assert_eq!(
            find_pvh_note(&note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[1, 2])),
            None
        );
    }
}
