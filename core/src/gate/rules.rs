//! The header rules of stage 6 (PROTOCOL.md §4).

use super::head::{Head, Presence};
use super::route::Upgrade;
use crate::id::{ServerId, ServerIdError};
use crate::io::Role;

/// Which rule a head broke; every one is a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Broken {
    /// A required header is absent, empty or repeated.
    Required(&'static str),
    /// An optional header is repeated.
    Repeated(&'static str),
    ServerId(ServerIdError),
}

/// Checks the headers an upgrade route requires and extracts what the shard needs. The token is
/// only counted, never read.
pub(super) fn check(head: &Head<'_>, route: Upgrade) -> Result<(ServerId, Role), Broken> {
    let server_id = required(head, "x-pyrycode-server")?;
    let server_id = ServerId::parse(server_id).map_err(Broken::ServerId)?;
    required(head, "user-agent")?;
    let role = match route {
        Upgrade::Server => {
            let version = required(head, "x-pyrycode-version")?;
            Role::Binary {
                version: String::from_utf8_lossy(version).into_owned(),
            }
        }
        Upgrade::ClientV1 | Upgrade::ClientV2 => {
            if route == Upgrade::ClientV1 {
                required(head, "x-pyrycode-token")?;
            } else {
                at_most_once(head, "x-pyrycode-token")?;
            }
            let device_name = at_most_once(head, "x-pyrycode-device-name")?
                .filter(|name| !name.is_empty())
                .map(|name| String::from_utf8_lossy(name).into_owned());
            Role::Phone { device_name }
        }
    };
    Ok((server_id, role))
}

/// Present exactly once and non-empty after trimming.
fn required<'a>(head: &Head<'a>, name: &'static str) -> Result<&'a [u8], Broken> {
    match head.presence(name) {
        Presence::Once(v) if !v.is_empty() => Ok(v),
        Presence::Once(_) | Presence::Absent | Presence::Repeated => Err(Broken::Required(name)),
    }
}

/// Absent, or present once (possibly empty).
fn at_most_once<'a>(head: &Head<'a>, name: &'static str) -> Result<Option<&'a [u8]>, Broken> {
    match head.presence(name) {
        Presence::Absent => Ok(None),
        Presence::Once(v) => Ok(Some(v)),
        Presence::Repeated => Err(Broken::Repeated(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::head::{Parsed, parse};
    use super::*;

    fn run(route: Upgrade, headers: &str) -> Result<(ServerId, Role), Broken> {
        let head = format!("GET / HTTP/1.1\r\n{headers}\r\n");
        match parse(head.as_bytes(), 16384) {
            Parsed::Complete(h) => check(&h, route),
            other => panic!("{other:?}"),
        }
    }

    const BINARY: &str = "X-Pyrycode-Server: abc\r\nX-Pyrycode-Version: 1.2\r\nUser-Agent: ua\r\n";

    #[test]
    fn binary_extracts_version() {
        let (sid, role) = run(Upgrade::Server, BINARY).unwrap();
        assert_eq!(sid.as_str(), "abc");
        assert_eq!(
            role,
            Role::Binary {
                version: "1.2".into()
            }
        );
    }

    #[test]
    fn binary_required_headers() {
        let fields = [
            ("X-Pyrycode-Server", "abc"),
            ("X-Pyrycode-Version", "1.2"),
            ("User-Agent", "ua"),
        ];
        let render = |f: &[(&str, &str)]| -> String {
            f.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect()
        };
        for (i, (name, _)) in fields.iter().enumerate() {
            let mut without = fields.to_vec();
            without.remove(i);
            let mut empty = fields.to_vec();
            empty[i].1 = " \t ";
            let mut repeated = fields.to_vec();
            repeated.push(fields[i]);
            for f in [without, empty, repeated] {
                let got = run(Upgrade::Server, &render(&f));
                assert!(
                    matches!(got, Err(Broken::Required(n)) if n.eq_ignore_ascii_case(name)),
                    "{f:?}"
                );
            }
        }
    }

    #[test]
    fn phone_token_rules() {
        let base = "x-pyrycode-server: abc\r\nuser-agent: ua\r\n";
        assert_eq!(
            run(Upgrade::ClientV1, base),
            Err(Broken::Required("x-pyrycode-token"))
        );
        let with_token = format!("{base}x-pyrycode-token: t\r\n");
        assert!(run(Upgrade::ClientV1, &with_token).is_ok());
        assert!(run(Upgrade::ClientV2, base).is_ok());
        assert!(run(Upgrade::ClientV2, &format!("{base}x-pyrycode-token: \r\n")).is_ok());
        let twice = format!("{with_token}X-Pyrycode-Token: u\r\n");
        assert_eq!(
            run(Upgrade::ClientV2, &twice),
            Err(Broken::Repeated("x-pyrycode-token"))
        );
        assert_eq!(
            run(Upgrade::ClientV1, &twice),
            Err(Broken::Required("x-pyrycode-token"))
        );
    }

    #[test]
    fn device_name_optional_not_repeated() {
        let base = "x-pyrycode-server: abc\r\nuser-agent: ua\r\n";
        let (_, role) = run(
            Upgrade::ClientV2,
            &format!("{base}X-Pyrycode-Device-Name: Pixel\r\n"),
        )
        .unwrap();
        assert_eq!(
            role,
            Role::Phone {
                device_name: Some("Pixel".into())
            }
        );
        let (_, role) = run(
            Upgrade::ClientV2,
            &format!("{base}X-Pyrycode-Device-Name:\r\n"),
        )
        .unwrap();
        assert_eq!(role, Role::Phone { device_name: None });
        let twice = format!("{base}X-Pyrycode-Device-Name: a\r\nX-Pyrycode-Device-Name: a\r\n");
        assert_eq!(
            run(Upgrade::ClientV2, &twice),
            Err(Broken::Repeated("x-pyrycode-device-name"))
        );
    }

    #[test]
    fn server_id_syntax() {
        let with = |sid: &[u8]| {
            let mut h = b"x-pyrycode-server: ".to_vec();
            h.extend_from_slice(sid);
            h.extend_from_slice(b"\r\nuser-agent: ua\r\n\r\n");
            let mut head = b"GET / HTTP/1.1\r\n".to_vec();
            head.extend_from_slice(&h);
            match parse(&head, 16384) {
                Parsed::Complete(h) => check(&h, Upgrade::ClientV2).map(|(s, _)| s),
                other => panic!("{other:?}"),
            }
        };
        assert!(with(&[b'a'; 128]).is_ok());
        assert_eq!(
            with(&[b'a'; 129]),
            Err(Broken::ServerId(ServerIdError::TooLong))
        );
        assert_eq!(
            with(b"a b"),
            Err(Broken::ServerId(ServerIdError::InvalidByte))
        );
        assert_eq!(
            with(b"a\tb"),
            Err(Broken::ServerId(ServerIdError::InvalidByte))
        );
        assert_eq!(
            with("é".as_bytes()),
            Err(Broken::ServerId(ServerIdError::InvalidByte))
        );
        // Surrounding spaces are not part of the value.
        assert_eq!(with(b"  abc\t").unwrap().as_str(), "abc");
    }
}
