//! The PROXY protocol version 2 header a balancer puts before the request (PROTOCOL.md §3.2).
//!
//! [`judge_proxy_header`] is the whole decision, as a pure function of the bytes read so far: a
//! runtime reads exactly [`ProxyHeader::Incomplete`]'s `needed` bytes at a time, so it never reads
//! into the request head behind the header, and closes the connection without writing on
//! [`ProxyHeader::Rejected`]. Only command `PROXY` with TCP over IPv4 or IPv6 is accepted.
//!
//! The fixed 16-byte part is judged here, as soon as its bytes arrive, so a header that cannot be
//! accepted is refused before its body is read; the complete header is then parsed by the `ppp`
//! crate, which takes the addresses and walks the TLVs.

use std::net::SocketAddr;

use ppp::v2::{Addresses, Header, PROTOCOL_PREFIX};

/// The length of the fixed part: signature, version and command, family and protocol, length.
pub const PROXY_FIXED_LEN: usize = 16;

/// The longest header accepted, fixed part included. The 16-bit length field allows 65,551
/// bytes; real balancers send the addresses plus a few short TLVs (an AWS VPC endpoint id, a
/// unique id, TLS details), far below this.
pub const PROXY_HEADER_MAX: usize = 4096;

/// Version 2, command `PROXY`: the only version-and-command byte accepted.
const V2_PROXY: u8 = 0x21;
/// Family `AF_INET` / `AF_INET6`, protocol `STREAM`.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// The address block of each family (source and destination address, then both ports).
const TCP4_ADDRESSES: usize = 12;
const TCP6_ADDRESSES: usize = 36;

/// What the bytes read so far say about a connection's PROXY v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum ProxyHeader {
    /// Not decided yet: read until `needed` bytes are in hand (never more; the request head
    /// follows the header). `needed` is always larger than what was given and at most
    /// [`PROXY_HEADER_MAX`].
    Incomplete { needed: usize },
    /// A valid header of `len` bytes (the request begins at `len`) whose source is the client.
    Accepted { source: SocketAddr, len: usize },
    /// Not an acceptable header: close the connection, writing nothing.
    Rejected(ProxyReject),
}

/// Why a PROXY header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyReject {
    /// The bytes are not the v2 signature: no header, a version 1 (text `PROXY `) header, plain
    /// HTTP, a TLS handshake.
    Signature,
    /// The version nibble is not 2.
    Version,
    /// Command `LOCAL` (a health check of the balancer itself): it names no client.
    Local,
    /// A command other than `LOCAL` and `PROXY`.
    Command,
    /// Family `AF_UNSPEC`.
    Unspecified,
    /// Family `AF_UNIX`.
    Unix,
    /// A family number the protocol does not define.
    Family,
    /// Protocol `DGRAM` (UDP).
    Datagram,
    /// Protocol `UNSPEC`, or a number the protocol does not define.
    Protocol,
    /// The declared length cannot hold the family's addresses.
    ShortAddresses,
    /// The declared length makes the header longer than [`PROXY_HEADER_MAX`].
    TooLong,
    /// The bytes after the addresses are not a sequence of whole TLVs.
    Tlv,
}

/// Judges the start of a connection on a listener that requires PROXY v2 (§3.2). `bytes` are the
/// bytes read so far; anything past the header is ignored.
pub fn judge_proxy_header(bytes: &[u8]) -> ProxyHeader {
    let seen = bytes.len().min(PROTOCOL_PREFIX.len());
    if bytes[..seen] != PROTOCOL_PREFIX[..seen] {
        return ProxyHeader::Rejected(ProxyReject::Signature);
    }
    let Some(fixed) = bytes.get(..PROXY_FIXED_LEN) else {
        return ProxyHeader::Incomplete {
            needed: PROXY_FIXED_LEN,
        };
    };
    let addresses = match fixed_part(fixed[12], fixed[13]) {
        Ok(addresses) => addresses,
        Err(reject) => return ProxyHeader::Rejected(reject),
    };
    let declared = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if declared < addresses {
        return ProxyHeader::Rejected(ProxyReject::ShortAddresses);
    }
    let len = PROXY_FIXED_LEN + declared;
    if len > PROXY_HEADER_MAX {
        return ProxyHeader::Rejected(ProxyReject::TooLong);
    }
    match bytes.get(..len) {
        Some(header) => whole(header),
        None => ProxyHeader::Incomplete { needed: len },
    }
}

