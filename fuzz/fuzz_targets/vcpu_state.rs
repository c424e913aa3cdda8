// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Arbitrary bytes as an encoded vCPU state: decoding never panics, and whatever decodes and
//! passes `validate()` converts to KVM's structures without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmkit_vcpu::state::VcpuState;

fuzz_target!(|data: &[u8]| {
    // The raw decoder (no validation) must not panic either.
    let raw = vmkit_migration::decode::<VcpuState>(data);
    if let Ok(state) = raw {
        if state.validate().is_ok() {
            let _ = state.kvm_cpuid();
            let _ = state.kvm_msrs();
            let _ = state.kvm_xcrs();
            for size in [4096usize, 8192, 11008] {
                let _ = state.xsave_words(size);
            }
            let _: vmkit_vcpu::kvm_bindings::kvm_sregs = state.sregs.into();
            let _: vmkit_vcpu::kvm_bindings::kvm_regs = state.regs.into();
            let _: vmkit_vcpu::kvm_bindings::kvm_fpu = state.fpu.into();
            let _: vmkit_vcpu::kvm_bindings::kvm_vcpu_events = state.events.into();
            if let Some(lapic) = &state.lapic {
                assert!(
                    vmkit_vcpu::lapic::from_bytes(lapic).is_some(),
                    "validated LAPIC page"
                );
            }
            let again = state.encode().expect("a valid state re-encodes");
            assert_eq!(VcpuState::decode(&again).expect("and decodes"), state);
        }
    }
    // `decode` = raw decode + validate.
    let _ = VcpuState::decode(data);
});
