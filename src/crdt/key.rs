//! Keys: validated byte strings that order the keyspace.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::crdt::Error;

/// The longest key mantissa accepts, in bytes.
pub const MAX_KEY_LEN: usize = 4096;

/// A key of the keyspace: a non-empty byte string of at most [`MAX_KEY_LEN`] bytes.
///
/// Keys sort bytewise, so a prefix range is contiguous. Construction validates, so a `Key`, once
/// held, is always valid, including one decoded from a peer's bytes.
///
/// ```
/// use mantissa::crdt::Key;
/// let key = Key::new("jobs/web/1").unwrap();
/// assert_eq!(key.as_bytes(), b"jobs/web/1");
/// assert!(Key::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(Box<[u8]>);

impl Key {
    /// Validates `bytes` as a key.
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Self, Error> {
        let bytes = bytes.as_ref();
        Self::check(bytes)?;
        Ok(Key(bytes.into()))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn check(bytes: &[u8]) -> Result<(), Error> {
        if bytes.is_empty() {
            return Err(Error::EmptyKey);
        }
        if bytes.len() > MAX_KEY_LEN {
            return Err(Error::KeyTooLong {
                len: bytes.len(),
                max: MAX_KEY_LEN,
            });
        }
        Ok(())
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl TryFrom<Vec<u8>> for Key {
    type Error = Error;

    fn try_from(bytes: Vec<u8>) -> Result<Self, Error> {
        Self::check(&bytes)?;
        Ok(Key(bytes.into_boxed_slice()))
    }
}

impl TryFrom<&str> for Key {
    type Error = Error;

    fn try_from(text: &str) -> Result<Self, Error> {
        Key::new(text)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(deserializer)?;
        Key::try_from(bytes.into_vec()).map_err(serde::de::Error::custom)
    }
}
