//! TLS on the main listener (PROTOCOL.md §2.1, §3 stage 0), one code path for every executor:
//! futures-rustls over the executor's futures-io stream, rustls with the ring provider.
//!
//! The node takes a finished [`ServerConfig`] ([`Options::tls`](crate::Options::tls)); build it
//! with [`server_config`] so the rules below hold whatever supplies the certificates:
//! TLS 1.2 and 1.3 only, ALPN `http/1.1` (and `acme-tls/1` when asked), never `h2`.
//!
//! After the handshake the node looks at the negotiated ALPN protocol: `acme-tls/1` means a
//! TLS-ALPN-01 validation (RFC 8737), which only needs the handshake, so the connection is closed
//! (close_notify) and never reaches the gate. Any other outcome (`http/1.1`, or no ALPN at all)
//! carries HTTP/1.1.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::ResolvesServerCert;

/// The ALPN id of HTTP/1.1.
pub const ALPN_HTTP_1_1: &[u8] = b"http/1.1";
/// The ALPN id of the TLS-ALPN-01 challenge (RFC 8737).
pub const ALPN_ACME_TLS: &[u8] = b"acme-tls/1";

/// Which ALPN protocols the listener offers besides `http/1.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `http/1.1` only.
    Http,
    /// `http/1.1` and `acme-tls/1` (ACME mode: the resolver answers challenge hellos).
    HttpAndAcme,
}

/// The main listener's server configuration: the ring provider, TLS 1.3 and 1.2, no client
/// certificates, certificates from `certs` (chosen per handshake, so a resolver can swap them
/// at any time), and the ALPN list of `alpn`.
///
/// A client whose ALPN list shares nothing with the server's is refused with the
/// `no_application_protocol` alert (RFC 7301), so a client asking only for `h2` cannot connect;
/// a client offering no ALPN gets HTTP/1.1.
pub fn server_config(certs: Arc<dyn ResolvesServerCert>, alpn: Alpn) -> ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = match alpn {
        Alpn::Http => vec![ALPN_HTTP_1_1.to_vec()],
        Alpn::HttpAndAcme => vec![ALPN_HTTP_1_1.to_vec(), ALPN_ACME_TLS.to_vec()],
    };
    config
}

/// What a completed handshake carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Negotiated {
    /// HTTP/1.1, by ALPN or by default.
    Http,
    /// A TLS-ALPN-01 validation: close after the handshake.
    AcmeChallenge,
}

pub(crate) fn negotiated(alpn: Option<&[u8]>) -> Negotiated {
    match alpn {
        Some(ALPN_ACME_TLS) => Negotiated::AcmeChallenge,
        _ => Negotiated::Http,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acme_alpn_is_a_challenge_everything_else_http() {
        assert_eq!(negotiated(Some(b"acme-tls/1")), Negotiated::AcmeChallenge);
        assert_eq!(negotiated(Some(b"http/1.1")), Negotiated::Http);
        assert_eq!(negotiated(None), Negotiated::Http);
    }

    #[derive(Debug)]
    struct NoCerts;

    impl ResolvesServerCert for NoCerts {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }

    #[test]
    fn alpn_lists_never_offer_h2() {
        let c = server_config(Arc::new(NoCerts), Alpn::Http);
        assert_eq!(c.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let c = server_config(Arc::new(NoCerts), Alpn::HttpAndAcme);
        assert_eq!(
            c.alpn_protocols,
            vec![b"http/1.1".to_vec(), b"acme-tls/1".to_vec()]
        );
    }
}
