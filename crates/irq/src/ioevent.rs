// SPDX-License-Identifier: Apache-2.0 OR MIT
//! [`IoEventSpace`] on KVM: `KVM_IOEVENTFD` registrations on the VM.

use std::sync::Arc;

use kvm_ioctls::{NoDatamatch, VmFd};
use vmkit_device::{IoEventAddress, IoEventError, IoEventMatch, IoEventSpace};
use vmm_sys_util::eventfd::EventFd;

/// Registers ioeventfds with KVM, so that guest writes to a notify address wake a device's
/// worker without a vCPU exit to user space.
///
/// Without `KVM_CAP_IOEVENTFD` (every KVM since 2.6.32 has it) registration fails with
/// [`IoEventError::Io`].
pub struct KvmIoEvents {
    vm: Arc<VmFd>,
}

impl KvmIoEvents {
    /// Registrations go to `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

fn kvm_address(address: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match address {
        IoEventAddress::Pio(a) => kvm_ioctls::IoEventAddress::Pio(a),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

fn io_error(address: IoEventAddress, e: vmm_sys_util::errno::Error) -> IoEventError {
    let source = std::io::Error::from_raw_os_error(e.errno());
    match e.errno() {
        libc::EEXIST => IoEventError::Exists(address),
        libc::ENOENT => IoEventError::NotFound(address),
        _ => IoEventError::Io { address, source },
    }
}

impl IoEventSpace for KvmIoEvents {
    fn register(
        &self,
        address: IoEventAddress,
        filter: IoEventMatch,
        event: &EventFd,
    ) -> Result<(), IoEventError> {
        let a = kvm_address(address);
        let r = match filter {
            IoEventMatch::Any => self.vm.register_ioevent(event, &a, NoDatamatch),
            IoEventMatch::U16(v) => self.vm.register_ioevent(event, &a, v),
            IoEventMatch::U32(v) => self.vm.register_ioevent(event, &a, v),
        };
        r.map_err(|e| io_error(address, e))
    }

    fn unregister(
        &self,
        address: IoEventAddress,
        filter: IoEventMatch,
        event: &EventFd,
    ) -> Result<(), IoEventError> {
        let a = kvm_address(address);
        let r = match filter {
            IoEventMatch::Any => self.vm.unregister_ioevent(event, &a, NoDatamatch),
            IoEventMatch::U16(v) => self.vm.unregister_ioevent(event, &a, v),
            IoEventMatch::U32(v) => self.vm.unregister_ioevent(event, &a, v),
        };
        r.map_err(|e| io_error(address, e))
    }
}

#[cfg(test)]
mod tests {
    //! Needs `/dev/kvm` (skips loudly without it, fails under `VMKIT_REQUIRE_KVM`).
    use super::*;

    #[test]
    fn kvm_ioevent_register_and_unregister() {
        if !vmkit_testkit::kvm_available("kvm_ioevent_register_and_unregister") {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("create VM"));
        let events = KvmIoEvents::new(vm);
        let fd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let addr = IoEventAddress::Mmio(0xd000_0000);
        events
            .register(addr, IoEventMatch::U16(3), &fd)
            .expect("register");
        assert!(matches!(
            events.register(addr, IoEventMatch::U16(3), &fd),
            Err(IoEventError::Exists(_))
        ));
        events
            .unregister(addr, IoEventMatch::U16(3), &fd)
            .expect("unregister");
        assert!(events.unregister(addr, IoEventMatch::U16(3), &fd).is_err());
    }
}
