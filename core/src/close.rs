//! Close codes and how a connection ends.

use std::fmt;

/// A WebSocket close code allowed on the wire (RFC 6455 §7.4): 1000–1003, 1007–1014, 3000–4999.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CloseCode(u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL: CloseCode = CloseCode(1002);
    pub const INVALID_DATA: CloseCode = CloseCode(1007);
    pub const POLICY: CloseCode = CloseCode(1008);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL: CloseCode = CloseCode(1011);
    pub const RESTART: CloseCode = CloseCode(1012);
    pub const NO_SERVER: CloseCode = CloseCode(4404);
    pub const CLAIMED: CloseCode = CloseCode(4409);
    pub const TOO_MANY_PHONES: CloseCode = CloseCode(4429);

    /// Validates `code`; `None` for a code that may not appear in a close frame.
    pub const fn new(code: u16) -> Option<CloseCode> {
        match code {
            1000..=1003 | 1007..=1014 | 3000..=4999 => Some(CloseCode(code)),
            _ => None,
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Debug for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The code a close notice carries for a phone that sent no code (PROTOCOL.md §8). 1005 is never
/// sent in a close frame, only reported in a notice, so it is not a [`CloseCode`].
pub const NOTICE_NO_CODE: u16 = 1005;

/// How the transport of an accepted connection ended, as the runtime saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The peer sent a close frame; its raw code, `None` when the frame had none.
    PeerClose(Option<u16>),
    /// TCP ended without a close frame: EOF, reset or an I/O error.
    Dropped,
    /// The close handshake finished after the relay sent its close frame, or the relay aborted.
    Local,
}

/// A way the peer broke the framing rules, detected by the runtime's WebSocket codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A message larger than `max_message_size` (PROTOCOL.md §7.5).
    TooBig,
    /// A TEXT message that is not valid UTF-8 (§7.1).
    InvalidUtf8,
    /// Any other RFC 6455 violation (bad opcode, unmasked frame, …).
    Protocol,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_as_the_number() {
        let code = CloseCode::new(4401).unwrap();
        assert_eq!(format!("{code} {code:?}"), "4401 4401");
    }

    #[test]
    fn wire_codes_item_42() {
        for bad in [0, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
            assert_eq!(CloseCode::new(bad), None, "{bad}");
        }
        for good in [1000, 1003, 1007, 1014, 3000, 4000, 4999] {
            assert_eq!(CloseCode::new(good).map(CloseCode::get), Some(good));
        }
    }
}
