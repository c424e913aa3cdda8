// SPDX-License-Identifier: Apache-2.0 OR MIT
//! The versioned CBOR encoding of one state value.

use ciborium::Value;
use serde::{Deserialize, Serialize};

use crate::{MigrationError, VersionedState};

/// Largest encoded state this crate decodes (guards against hostile length fields).
pub(crate) const MAX_ENCODED_LEN: usize = 256 << 20;

/// One component's state with its self-description: name, version, and the value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// Component kind ([`VersionedState::NAME`]).
    pub name: String,
    /// Encoding version ([`VersionedState::VERSION`] at save time).
    pub version: u16,
    /// The state as a self-describing value.
    pub state: Value,
}

/// Wraps `state` into a [`Section`].
pub fn encode_section<S: VersionedState>(state: &S) -> Result<Section, MigrationError> {
    let value = Value::serialized(state).map_err(|e| MigrationError::Encode {
        name: S::NAME,
        reason: e.to_string(),
    })?;
    Ok(Section {
        name: S::NAME.to_owned(),
        version: S::VERSION,
        state: value,
    })
}

/// Unwraps a [`Section`] into `S`, checking the name and upgrading older versions.
pub fn decode_section<S: VersionedState>(section: &Section) -> Result<S, MigrationError> {
    if section.name != S::NAME {
        return Err(MigrationError::WrongComponent {
            expected: S::NAME,
            found: section.name.clone(),
        });
    }
    if section.version > S::VERSION {
        return Err(MigrationError::NewerVersion {
            name: S::NAME,
            found: section.version,
            supported: S::VERSION,
        });
    }
    let mut value = section.state.clone();
    for from in section.version..S::VERSION {
        value = S::upgrade(from, value)?;
    }
    value.deserialized().map_err(|e| MigrationError::Decode {
        name: S::NAME,
        reason: e.to_string(),
    })
}

/// Encodes `state` as a self-describing, versioned CBOR document.
pub fn encode<S: VersionedState>(state: &S) -> Result<Vec<u8>, MigrationError> {
    let section = encode_section(state)?;
    let mut out = Vec::new();
    ciborium::into_writer(&section, &mut out).map_err(|e| MigrationError::Encode {
        name: S::NAME,
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// Decodes bytes produced by [`encode`] (by this or an older version of the component).
///
/// Never panics on arbitrary input: damaged bytes give [`MigrationError::Decode`].
pub fn decode<S: VersionedState>(bytes: &[u8]) -> Result<S, MigrationError> {
    if bytes.len() > MAX_ENCODED_LEN {
        return Err(MigrationError::Decode {
            name: S::NAME,
            reason: format!(
                "{} bytes exceed the limit of {MAX_ENCODED_LEN}",
                bytes.len()
            ),
        });
    }
    let section: Section = ciborium::from_reader(bytes).map_err(|e| MigrationError::Decode {
        name: S::NAME,
        reason: e.to_string(),
    })?;
    decode_section(&section)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    /// Version 1 of an example state, as it was once shipped.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct DevV1 {
        regs: Vec<u8>,
        speed: u32,
    }
    impl VersionedState for DevV1 {
        const NAME: &'static str = "test/dev";
        const VERSION: u16 = 1;
    }

    /// Version 2: `speed` became `baud` (a rename needs an upgrade step) and `fifo` was
    /// added (absorbed by `serde(default)`).
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct DevV2 {
        regs: Vec<u8>,
        baud: u32,
        #[serde(default)]
        fifo: Vec<u8>,
    }
    impl VersionedState for DevV2 {
        const NAME: &'static str = "test/dev";
        const VERSION: u16 = 2;
        fn upgrade(from: u16, value: Value) -> Result<Value, MigrationError> {
            match (from, value) {
                (1, Value::Map(entries)) => Ok(Value::Map(
                    entries
                        .into_iter()
                        .map(|(k, v)| match k {
                            Value::Text(t) if t == "speed" => (Value::Text("baud".into()), v),
                            k => (k, v),
                        })
                        .collect(),
                )),
                (v, _) => Err(MigrationError::UnsupportedVersion {
                    name: Self::NAME,
                    version: v,
                }),
            }
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Other {
        x: u8,
    }
    impl VersionedState for Other {
        const NAME: &'static str = "test/other";
        const VERSION: u16 = 1;
    }

    #[test]
    fn round_trip() {
        let s = DevV2 {
            regs: vec![1, 2, 3],
            baud: 115200,
            fifo: vec![9],
        };
        assert_eq!(decode::<DevV2>(&encode(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn older_version_upgrades() {
        let old = encode(&DevV1 {
            regs: vec![4],
            speed: 9600,
        })
        .unwrap();
        let new: DevV2 = decode(&old).unwrap();
        assert_eq!(
            new,
            DevV2 {
                regs: vec![4],
                baud: 9600,
                fifo: vec![]
            }
        );
    }

    #[test]
    fn newer_version_and_wrong_component_are_refused() {
        let new = encode(&DevV2 {
            regs: vec![],
            baud: 1,
            fifo: vec![],
        })
        .unwrap();
        assert!(matches!(
            decode::<DevV1>(&new),
            Err(MigrationError::NewerVersion {
                found: 2,
                supported: 1,
                ..
            })
        ));
        assert!(matches!(
            decode::<Other>(&new),
            Err(MigrationError::WrongComponent { .. })
        ));
    }

    #[test]
    fn garbage_is_an_error() {
        for bytes in [
            &b""[..],
            b"\xff\xff",
            b"\xa3\x64name",
            &[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(decode::<DevV2>(bytes).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode::<DevV2>(&bytes);
        }
    }
}
