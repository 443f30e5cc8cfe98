//! Certificates made at test time (rcgen, ECDSA P-256): a CA per call, leaf certificates for
//! `localhost` signed by it, and rustls configurations that trust it. No key is ever committed.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use switchyard_runtime::tls::{Alpn, server_config};

/// The name every test leaf certificate is issued for, and clients ask for.
pub const SERVER_NAME: &str = "localhost";

/// A certificate authority that exists for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa {
            issuer: Issuer::new(params, key),
            cert: cert.der().clone(),
        }
    }

    /// A fresh key and a certificate for [`SERVER_NAME`] signed by this CA.
    pub fn leaf(&self) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).expect("CA certificate");
        roots
    }

    /// A client trusting only this CA: TLS 1.3 and 1.2, no resumption (every connection shows
    /// the server's current certificate), ALPN `http/1.1`.
    pub fn client(&self) -> Arc<ClientConfig> {
        self.client_with(
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            &[b"http/1.1"],
        )
    }

    pub fn client_with(
        &self,
        versions: &[&'static SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// A leaf certificate and its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Leaf {
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        let provider = rustls::crypto::ring::default_provider();
        let key = PrivateKeyDer::Pkcs8(self.key.clone_key());
        Arc::new(CertifiedKey::from_der(vec![self.cert.clone()], key, &provider).expect("pair"))
    }

    /// Writes the PEM certificate and key to `cert` and `key`.
    pub fn write(&self, cert: &Path, key: &Path) {
        std::fs::write(cert, &self.cert_pem).expect("write certificate");
        std::fs::write(key, &self.key_pem).expect("write key");
    }

    /// The server configuration the relay would build with this pair fixed.
    pub fn server_config(&self, alpn: Alpn) -> Arc<ServerConfig> {
        Arc::new(server_config(Arc::new(Fixed(self.certified_key())), alpn))
    }
}

/// One certificate for every handshake.
#[derive(Debug)]
pub struct Fixed(pub Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
