//! The client address that keys the bucket and the per-address cap (PROTOCOL.md §3.1).

use std::net::IpAddr;

use super::head::{Head, trim};

/// The transport peer, or with `trust_forwarded_for` the left-most entry of the first
/// `X-Forwarded-For` line when it is an IP address; in canonical form (IPv4-mapped IPv6 as IPv4).
pub(super) fn address(peer: IpAddr, head: &Head<'_>, trust_forwarded_for: bool) -> IpAddr {
    let forwarded = trust_forwarded_for
        .then(|| head.values("x-forwarded-for").next())
        .flatten()
        .and_then(left_most);
    forwarded.unwrap_or(peer).to_canonical()
}

fn left_most(line: &[u8]) -> Option<IpAddr> {
    let first = line.split(|&b| b == b',').next()?;
    std::str::from_utf8(trim(first)).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::head::{Parsed, parse};
    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn client(head: &[u8], trust: bool) -> IpAddr {
        match parse(head, 16384) {
            Parsed::Complete(h) => address(PEER, &h, trust),
            other => panic!("{other:?}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_only_when_trusted() {
        let head = b"GET / HTTP/1.1\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n";
        assert_eq!(client(head, false), PEER);
        assert_eq!(client(head, true), ip("203.0.113.9"));
    }

    #[test]
    fn left_most_entry_of_first_line_trimmed() {
        let head = b"GET / HTTP/1.1\r\nx-forwarded-for: \t 2001:db8::1 , 10.0.0.1\r\n\
                     X-Forwarded-For: 10.0.0.2\r\n\r\n";
        assert_eq!(client(head, true), ip("2001:db8::1"));
    }

    #[test]
    fn unparsable_entry_falls_back_to_peer() {
        for value in [
            &b"unknown, 10.0.0.1"[..],
            b"10.0.0.1:80",
            b"[2001:db8::1]",
            b"",
            b" , 10.0.0.1",
            b"\xff10.0.0.1",
        ] {
            let mut head = b"GET / HTTP/1.1\r\nX-Forwarded-For: ".to_vec();
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n\r\n");
            assert_eq!(
                client(&head, true),
                PEER,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
        // Only the first line counts, even when it holds no address.
        let head = b"GET / HTTP/1.1\r\nX-Forwarded-For: x\r\nX-Forwarded-For: 10.0.0.2\r\n\r\n";
        assert_eq!(client(head, true), PEER);
    }

    #[test]
    fn canonical_keys() {
        let head = b"GET / HTTP/1.1\r\nX-Forwarded-For: ::ffff:198.51.100.7\r\n\r\n";
        assert_eq!(client(head, true), ip("198.51.100.7"));
        let plain = b"GET / HTTP/1.1\r\n\r\n";
        let h = match parse(plain, 16384) {
            Parsed::Complete(h) => h,
            other => panic!("{other:?}"),
        };
        assert_eq!(address(ip("::ffff:192.0.2.1"), &h, false), PEER);
    }
}
