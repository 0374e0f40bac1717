//! Byte formats: postcard with a leading format version, decoded without trusting the input.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crdt::Error;

/// Encodes `value` after the format `version` byte.
pub(crate) fn encode<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let bytes = vec![version];
    // Serialising owned in-memory structures to a Vec cannot fail: postcard only errors on
    // unsupported serde types and on full fixed buffers, neither of which occurs here.
    postcard::to_extend(value, bytes).expect("postcard encodes our types into a Vec")
}

/// Decodes bytes written by [`encode`] with the same `version`. Allocation stays proportional to
/// `bytes.len()` (serde caps pre-allocation and postcard checks lengths against the input), and
/// trailing bytes are rejected.
pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    version: u8,
    bytes: &[u8],
) -> Result<T, Error> {
    let Some((&found, body)) = bytes.split_first() else {
        return Err(Error::Decode {
            what,
            reason: "no bytes".into(),
        });
    };
    if found != version {
        return Err(Error::Decode {
            what,
            reason: format!("format version {found}, this build reads version {version}"),
        });
    }
    let (value, rest) = postcard::take_from_bytes(body).map_err(|err| Error::Decode {
        what,
        reason: err.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(Error::Decode {
            what,
            reason: format!("{} unexpected trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

/// FNV-1a, 64 bits: a hash that is stable across builds and platforms, for state digests.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

impl std::io::Write for Fnv {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
