//! ACME mode (PROTOCOL.md §2.1, §14.2): certificates for `--domain` from an ACME directory,
//! validated by TLS-ALPN-01 on the main listener or by http-01 on `--acme-http-listen`, kept
//! in `--cert-cache`.
//!
//! rustls-acme holds the protocol state (account, orders, renewal at two thirds of a
//! certificate's life, retries with backoff). Its state is driven on one thread of its own with
//! async-io's `block_on`, apart from the node's executor, so it runs the same under tokio and
//! smol. The node sees only the certificate resolver (inside the TLS `ServerConfig`) and, with
//! http-01, the key authorizations waiting to be fetched.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use futures_util::StreamExt;
use rustls_acme::{
    AccountCache, AcmeConfig, AcmeState, CertCache, EventError, EventOk, OrderError,
    ResolvesServerCertAcme, UseChallenge,
};
use switchyard_runtime::Http01Answers;
use switchyard_runtime::rustls::crypto::ring;
use switchyard_runtime::rustls::pki_types::CertificateDer;
use switchyard_runtime::rustls::pki_types::pem::PemObject;
use switchyard_runtime::rustls::{ClientConfig, RootCertStore, ServerConfig, version};
use switchyard_runtime::tls::{Alpn, server_config};

use crate::cli::{Acme, TlsFileProblem};

/// Why `--cert-cache` cannot be used (exit 1, §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheProblem {
    /// It (or a parent) could not be created.
    Create,
    /// It exists but is not a directory.
    NotDirectory,
    /// It is owned by another user than the effective uid (or the uid is unknown).
    NotOwned,
    /// It is ours and open to others, and its mode could not be tightened.
    Tighten,
}

impl CacheProblem {
    /// Fixed text for the `err` field (§15).
    pub fn text(self) -> &'static str {
        match self {
            CacheProblem::Create => "the certificate cache directory cannot be created",
            CacheProblem::NotDirectory => "the certificate cache is not a directory",
            CacheProblem::NotOwned => {
                "the certificate cache directory is not owned by the effective uid"
            }
            CacheProblem::Tighten => "the certificate cache directory cannot be set to mode 0700",
        }
    }
}

/// What [`prepare_cache`] did to an existing directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// Created with mode 0700, or already ours and closed to others.
    Ready,
    /// Ours but group- or world-accessible: set to 0700.
    Tightened,
}

/// Makes `dir` usable as the certificate cache (§14.2): created 0700 (parents too) if missing;
/// refused if it is not a directory or not owned by `euid`; tightened to 0700 if it is ours
/// and accessible to group or others.
pub fn prepare_cache(dir: &Path, euid: Option<u32>) -> Result<Prepared, CacheProblem> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|_| CacheProblem::Create)?;
    let meta = fs::metadata(dir).map_err(|_| CacheProblem::Create)?;
    if !meta.is_dir() {
        return Err(CacheProblem::NotDirectory);
    }
    if Some(meta.uid()) != euid {
        return Err(CacheProblem::NotOwned);
    }
    if meta.mode() & 0o077 == 0 {
        return Ok(Prepared::Ready);
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|_| CacheProblem::Tighten)?;
    Ok(Prepared::Tightened)
}

/// Reads the PEM certificates of `--acme-ca-file`, the only roots then trusted for the ACME
/// directory's HTTPS. Every certificate in it must be one a root store accepts.
pub fn load_ca_file(path: &Path) -> Result<RootCertStore, TlsFileProblem> {
    let text = fs::read(path).map_err(|_| TlsFileProblem::Unreadable)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsFileProblem::NotPem)?;
    if certs.is_empty() {
        return Err(TlsFileProblem::NotPem);
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|_| TlsFileProblem::BadCertificate)?;
    }
    Ok(roots)
}

/// The public web PKI roots (webpki-roots), for a public ACME directory.
fn public_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// The cache of account keys and certificates in `--cert-cache`: one file per (contacts,
/// directory) account and per (domains, directory) certificate, named by a SHA-256 of those,
/// written 0600 through a temporary file and a rename so a crash never leaves half a key.
///
/// Its methods do blocking file I/O: they only ever run on the ACME thread.
#[derive(Debug, Clone)]
pub struct FileCache {
    dir: PathBuf,
}

