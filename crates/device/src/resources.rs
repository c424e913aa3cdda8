// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Resource descriptions: what a device needs from the machine (ranges, interrupts).

/// One resource a device occupies or requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A range of I/O ports.
    Pio {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u16,
    },
    /// A range of guest-physical MMIO addresses.
    Mmio {
        /// First address.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A legacy interrupt line (GSI).
    LegacyIrq(u32),
    /// A number of MSI / MSI-X vectors.
    MsiVectors(u16),
}

impl Resource {
    /// Whether two resources claim the same ports, addresses or line. Vector counts never
    /// conflict.
    pub fn conflicts_with(&self, other: &Resource) -> bool {
        match (*self, *other) {
            (Resource::Pio { base: a, len: al }, Resource::Pio { base: b, len: bl }) => {
                let (a, al, b, bl) = (u32::from(a), u32::from(al), u32::from(b), u32::from(bl));
                al > 0 && bl > 0 && a < b + bl && b < a + al
            }
            (Resource::Mmio { base: a, len: al }, Resource::Mmio { base: b, len: bl }) => {
                al > 0
                    && bl > 0
                    && u128::from(a) < u128::from(b) + u128::from(bl)
                    && u128::from(b) < u128::from(a) + u128::from(al)
            }
            (Resource::LegacyIrq(a), Resource::LegacyIrq(b)) => a == b,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts() {
        let a = Resource::Pio {
            base: 0x3f8,
            len: 8,
        };
        assert!(a.conflicts_with(&Resource::Pio {
            base: 0x3ff,
            len: 1
        }));
        assert!(!a.conflicts_with(&Resource::Pio {
            base: 0x400,
            len: 1
        }));
        let m = Resource::Mmio {
            base: u64::MAX - 1,
            len: 2,
        };
        assert!(m.conflicts_with(&Resource::Mmio {
            base: u64::MAX,
            len: 1
        }));
        assert!(!m.conflicts_with(&Resource::Pio {
            base: 0,
            len: 0xffff
        }));
        assert!(Resource::LegacyIrq(4).conflicts_with(&Resource::LegacyIrq(4)));
        assert!(!Resource::MsiVectors(4).conflicts_with(&Resource::MsiVectors(4)));
    }
}
