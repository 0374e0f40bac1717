//! Causal tokens: what a client carries between nodes to read its own writes and never go back
//! in time.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::crdt::{Dot, Error, NodeId, VersionVector, codec};

/// The format version of an encoded token.
const TOKEN_FORMAT: u8 = 1;
/// The longest token text accepted, in characters.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// A set of writes a client has seen: a node that [covers](Token::is_covered_by) the token has
/// applied all of them, and their causes.
///
/// A write's token names only the write itself: with causal delivery, a replica that applied a
/// write applied everything before it. A read's token is the reading node's version vector. Tokens
/// combine with [`Token::merge`], and print as URL-safe text.
///
/// ```
/// use mantissa::crdt::{Dot, NodeId, Token, VersionVector};
/// let token = Token::from_dot(Dot::new(NodeId(7), 3));
/// let text = token.to_string();
/// assert_eq!(text.parse::<Token>().unwrap(), token);
/// let seen: VersionVector = [(NodeId(7), 5)].into_iter().collect();
/// assert!(token.is_covered_by(&seen));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token(VersionVector);

impl Token {
    /// The token of one write.
    pub fn from_dot(dot: Dot) -> Self {
        Token([(dot.node, dot.seq)].into_iter().collect())
    }

    /// The token of everything `version` covers.
    pub fn from_version(version: VersionVector) -> Self {
        Token(version)
    }

    /// Whether a replica at `version` has applied everything the token names.
    pub fn is_covered_by(&self, version: &VersionVector) -> bool {
        version.dominates(&self.0)
    }

    /// Adds what `other` names.
    pub fn merge(&mut self, other: &Token) {
        self.0.join(&other.0);
    }

    /// The writes named, as a version vector.
    pub fn version(&self) -> &VersionVector {
        &self.0
    }

    /// How many of `node`'s writes the token names.
    pub fn get(&self, node: NodeId) -> u64 {
        self.0.get(node)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in codec::encode(TOKEN_FORMAT, &self.0) {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for Token {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::Decode {
            what: "token",
            reason: reason.into(),
        };
        if text.len() > MAX_TOKEN_LEN {
            return Err(invalid("token too long"));
        }
        if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("a token is an even number of hex digits"));
        }
        let bytes: Vec<u8> = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| invalid("a token is an even number of hex digits"))?;
        codec::decode("token", TOKEN_FORMAT, &bytes).map(Token)
    }
}