impl FileCache {
    pub fn new(dir: PathBuf) -> FileCache {
        FileCache { dir }
    }

    fn name(kind: &str, items: &[String], directory_url: &str) -> String {
        let mut ctx = ::ring::digest::Context::new(&::ring::digest::SHA256);
        for item in items {
            ctx.update(item.as_bytes());
            ctx.update(&[0]);
        }
        ctx.update(directory_url.as_bytes());
        let mut name = format!("{kind}_");
        for b in ctx.finish().as_ref() {
            let _ = write!(name, "{b:02x}");
        }
        name
    }

    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.dir.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write(&self, name: &str, contents: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, self.dir.join(name))
    }
}

#[async_trait]
impl CertCache for FileCache {
    type EC = io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        self.read(&Self::name("cert", domains, directory_url))
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory_url: &str,
        cert: &[u8],
    ) -> io::Result<()> {
        self.write(&Self::name("cert", domains, directory_url), cert)
    }
}

#[async_trait]
impl AccountCache for FileCache {
    type EA = io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory_url: &str,
    ) -> io::Result<Option<Vec<u8>>> {
        self.read(&Self::name("account", contact, directory_url))
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory_url: &str,
        account: &[u8],
    ) -> io::Result<()> {
        self.write(&Self::name("account", contact, directory_url), account)
    }
}

/// The http-01 answers of the ACME state, for the node's http-01 listener.
struct Answers(Arc<ResolvesServerCertAcme>);

impl Http01Answers for Answers {
    fn key_authorization(&self, token: &str) -> Option<String> {
        self.0.get_http_01_key_auth(token)
    }
}

/// ACME state built and ready, not yet running: what the node needs from it, then
/// [`AcmeParts::run`].
pub struct AcmeParts {
    /// The main listener's TLS: certificates from the ACME state, ALPN `http/1.1` and
    /// `acme-tls/1`.
    pub tls: Arc<ServerConfig>,
    /// The http-01 answers, when `--acme-http-listen` is set.
    pub http01: Option<Arc<dyn Http01Answers>>,
    state: AcmeState<io::Error, io::Error>,
}

/// Builds the ACME state for `acme` (the cache must have passed [`prepare_cache`]). With an
/// http-01 listener the orders use http-01, else TLS-ALPN-01.
pub fn build(acme: &Acme, roots: Option<RootCertStore>) -> AcmeParts {
    let provider = Arc::new(ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots.unwrap_or_else(public_roots))
        .with_no_client_auth();
    let challenge = match acme.http_listen {
        Some(_) => UseChallenge::Http01,
        None => UseChallenge::TlsAlpn01,
    };
    let state = AcmeConfig::new_with_client_config(&acme.domains, Arc::new(client))
        .directory(&acme.directory)
        .contact(&acme.contacts)
        .cache(FileCache::new(acme.cert_cache.clone()))
        .challenge_type(challenge)
        .state();
    let resolver = state.resolver();
    let tls = server_config(resolver.clone(), Alpn::HttpAndAcme);
    let http01 = acme
        .http_listen
        .as_ref()
        .map(|_| Arc::new(Answers(resolver)) as Arc<dyn Http01Answers>);
    AcmeParts {
        tls: Arc::new(tls),
        http01,
        state,
    }
}

/// The thread driving the ACME state.
pub struct AcmeRunner {
    stop: async_channel::Sender<()>,
    thread: JoinHandle<()>,
}

impl AcmeParts {
    /// Drives the state on a thread of its own until [`AcmeRunner::stop`]: loads the cache,
    /// orders a certificate when there is none or it is due for renewal, logs each outcome.
    pub fn run(self) -> io::Result<AcmeRunner> {
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let mut state = self.state;
        let thread = std::thread::Builder::new()
            .name("acme".to_owned())
            .spawn(move || {
                async_io::block_on(async move {
                    loop {
                        let next = state.next();
                        let stop = std::pin::pin!(stopped.recv());
                        match futures_util::future::select(next, stop).await {
                            futures_util::future::Either::Left((Some(event), _)) => log(event),
                            _ => break,
                        }
                    }
                })
            })?;
        Ok(AcmeRunner { stop, thread })
    }
}

