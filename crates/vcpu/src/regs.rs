// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Boot register state: PVH (32-bit protected mode) and the Linux 64-bit boot protocol.
//!
//! The segment registers are loaded from the same GDT the guest finds in memory, so that the
//! hidden descriptor caches agree with the table: [`segment_from_gdt`] turns a GDT entry and
//! a selector into a `kvm_segment`. The default table ([`BOOT_GDT`]) is the one the boot code
//! writes at 0x500:
//!
//! | index | selector | descriptor              | use                       |
//! |-------|----------|-------------------------|---------------------------|
//! | 0     | 0x00     | 0                       | null                      |
//! | 1     | 0x08     | `0x00CF_9B00_0000_FFFF` | 32-bit code (PVH)         |
//! | 2     | 0x10     | `0x00AF_9B00_0000_FFFF` | 64-bit code (Linux 64)    |
//! | 3     | 0x18     | `0x00CF_9300_0000_FFFF` | flat data                 |
//! | 4, 5  | 0x20     | optional 64-bit TSS     | task register             |
//!
//! This crate does not write guest memory: GDT/IDT/page-table addresses are plain numbers.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

/// The boot GDT (see the module documentation).
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00CF_9B00_0000_FFFF,
    0x00AF_9B00_0000_FFFF,
    0x00CF_9300_0000_FFFF,
];
/// 32-bit code selector (PVH entry).
pub const CODE32_SELECTOR: u16 = 0x08;
/// 64-bit code selector (Linux 64-bit boot protocol, `__BOOT_CS`).
pub const CODE64_SELECTOR: u16 = 0x10;
/// Flat data selector (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// TSS selector, used when the GDT has entries 4 and 5.
pub const TSS_SELECTOR: u16 = 0x20;

/// System descriptor type: available 32/64-bit TSS.
pub const TSS_TYPE_AVAILABLE: u8 = 9;
/// System descriptor type: busy 32/64-bit TSS.
pub const TSS_TYPE_BUSY: u8 = 11;

/// CR0 protection enable.
pub const CR0_PE: u64 = 1;
/// CR0 extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0 numeric error.
pub const CR0_NE: u64 = 1 << 5;
/// CR0 paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4 physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 (reserved, always 1).
pub const RFLAGS_RESERVED: u64 = 2;

/// x87 control word after `FNINIT`.
pub const FPU_FCW: u16 = 0x37f;
/// MXCSR power-on value.
pub const MXCSR_DEFAULT: u32 = 0x1f80;

/// Errors from building boot register state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegsError {
    /// The selector points past the end of the GDT.
    #[error("selector {selector:#x} points past the end of a GDT with {entries} entries")]
    SelectorOutOfRange {
        /// The selector.
        selector: u16,
        /// Entries in the table.
        entries: usize,
    },
    /// The selector has the table-indicator bit set (LDT) or is the null selector.
    #[error("selector {0:#x} is null or refers to the LDT; boot segments come from the GDT")]
    BadSelector(u16),
    /// The descriptor is not present.
    #[error("GDT entry for selector {0:#x} is not present")]
    NotPresent(u16),
    /// A 32-bit boot protocol got an address above 4 GiB.
    #[error("{what} {value:#x} does not fit the 32-bit PVH entry state")]
    Above4G {
        /// Which address.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The GDT limit does not cover the entries it must hold.
    #[error("GDT limit {limit:#x} does not cover the {entries} entries given")]
    LimitTooSmall {
        /// The limit.
        limit: u16,
        /// Entries given.
        entries: usize,
    },
}