/// The version-and-command byte and the family-and-protocol byte: the size of the address block
/// when they say `PROXY` over TCP/IPv4 or TCP/IPv6.
fn fixed_part(version_command: u8, family_protocol: u8) -> Result<usize, ProxyReject> {
    if version_command != V2_PROXY {
        return Err(match (version_command >> 4, version_command & 0x0f) {
            (2, 0) => ProxyReject::Local,
            (2, _) => ProxyReject::Command,
            _ => ProxyReject::Version,
        });
    }
    match family_protocol {
        TCP4 => Ok(TCP4_ADDRESSES),
        TCP6 => Ok(TCP6_ADDRESSES),
        other => Err(match (other >> 4, other & 0x0f) {
            (0, _) => ProxyReject::Unspecified,
            (3, _) => ProxyReject::Unix,
            (4.., _) => ProxyReject::Family,
            (_, 2) => ProxyReject::Datagram,
            _ => ProxyReject::Protocol,
        }),
    }
}

/// A complete header whose fixed part was accepted.
fn whole(header: &[u8]) -> ProxyHeader {
    let Ok(parsed) = Header::try_from(header) else {
        // Not reached: `ppp` refuses only what the fixed part was checked for above (signature,
        // values, a length short of the addresses) or a header shorter than its length. Should
        // the crate ever disagree, the header is refused rather than trusted.
        return ProxyHeader::Rejected(ProxyReject::Tlv);
    };
    if parsed.tlvs().any(|tlv| tlv.is_err()) {
        return ProxyHeader::Rejected(ProxyReject::Tlv);
    }
    let source = match parsed.addresses {
        Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
        Addresses::IPv6(a) => SocketAddr::from((a.source_address, a.source_port)),
        // Refused by the fixed part already; kept exhaustive rather than assumed.
        Addresses::Unspecified => return ProxyHeader::Rejected(ProxyReject::Unspecified),
        Addresses::Unix(_) => return ProxyHeader::Rejected(ProxyReject::Unix),
    };
    ProxyHeader::Accepted {
        source,
        len: header.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

    /// A header with these two bytes, this address block and these TLV bytes.
    fn header(vc: u8, fp: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = SIG.to_vec();
        h.extend([vc, fp]);
        h.extend(
            u16::try_from(addresses.len() + tlvs.len())
                .unwrap()
                .to_be_bytes(),
        );
        h.extend(addresses);
        h.extend(tlvs);
        h
    }

    const V4: [u8; 12] = [203, 0, 113, 7, 10, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb];

    fn v6() -> Vec<u8> {
        let mut a = "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        a.extend(
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        a.extend([0x9c, 0x40, 0x01, 0xbb]);
        a
    }

    fn rejected(bytes: &[u8]) -> ProxyReject {
        match judge_proxy_header(bytes) {
            ProxyHeader::Rejected(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tcp4_and_tcp6_are_accepted_with_their_source() {
        let h = header(0x21, 0x11, &V4, &[]);
        assert_eq!(
            judge_proxy_header(&h),
            ProxyHeader::Accepted {
                source: "203.0.113.7:40000".parse().unwrap(),
                len: 28
            }
        );
        let h = header(0x21, 0x21, &v6(), &[]);
        assert_eq!(
            judge_proxy_header(&h),
            ProxyHeader::Accepted {
                source: "[2001:db8::7]:40000".parse().unwrap(),
                len: 52
            }
        );
    }

    #[test]
    fn bytes_after_the_header_are_not_its_business() {
        let mut h = header(0x21, 0x11, &V4, &[0x04, 0, 2, 0xab, 0xcd]);
        let len = h.len();
        h.extend(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            judge_proxy_header(&h),
            ProxyHeader::Accepted {
                source: "203.0.113.7:40000".parse().unwrap(),
                len
            }
        );
    }

    #[test]
    fn every_prefix_asks_for_exactly_the_rest() {
        let h = header(0x21, 0x21, &v6(), &[0xea, 0, 1, 9]);
        for cut in 0..h.len() {
            let needed = if cut < 16 { 16 } else { h.len() };
            assert_eq!(
                judge_proxy_header(&h[..cut]),
                ProxyHeader::Incomplete { needed },
                "{cut}"
            );
        }
    }

    #[test]
    fn anything_but_the_signature_is_refused_at_its_first_byte() {
        for start in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n"[..],
            b"P",
            b"GET / HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01",
            b"\r\n\r\n\0\r\nQUIT!",
        ] {
            assert_eq!(rejected(start), ProxyReject::Signature, "{start:?}");
        }
    }

    #[test]
    fn local_unspec_unix_udp_and_unknown_values_are_refused() {
        let cases = [
            (0x20, 0x11, ProxyReject::Local),
            (0x20, 0x00, ProxyReject::Local),
            (0x22, 0x11, ProxyReject::Command),
            (0x11, 0x11, ProxyReject::Version),
            (0x31, 0x11, ProxyReject::Version),
            (0x21, 0x00, ProxyReject::Unspecified),
            (0x21, 0x01, ProxyReject::Unspecified),
            (0x21, 0x31, ProxyReject::Unix),
            (0x21, 0x32, ProxyReject::Unix),
            (0x21, 0x12, ProxyReject::Datagram),
            (0x21, 0x22, ProxyReject::Datagram),
            (0x21, 0x10, ProxyReject::Protocol),
            (0x21, 0x13, ProxyReject::Protocol),
            (0x21, 0x41, ProxyReject::Family),
        ];
        for (vc, fp, why) in cases {
            let h = header(vc, fp, &V4, &[]);
            // Decided from the fixed part alone, before the body is read.
            assert_eq!(rejected(&h[..16]), why, "{vc:#x} {fp:#x}");
            assert_eq!(rejected(&h), why, "{vc:#x} {fp:#x}");
        }
        let unix = header(0x21, 0x31, &[0; 216], &[]);
        assert_eq!(rejected(&unix), ProxyReject::Unix);
    }

    #[test]
    fn lengths_are_bounded() {
        // Too short for the family's addresses.
        let mut h = header(0x21, 0x21, &v6(), &[]);
        h[14..16].copy_from_slice(&35u16.to_be_bytes());
        assert_eq!(rejected(&h[..16]), ProxyReject::ShortAddresses);
        // Longer than the limit: refused before reading the body.
        let mut h = header(0x21, 0x11, &V4, &[]);
        h[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(rejected(&h[..16]), ProxyReject::TooLong);
        let at_limit = u16::try_from(PROXY_HEADER_MAX - 16).unwrap();
        h[14..16].copy_from_slice(&at_limit.to_be_bytes());
        assert_eq!(
            judge_proxy_header(&h[..16]),
            ProxyHeader::Incomplete {
                needed: PROXY_HEADER_MAX
            }
        );
        h[14..16].copy_from_slice(&(at_limit + 1).to_be_bytes());
        assert_eq!(rejected(&h[..16]), ProxyReject::TooLong);
    }

    #[test]
    fn tlvs_must_be_whole() {
        let ok = header(0x21, 0x11, &V4, &[0x04, 0, 0, 0x05, 0, 2, 1, 2]);
        assert!(matches!(
            judge_proxy_header(&ok),
            ProxyHeader::Accepted { len: 36, .. }
        ));
        for tlvs in [
            &[0x04][..],
            &[0x04, 0],
            &[0x04, 0, 3, 1, 2],
            &[0x04, 0, 0, 0x01],
        ] {
            let h = header(0x21, 0x11, &V4, tlvs);
            assert_eq!(rejected(&h), ProxyReject::Tlv, "{tlvs:?}");
        }
    }
}
