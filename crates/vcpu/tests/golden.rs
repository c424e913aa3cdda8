// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Golden files: encodings of old state versions must keep decoding to the same value.
//!
//! `tests/golden/vcpu_state_v1.cbor` was written once by `regenerate_golden_v1` (run with
//! `cargo test -p vmkit-vcpu --test golden -- --ignored regenerate_golden_v1`) from the
//! synthetic state below, not from any host's KVM. Never regenerate it after version 1 has
//! shipped: add a new file for a new version instead, and keep this test decoding the old one.

// Test-only crate: helpers panic on unexpected errors by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use vmkit_migration::VersionedState;
use vmkit_vcpu::state::{
    CpuidEntry, DebugRegs, DescriptorTable, Fpu, MsrEntry, Regs, Segment, Sregs, VcpuEvents, Xcr,
};
use vmkit_vcpu::VcpuState;

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
    }
}

/// The deterministic version-1 state stored in the golden file: a 64-bit vCPU 2 (APIC ID 2).
fn expected_v1() -> VcpuState {
    let mut fpu = Fpu {
        fcw: 0x37f,
        fsw: 0x1234,
        ftwx: 0x80,
        last_opcode: 0x5d9,
        last_ip: 0x1000_0010,
        last_dp: 0x2000_0020,
        mxcsr: 0x1fa0,
        ..Default::default()
    };
    for (i, r) in fpu.fpr.iter_mut().enumerate() {
        r[0] = i as u8;
        r[9] = 0x40;
    }
    for (i, r) in fpu.xmm.iter_mut().enumerate() {
        *r = [0x10 + i as u8; 16];
    }
    let mut xsave: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    xsave.extend_from_slice(&[0xaa; 64]);
    let lapic: Vec<u8> = (0..1024u32).map(|i| (i % 256) as u8 ^ 0x5a).collect();
    VcpuState {
        index: 2,
        apic_id: 2,
        cpuid: vec![
            CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                eax: 0x1f,
                ebx: 0x6874_7541,
                ecx: 0x444d_4163,
                edx: 0x6974_6e65,
            },
            CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                eax: 0x00a1_0f11,
                ebx: 0x0204_0800,
                ecx: 0x81a0_2000,
                edx: 0x178b_fbff,
            },
            CpuidEntry {
                function: 0xb,
                index: 1,
                flags: 1,
                eax: 2,
                ebx: 4,
                ecx: 0x201,
                edx: 2,
            },
            CpuidEntry {
                function: 0x4000_0001,
                index: 0,
                flags: 0,
                eax: 0x0100_feeb,
                ebx: 0,
                ecx: 0,
                edx: 0,
            },
        ],
        regs: Regs {
            rax: 1,
            rbx: 0x2222,
            rcx: 3,
            rdx: 4,
            rsi: 0x7000,
            rdi: 6,
            rsp: 0x8_0000,
            rbp: 8,
            r8: 9,
            r9: 10,
            r10: 11,
            r11: 12,
            r12: 0x5566_7788,
            r13: 14,
            r14: 15,
            r15: u64::MAX,
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
        },
        sregs: Sregs {
            cs: seg(0x10, 0xb, 1, 0),
            ds: seg(0x18, 3, 0, 1),
            es: seg(0x18, 3, 0, 1),
            fs: seg(0x18, 3, 0, 1),
            gs: Segment {
                base: 0xffff_8880_0000_0000,
                ..seg(0x18, 3, 0, 1)
            },
            ss: seg(0x18, 3, 0, 1),
            tr: Segment {
                base: 0x3000,
                limit: 0x67,
                selector: 0x20,
                type_: 11,
                present: 1,
                ..Default::default()
            },
            ldt: Segment {
                unusable: 1,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: 0x500,
                limit: 47,
            },
            idt: DescriptorTable {
                base: 0x520,
                limit: 0,
            },
            cr0: 0x8000_0031,
            cr2: 0xdead_0000,
            cr3: 0x9000,
            cr4: 0x6a0,
            cr8: 0,
            efer: 0xd01,
            apic_base: 0xfee0_0c00,
            interrupt_bitmap: [0, 1 << 33, 0, 0],
        },
        fpu,
        xsave: Some(xsave),
        xcrs: Some(vec![Xcr {
            index: 0,
            value: 0x7,
        }]),
        msrs: vec![
            MsrEntry {
                index: 0x10,
                data: 0x1234_5678_9abc,
            },
            MsrEntry {
                index: 0x174,
                data: 0x10,
            },
            MsrEntry {
                index: 0x1a0,
                data: 1,
            },
            MsrEntry {
                index: 0x6e0,
                data: 0,
            },
            MsrEntry {
                index: 0xc000_0102,
                data: 0xcafe,
            },
            MsrEntry {
                index: 0x4b56_4d00,
                data: 0x5001,
            },
        ],
        lapic: Some(lapic),
        debug_regs: Some(DebugRegs {
            db: [1, 2, 3, 4],
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            flags: 0,
        }),
        mp_state: 0,
        events: VcpuEvents {
            exception_injected: 0,
            exception_nr: 14,
            exception_has_error_code: 1,
            exception_pending: 1,
            exception_error_code: 2,
            interrupt_injected: 1,
            interrupt_nr: 0x30,
            interrupt_soft: 0,
            interrupt_shadow: 1,
            nmi_injected: 0,
            nmi_pending: 1,
            nmi_masked: 0,
            sipi_vector: 0x9f,
            flags: 0xd,
            smi_smm: 0,
            smi_pending: 0,
            smi_inside_nmi: 0,
            smi_latched_init: 0,
            triple_fault_pending: 0,
            exception_has_payload: 1,
            exception_payload: 0xdead_0000,
        },
        tsc_khz: Some(2_596_136),
    }
}

#[test]
fn golden_v1_decodes_to_the_expected_state() {
    let path = golden_path("vcpu_state_v1.cbor");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let state = VcpuState::decode(&bytes).expect("version-1 golden file decodes");
    assert_eq!(state, expected_v1());
    // The file is a vmkit-migration section: name and version in the clear.
    let section: vmkit_migration::Section = ciborium::from_reader(&bytes[..]).expect("section");
    assert_eq!(section.name, VcpuState::NAME);
    assert_eq!(section.version, 1);
}

#[test]
fn round_trip_of_the_golden_value() {
    let s = expected_v1();
    assert_eq!(VcpuState::decode(&s.encode().unwrap()).unwrap(), s);
}

/// Writes the golden file. Run once, by hand; see the module documentation.
#[test]
#[ignore = "writes tests/golden/vcpu_state_v1.cbor; run by hand only when creating the file"]
fn regenerate_golden_v1() {
    assert_eq!(
        VcpuState::VERSION,
        1,
        "the v1 golden file must be written by a v1 build"
    );
    let path = golden_path("vcpu_state_v1.cbor");
    std::fs::write(&path, expected_v1().encode().unwrap()).unwrap();
}