/// Converts one 8-byte descriptor and its selector into a `kvm_segment`.
///
/// For a 64-bit system descriptor (TSS/LDT in long mode) the upper base half lives in the
/// next GDT slot; use [`segment_from_gdt`], which handles that.
pub fn segment_from_descriptor(desc: u64, selector: u16) -> kvm_segment {
    let base = ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24);
    let raw_limit = ((desc & 0xffff) | (((desc >> 48) & 0xf) << 16)) as u32;
    let g = ((desc >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((desc >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The segment `selector` selects in `gdt` (a table of 8-byte descriptors).
///
/// System descriptors (S = 0, e.g. a 64-bit TSS) take their upper 32 base bits from the next
/// slot when there is one.
pub fn segment_from_gdt(gdt: &[u64], selector: u16) -> Result<kvm_segment, RegsError> {
    if selector & 0x4 != 0 || selector < 8 {
        return Err(RegsError::BadSelector(selector));
    }
    let idx = usize::from(selector >> 3);
    let desc = *gdt.get(idx).ok_or(RegsError::SelectorOutOfRange {
        selector,
        entries: gdt.len(),
    })?;
    let mut seg = segment_from_descriptor(desc, selector);
    if seg.present == 0 {
        return Err(RegsError::NotPresent(selector));
    }
    if seg.s == 0 {
        if let Some(high) = gdt.get(idx + 1) {
            seg.base |= (high & 0xffff_ffff) << 32;
        }
    }
    Ok(seg)
}

/// Where the boot GDT and IDT are, and what the GDT holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GdtLayout {
    /// Guest-physical address of the GDT.
    pub base: u64,
    /// GDT limit (size in bytes - 1).
    pub limit: u16,
    /// The descriptors written there (at least the four of [`BOOT_GDT`]; six with a TSS).
    pub entries: Vec<u64>,
    /// Guest-physical address of the IDT.
    pub idt_base: u64,
    /// IDT limit (0: no IDT; an exception then shuts the vCPU down).
    pub idt_limit: u16,
}

impl GdtLayout {
    /// The standard table [`BOOT_GDT`] at `base` and an empty IDT at `idt_base`.
    pub fn standard(base: u64, idt_base: u64) -> Self {
        Self {
            base,
            limit: (BOOT_GDT.len() * 8 - 1) as u16,
            entries: BOOT_GDT.to_vec(),
            idt_base,
            idt_limit: 0,
        }
    }

    /// The layout vmkit's boot code uses: GDT at 0x500, IDT at 0x520 with limit 0.
    pub fn vmkit_default() -> Self {
        Self::standard(0x500, 0x520)
    }

    fn check(&self) -> Result<(), RegsError> {
        if usize::from(self.limit) + 1 < self.entries.len() * 8 {
            return Err(RegsError::LimitTooSmall {
                limit: self.limit,
                entries: self.entries.len(),
            });
        }
        Ok(())
    }

    fn apply_tables(&self, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
        self.check()?;
        sregs.gdt.base = self.base;
        sregs.gdt.limit = self.limit;
        sregs.idt.base = self.idt_base;
        sregs.idt.limit = self.idt_limit;
        // A TSS in entries 4/5 becomes the task register; otherwise KVM's reset TR (a valid
        // busy TSS) stays.
        if self
            .entries
            .get(usize::from(TSS_SELECTOR >> 3))
            .is_some_and(|d| d & (1 << 47) != 0)
        {
            let mut tr = segment_from_gdt(&self.entries, TSS_SELECTOR)?;
            // LTR marks the TSS busy; VM entry insists on a busy TSS type.
            if tr.s == 0 && tr.type_ == TSS_TYPE_AVAILABLE {
                tr.type_ = TSS_TYPE_BUSY;
            }
            sregs.tr = tr;
        }
        Ok(())
    }
}

/// How a vCPU enters the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootRegs {
    /// PVH: 32-bit protected mode, paging off, `EBX` = start_info, `EIP` = entry.
    Pvh {
        /// Entry point (32-bit).
        entry: u64,
        /// Address of the `hvm_start_info` structure (32-bit).
        start_info: u64,
        /// The GDT/IDT.
        gdt: GdtLayout,
    },
    /// Linux 64-bit boot protocol: long mode, `RSI` = boot_params, `RIP` = entry.
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
        /// Address of `struct boot_params` (the zero page).
        boot_params: u64,
        /// Address of the PML4 of identity page tables covering the kernel and boot data.
        pml4: u64,
        /// The GDT/IDT.
        gdt: GdtLayout,
    },
}

impl BootRegs {
    /// PVH entry with vmkit's default GDT/IDT layout.
    pub fn pvh(entry: u64, start_info: u64) -> Self {
        Self::Pvh {
            entry,
            start_info,
            gdt: GdtLayout::vmkit_default(),
        }
    }

    /// Linux 64-bit entry with vmkit's default GDT/IDT layout.
    pub fn linux64(entry: u64, boot_params: u64, pml4: u64) -> Self {
        Self::Linux64 {
            entry,
            boot_params,
            pml4,
            gdt: GdtLayout::vmkit_default(),
        }
    }

    /// The general-purpose registers.
    pub fn regs(&self) -> Result<kvm_regs, RegsError> {
        match self {
            Self::Pvh {
                entry, start_info, ..
            } => {
                for (what, value) in [
                    ("PVH entry point", *entry),
                    ("PVH start_info address", *start_info),
                ] {
                    if value > u64::from(u32::MAX) {
                        return Err(RegsError::Above4G { what, value });
                    }
                }
                Ok(kvm_regs {
                    rip: *entry,
                    rbx: *start_info,
                    rflags: RFLAGS_RESERVED,
                    ..Default::default()
                })
            }
            Self::Linux64 {
                entry, boot_params, ..
            } => Ok(kvm_regs {
                rip: *entry,
                rsi: *boot_params,
                rflags: RFLAGS_RESERVED,
                ..Default::default()
            }),
        }
    }

    /// Applies the mode, segments and tables to `sregs` (read from the vCPU first, so that
    /// fields such as `apic_base` keep KVM's values).
    pub fn apply_sregs(&self, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
        match self {
            Self::Pvh { gdt, .. } => {
                gdt.apply_tables(sregs)?;
                let code = segment_from_gdt(&gdt.entries, CODE32_SELECTOR)?;
                let data = segment_from_gdt(&gdt.entries, DATA_SELECTOR)?;
                sregs.cs = code;
                sregs.ds = data;
                sregs.es = data;
                sregs.fs = data;
                sregs.gs = data;
                sregs.ss = data;
                sregs.cr0 = CR0_PE | CR0_ET;
                sregs.cr3 = 0;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
            Self::Linux64 { pml4, gdt, .. } => {
                gdt.apply_tables(sregs)?;
                let code = segment_from_gdt(&gdt.entries, CODE64_SELECTOR)?;
                let data = segment_from_gdt(&gdt.entries, DATA_SELECTOR)?;
                sregs.cs = code;
                sregs.ds = data;
                sregs.es = data;
                sregs.fs = data;
                sregs.gs = data;
                sregs.ss = data;
                sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
                sregs.cr3 = *pml4;
                sregs.cr4 = CR4_PAE;
                sregs.efer = EFER_LME | EFER_LMA;
            }
        }
        Ok(())
    }
}

/// The FPU state at boot: `FNINIT` control word and the power-on MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code32_descriptor() {
        let s = segment_from_descriptor(BOOT_GDT[1], 0x08);
        assert_eq!((s.base, s.limit, s.selector), (0, 0xffff_ffff, 0x08));
        assert_eq!((s.type_, s.s, s.dpl, s.present), (0xb, 1, 0, 1));
        assert_eq!((s.db, s.l, s.g, s.avl, s.unusable), (1, 0, 1, 0, 0));
    }

    #[test]
    fn code64_descriptor() {
        let s = segment_from_descriptor(BOOT_GDT[2], 0x10);
        assert_eq!((s.l, s.db, s.g, s.type_, s.present), (1, 0, 1, 0xb, 1));
        assert_eq!(s.limit, 0xffff_ffff);
    }

    #[test]
    fn data_descriptor() {
        let s = segment_from_descriptor(BOOT_GDT[3], 0x18);
        assert_eq!(
            (s.type_, s.s, s.db, s.g, s.l, s.present),
            (0x3, 1, 1, 1, 0, 1)
        );
        assert_eq!((s.base, s.limit), (0, 0xffff_ffff));
    }

    #[test]
    fn byte_granular_base_and_limit() {
        // base 0x12345678, limit 0x5ffff (byte granularity), data, DPL 3.
        let s = segment_from_descriptor(0x1205_f334_5678_ffff, 0x2b);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x5_ffff);
        assert_eq!((s.g, s.dpl, s.type_, s.selector), (0, 3, 3, 0x2b));
    }

    #[test]
    fn tss_in_long_mode_takes_high_base() {
        // 64-bit available TSS (type 9) at base 0xffff_8000_0010_2000, limit 0x67.
        let low: u64 = 0x0067 | (0x2000 << 16) | (0x10 << 32) | (0x89 << 40);
        let high: u64 = 0xffff_8000;
        let mut gdt = BOOT_GDT.to_vec();
        gdt.push(low);
        gdt.push(high);
        let s = segment_from_gdt(&gdt, TSS_SELECTOR).unwrap();
        assert_eq!(s.base, 0xffff_8000_0010_2000);
        assert_eq!((s.limit, s.type_, s.s, s.present), (0x67, 9, 0, 1));
    }

    #[test]
    fn selector_errors() {
        assert_eq!(
            segment_from_gdt(&BOOT_GDT, 0),
            Err(RegsError::BadSelector(0))
        );
        assert_eq!(
            segment_from_gdt(&BOOT_GDT, 0x0c),
            Err(RegsError::BadSelector(0x0c))
        );
        assert_eq!(
            segment_from_gdt(&BOOT_GDT, 0x20),
            Err(RegsError::SelectorOutOfRange {
                selector: 0x20,
                entries: 4
            })
        );
        let gdt = [0, 0x00CF_1B00_0000_FFFF];
        assert_eq!(
            segment_from_gdt(&gdt, 0x08),
            Err(RegsError::NotPresent(0x08))
        );
    }

    #[test]
    fn pvh_state() {
        let b = BootRegs::pvh(0x10_0000, 0x6000);
        let r = b.regs().unwrap();
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0000, 0x6000, 2));
        let mut s = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        b.apply_sregs(&mut s).unwrap();
        assert_eq!(s.cr0, 0x11);
        assert_eq!((s.cr4, s.efer, s.cr3), (0, 0, 0));
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (0x08, 1, 0));
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!((seg.selector, seg.type_), (0x18, 3));
        }
        assert_eq!(
            (s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit),
            (0x500, 31, 0x520, 0)
        );
        assert_eq!(s.apic_base, 0xfee0_0900, "kept");
        assert!(matches!(
            BootRegs::pvh(1 << 32, 0).regs(),
            Err(RegsError::Above4G { .. })
        ));
    }

    #[test]
    fn linux64_state() {
        let b = BootRegs::linux64(0x100_0200, 0x7000, 0x9000);
        let r = b.regs().unwrap();
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0200, 0x7000, 2));
        let mut s = kvm_sregs::default();
        b.apply_sregs(&mut s).unwrap();
        assert_eq!(s.cr0, CR0_PE | CR0_PG | CR0_ET | CR0_NE);
        assert_eq!((s.cr3, s.cr4, s.efer), (0x9000, 0x20, 0x500));
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x10, 1, 0));
        assert_eq!(
            (s.ds.selector, s.es.selector, s.ss.selector),
            (0x18, 0x18, 0x18)
        );
    }

    #[test]
    fn tss_entries_load_tr() {
        let mut gdt = GdtLayout::vmkit_default();
        gdt.entries.push(0x0067 | (0x3000 << 16) | (0x89 << 40));
        gdt.entries.push(0);
        gdt.limit = 47;
        let b = BootRegs::Linux64 {
            entry: 0,
            boot_params: 0,
            pml4: 0,
            gdt: gdt.clone(),
        };
        let mut s = kvm_sregs::default();
        b.apply_sregs(&mut s).unwrap();
        assert_eq!(
            (s.tr.selector, s.tr.base, s.tr.type_),
            (0x20, 0x3000, TSS_TYPE_BUSY)
        );
        gdt.limit = 31;
        let b = BootRegs::Linux64 {
            entry: 0,
            boot_params: 0,
            pml4: 0,
            gdt,
        };
        assert!(matches!(
            b.apply_sregs(&mut s),
            Err(RegsError::LimitTooSmall { .. })
        ));
    }

    #[test]
    fn fpu_defaults() {
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }
}
