//! Immutable byte strings shared by reference between the keyspace and those who read it.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An immutable byte string that clones by reference.
///
/// A value is stored once: the replica's entry, the deltas that carry it, the change feed and
/// every watcher's queue hold the same allocation, so a 1 MiB value costs 1 MiB however many of
/// them hold it. Reads it as `&[u8]` through [`Deref`].
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blob(Arc<Vec<u8>>);

impl Blob {
    /// The bytes, copied into a vector of their own.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.as_ref().clone()
    }

    /// Whether `self` and `other` share one allocation (not only equal bytes).
    pub fn shares_with(&self, other: &Blob) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Blob {
    /// Takes the vector without copying its bytes.
    fn from(bytes: Vec<u8>) -> Self {
        Blob(Arc::new(bytes))
    }
}

impl From<&[u8]> for Blob {
    fn from(bytes: &[u8]) -> Self {
        Blob(Arc::new(bytes.to_vec()))
    }
}

impl<const N: usize> From<&[u8; N]> for Blob {
    fn from(bytes: &[u8; N]) -> Self {
        Blob(Arc::new(bytes.to_vec()))
    }
}

impl PartialEq<[u8]> for Blob {
    fn eq(&self, other: &[u8]) -> bool {
        self.0.as_slice() == other
    }
}

impl PartialEq<&[u8]> for Blob {
    fn eq(&self, other: &&[u8]) -> bool {
        self.0.as_slice() == *other
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Blob {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.0.as_slice() == other.as_slice()
    }
}

impl<const N: usize> PartialEq<[u8; N]> for Blob {
    fn eq(&self, other: &[u8; N]) -> bool {
        self.0.as_slice() == other.as_slice()
    }
}

impl PartialEq<Vec<u8>> for Blob {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.0.as_ref() == other
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) if self.0.len() <= 64 => write!(f, "{text:?}"),
            _ => write!(f, "<{} bytes>", self.0.len()),
        }
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(deserializer)?;
        Ok(Blob::from(bytes.into_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_allocation_and_encode_like_plain_bytes() {
        let blob = Blob::from(vec![7u8; 1000]);
        let copy = blob.clone();
        assert!(copy.shares_with(&blob));
        assert!(
            !Blob::from(vec![7u8; 1000]).shares_with(&blob),
            "equal is not shared"
        );

        // The wire and disk formats are unchanged from a plain byte string.
        let plain = postcard::to_allocvec(&serde_bytes::Bytes::new(&blob)).expect("encodes");
        assert_eq!(postcard::to_allocvec(&blob).expect("encodes"), plain);
        let back: Blob = postcard::from_bytes(&plain).expect("decodes");
        assert_eq!(back, blob);
    }
}
