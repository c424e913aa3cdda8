// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The kernel command line at [`CMDLINE_START`].

use vm_memory::GuestMemoryBackend;

use crate::error::{Error, Result};
use crate::guest::write_bytes;
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START};

/// Checks that `cmdline` has no NUL byte and fits both our area (see
/// [`CMDLINE_MAX_SIZE`], which includes the NUL) and the kernel's own limit `kernel_max`
/// (the bzImage header's `cmdline_size`, without the NUL).
pub fn check_cmdline(cmdline: &str, kernel_max: Option<usize>) -> Result<()> {
    if let Some(pos) = cmdline.bytes().position(|b| b == 0) {
        return Err(Error::CmdlineNul(pos));
    }
    let len = cmdline.len();
    let area_max = CMDLINE_MAX_SIZE - 1;
    if len > area_max {
        return Err(Error::CmdlineTooLong {
            len,
            max: area_max,
            limit_by: "the command line area",
        });
    }
    if let Some(max) = kernel_max {
        if len > max {
            return Err(Error::CmdlineTooLong {
                len,
                max,
                limit_by: "the kernel's cmdline_size",
            });
        }
    }
    Ok(())
}

/// Writes `cmdline` plus a terminating NUL at [`CMDLINE_START`] after [`check_cmdline`];
/// returns the address.
pub fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    kernel_max: Option<usize>,
) -> Result<u64> {
    check_cmdline(cmdline, kernel_max)?;
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    write_bytes(mem, "kernel command line", CMDLINE_START, &bytes)?;
    Ok(CMDLINE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_enforced() {
        assert!(check_cmdline("console=ttyS0", None).is_ok());
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            check_cmdline(&long, None),
            Err(Error::CmdlineTooLong { len, max, .. }) if len == CMDLINE_MAX_SIZE && max == CMDLINE_MAX_SIZE - 1
        ));
        assert!(check_cmdline(&long[1..], None).is_ok());
        assert!(matches!(
            check_cmdline("abcdef", Some(5)),
            Err(Error::CmdlineTooLong { max: 5, .. })
        ));
        assert!(matches!(
            check_cmdline("a\0b", None),
            Err(Error::CmdlineNul(1))
        ));
    }
}
