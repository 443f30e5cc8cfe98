//! Validated protocol identifiers: the routing key, the public connection id and the runtime's handle.

use std::fmt;
use std::sync::Arc;

/// The routing key a binary claims and its phones name (PROTOCOL.md §4.3).
///
/// 1 to 128 bytes, each printable ASCII `0x21..=0x7E`. Compared byte for byte.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerId(Arc<str>);

/// Why a server-id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerIdError {
    Empty,
    TooLong,
    /// A byte outside `0x21..=0x7E` (space, control, non-ASCII).
    InvalidByte,
}

impl ServerId {
    pub const MAX_LEN: usize = 128;

    /// Validates `bytes` as a server-id.
    pub fn parse(bytes: &[u8]) -> Result<ServerId, ServerIdError> {
        if bytes.is_empty() {
            return Err(ServerIdError::Empty);
        }
        if bytes.len() > Self::MAX_LEN {
            return Err(ServerIdError::TooLong);
        }
        if !bytes.iter().all(|b| (0x21..=0x7E).contains(b)) {
            return Err(ServerIdError::InvalidByte);
        }
        // Every byte is ASCII, so this cannot fail.
        let s = std::str::from_utf8(bytes).map_err(|_| ServerIdError::InvalidByte)?;
        Ok(ServerId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A stable 64-bit hash (FNV-1a), independent of process and platform, used to pick a shard.
    pub fn stable_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    /// The shard (of `shards`) that owns this server-id. A binary and its phones always agree.
    pub fn shard(&self, shards: usize) -> usize {
        debug_assert!(shards > 0);
        (self.stable_hash() % shards.max(1) as u64) as usize
    }
}

impl fmt::Debug for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The runtime's handle for one connection; unique per node for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey(pub u64);

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Which side of the relay a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Binary,
    Phone,
}

/// The public id of an accepted connection (PROTOCOL.md §5): `server-<sid>-<8 hex>` or
/// `client-<sid>-<16 hex>`. Never sent to the connection it names.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(Arc<str>);

impl ConnId {
    /// Builds the id of `side` on `server_id` from the random part `random`.
    pub fn new(side: Side, server_id: &ServerId, random: u64) -> ConnId {
        let s = match side {
            Side::Binary => format!("server-{server_id}-{:08x}", random as u32),
            Side::Phone => format!("client-{server_id}-{random:016x}"),
        };
        ConnId(Arc::from(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Appends the id as the inside of a JSON string: only `"` and `\` need escaping, because
    /// a server-id is printable ASCII (PROTOCOL.md §4.3).
    pub fn write_json_escaped(&self, out: &mut Vec<u8>) {
        for &b in self.0.as_bytes() {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
    }
}

impl std::borrow::Borrow<str> for ConnId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_id_syntax_item_18() {
        assert!(ServerId::parse(&[b'a'; 128]).is_ok());
        assert_eq!(ServerId::parse(&[b'a'; 129]), Err(ServerIdError::TooLong));
        assert_eq!(ServerId::parse(b""), Err(ServerIdError::Empty));
        assert_eq!(ServerId::parse(b"a b"), Err(ServerIdError::InvalidByte));
        assert_eq!(ServerId::parse(b"a\tb"), Err(ServerIdError::InvalidByte));
        assert_eq!(
            ServerId::parse("é".as_bytes()),
            Err(ServerIdError::InvalidByte)
        );
        assert_eq!(ServerId::parse(b"\x7f"), Err(ServerIdError::InvalidByte));
        assert!(ServerId::parse(b"!~\"\\").is_ok());
    }

    #[test]
    fn conn_id_forms() {
        let sid = ServerId::parse(b"abc").unwrap();
        assert_eq!(
            ConnId::new(Side::Phone, &sid, 0x0f3a_9c21_d4e5_b687).as_str(),
            "client-abc-0f3a9c21d4e5b687"
        );
        assert_eq!(
            ConnId::new(Side::Binary, &sid, 0xdead_beef_0000_00ff).as_str(),
            "server-abc-000000ff"
        );
    }

    #[test]
    fn conn_id_json_escape_only_quote_and_backslash() {
        let sid = ServerId::parse(br#"a"b\c/"#).unwrap();
        let id = ConnId::new(Side::Phone, &sid, 1);
        let mut out = Vec::new();
        id.write_json_escaped(&mut out);
        assert_eq!(out, br#"client-a\"b\\c/-0000000000000001"#);
        let parsed: String = serde_json::from_slice(&[b"\"", &out[..], b"\""].concat()).unwrap();
        assert_eq!(parsed, id.as_str());
    }

    #[test]
    fn shard_is_stable_and_spreads() {
        let sid = ServerId::parse(b"abc").unwrap();
        assert_eq!(sid.stable_hash(), 0xe71fa2190541574b);
        assert_eq!(sid.shard(4), (0xe71fa2190541574b_u64 % 4) as usize);
        let mut hit = [0usize; 4];
        for i in 0..64 {
            hit[ServerId::parse(format!("id-{i}").as_bytes())
                .unwrap()
                .shard(4)] += 1;
        }
        assert!(hit.iter().all(|&n| n > 0), "every shard gets ids: {hit:?}");
    }

    #[test]
    fn ids_print_as_their_text() {
        let sid = ServerId::parse(b"a\"b").unwrap();
        assert_eq!(format!("{sid} {sid:?}"), r#"a"b "a\"b""#);
        let id = ConnId::new(Side::Binary, &sid, 0xff);
        assert_eq!(
            format!("{id} {id:?}"),
            r#"server-a"b-000000ff "server-a\"b-000000ff""#
        );
        assert_eq!(ConnKey(7).to_string(), "#7");
    }
}