impl AcmeRunner {
    /// Stops the state (an order in flight is abandoned) and joins the thread.
    pub fn stop(self) {
        self.stop.close();
        let _ = self.thread.join();
    }
}

/// Logs one outcome of the ACME state with fixed text (§15): no domain, URL, or server text.
fn log(event: Result<EventOk, EventError<io::Error, io::Error>>) {
    match event {
        Ok(EventOk::DeployedCachedCert) => {
            tracing::info!(outcome = "cached", "acme_certificate");
        }
        Ok(EventOk::DeployedNewCert) => {
            tracing::info!(outcome = "issued", "acme_certificate");
        }
        Ok(EventOk::CertCacheStore | EventOk::AccountCacheStore) => {}
        Err(e) => {
            let (kind, err) = error_text(&e);
            tracing::warn!(kind, err, "acme_failed");
        }
    }
}

/// The `kind` and fixed `err` text of an ACME failure.
fn error_text(e: &EventError<io::Error, io::Error>) -> (&'static str, &'static str) {
    match e {
        EventError::CertCacheLoad(_) => ("cache", "cannot read the cached certificate"),
        EventError::AccountCacheLoad(_) => ("cache", "cannot read the cached account key"),
        EventError::CertCacheStore(_) => ("cache", "cannot write the certificate to the cache"),
        EventError::AccountCacheStore(_) => ("cache", "cannot write the account key to the cache"),
        EventError::CachedCertParse(_) => (
            "cache",
            "the cached certificate is unusable; ordering a new one",
        ),
        EventError::NewCertParse(_) => ("order", "the issued certificate is unusable"),
        EventError::Order(o) => (
            "order",
            match o {
                OrderError::Acme(_) => {
                    "the ACME directory refused or could not be reached; retrying with backoff"
                }
                OrderError::Rcgen(_) => "cannot generate the certificate request",
                OrderError::BadOrder(_) => "the order became invalid; retrying with backoff",
                OrderError::BadAuth(_) => {
                    "domain validation failed; retrying with backoff (is the challenge reachable?)"
                }
                OrderError::TooManyAttemptsAuth(_) => {
                    "domain validation stayed pending; retrying with backoff"
                }
                OrderError::ProcessingTimeout(_) => {
                    "the order stayed processing; retrying with backoff"
                }
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("switchyard-acme-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).expect("metadata").mode() & 0o777
    }

    fn euid() -> Option<u32> {
        crate::cli::ProcessIdentity::current().euid
    }

    #[test]
    fn cache_is_created_0700_with_its_parents() {
        let base = tmp("create");
        let dir = base.join("a").join("certs");
        assert_eq!(prepare_cache(&dir, euid()), Ok(Prepared::Ready));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&base.join("a")), 0o700);
        // Again: unchanged.
        assert_eq!(prepare_cache(&dir, euid()), Ok(Prepared::Ready));
        fs::remove_dir_all(&base).expect("clean up");
    }

    #[test]
    fn open_cache_is_tightened() {
        let dir = tmp("open");
        fs::create_dir_all(&dir).expect("mkdir");
        for open in [0o755, 0o770, 0o701, 0o707] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(open)).expect("chmod");
            assert_eq!(
                prepare_cache(&dir, euid()),
                Ok(Prepared::Tightened),
                "{open:o}"
            );
            assert_eq!(mode(&dir), 0o700);
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o500)).expect("chmod");
        assert_eq!(prepare_cache(&dir, euid()), Ok(Prepared::Ready));
        assert_eq!(mode(&dir), 0o500);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn foreign_or_odd_cache_is_refused() {
        let dir = tmp("foreign");
        let me = euid().expect("euid");
        assert_eq!(
            prepare_cache(&dir, Some(me.wrapping_add(1))),
            Err(CacheProblem::NotOwned)
        );
        assert_eq!(prepare_cache(&dir, None), Err(CacheProblem::NotOwned));
        // Refused before anything is changed.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(
            prepare_cache(&dir, Some(me.wrapping_add(1))),
            Err(CacheProblem::NotOwned)
        );
        assert_eq!(mode(&dir), 0o755);
        let file = dir.join("file");
        fs::write(&file, b"x").expect("write");
        assert_eq!(prepare_cache(&file, Some(me)), Err(CacheProblem::Create));
        assert_eq!(
            prepare_cache(&file.join("below"), Some(me)),
            Err(CacheProblem::Create)
        );
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn file_cache_round_trip_0600() {
        let dir = tmp("files");
        prepare_cache(&dir, euid()).expect("cache");
        let cache = FileCache::new(dir.clone());
        let domains = vec!["a.example".to_owned()];
        async_io::block_on(async {
            assert!(
                cache
                    .load_cert(&domains, "https://d/")
                    .await
                    .unwrap()
                    .is_none()
            );
            cache
                .store_cert(&domains, "https://d/", b"pem")
                .await
                .unwrap();
            cache
                .store_cert(&domains, "https://d/", b"pem2")
                .await
                .unwrap();
            assert_eq!(
                cache
                    .load_cert(&domains, "https://d/")
                    .await
                    .unwrap()
                    .as_deref(),
                Some(&b"pem2"[..])
            );
            // Another directory or domain set is another file.
            assert!(
                cache
                    .load_cert(&domains, "https://e/")
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(
                cache
                    .load_account(&domains, "https://d/")
                    .await
                    .unwrap()
                    .is_none()
            );
            cache
                .store_account(&[], "https://d/", b"key")
                .await
                .unwrap();
            assert_eq!(
                cache
                    .load_account(&[], "https://d/")
                    .await
                    .unwrap()
                    .as_deref(),
                Some(&b"key"[..])
            );
        });
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        for p in names {
            assert_eq!(mode(&p), 0o600, "{p:?}");
        }
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn ca_file_needs_a_certificate() {
        let dir = tmp("ca");
        fs::create_dir_all(&dir).expect("mkdir");
        let problem = |name: &str, contents: &str| {
            let path = dir.join(name);
            fs::write(&path, contents).expect("write");
            load_ca_file(&path).err()
        };
        assert_eq!(
            load_ca_file(&dir.join("missing.pem")).err(),
            Some(TlsFileProblem::Unreadable)
        );
        assert_eq!(problem("e.pem", "not pem"), Some(TlsFileProblem::NotPem));
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(problem("j.pem", junk), Some(TlsFileProblem::BadCertificate));
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).expect("ca");
        let other = rcgen::generate_simple_self_signed(vec!["b.test".to_owned()]).expect("ca");
        let good = dir.join("ca.pem");
        fs::write(&good, ca.cert.pem() + &other.cert.pem()).expect("write");
        assert_eq!(load_ca_file(&good).expect("roots").roots.len(), 2);
        assert_eq!(
            problem("mixed.pem", &(ca.cert.pem() + junk)),
            Some(TlsFileProblem::BadCertificate)
        );
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn server_config_offers_http11_and_acme_tls() {
        let acme = Acme {
            domains: vec!["a.example".into()],
            contacts: vec![],
            directory: "https://127.0.0.1:1/dir".into(),
            http_listen: None,
            http_proxy_protocol: false,
            cert_cache: tmp("unused"),
            ca_file: None,
        };
        let parts = build(&acme, None);
        assert_eq!(
            parts.tls.alpn_protocols,
            [b"http/1.1".to_vec(), b"acme-tls/1".to_vec()]
        );
        assert!(parts.http01.is_none());
        let with_http = Acme {
            http_listen: Some(crate::cli::ListenAddr::Ip("127.0.0.1:80".parse().unwrap())),
            ..acme
        };
        assert!(build(&with_http, None).http01.is_some());
    }
}
