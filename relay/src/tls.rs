//! TLS from PEM files (`--tls-cert`, `--tls-key`; PROTOCOL.md §14.2), re-read when they change.
//!
//! [`FileCerts`] is the listener's certificate resolver: every handshake takes the pair it holds
//! at that moment, so a swap reaches new handshakes at once and never touches a connection
//! already open. A [`Watcher`] thread looks at both files once per interval (metadata only: size,
//! times, inode) and, once a change has held still for one interval, loads the new pair and
//! swaps it in. A pair that does not load (unparsable, a key that is not the certificate's, a
//! file half-written or missing) is logged once and the previous pair stays.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use switchyard_runtime::rustls::crypto::ring;
use switchyard_runtime::rustls::pki_types::pem::PemObject;
use switchyard_runtime::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use switchyard_runtime::rustls::server::{ClientHello, ResolvesServerCert};
use switchyard_runtime::rustls::sign::CertifiedKey;
use switchyard_runtime::rustls::{self, InconsistentKeys};

use crate::cli::TlsFileProblem;

/// How often the watcher looks at the files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// The most read of either file: a chain of a few certificates, or a key, is far smaller, and
/// a path to something endless (a device, a pipe) must not exhaust memory.
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// Which of the two files is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
}

/// Why a pair did not load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairError {
    pub file: TlsFile,
    pub problem: TlsFileProblem,
}

impl PairError {
    fn cert(problem: TlsFileProblem) -> PairError {
        PairError {
            file: TlsFile::Cert,
            problem,
        }
    }

    fn key(problem: TlsFileProblem) -> PairError {
        PairError {
            file: TlsFile::Key,
            problem,
        }
    }

    /// A short fixed name, for a log line's `reason`.
    pub fn reason(&self) -> &'static str {
        match (self.file, self.problem) {
            (TlsFile::Cert, TlsFileProblem::Unreadable) => "cert_unreadable",
            (TlsFile::Key, TlsFileProblem::Unreadable) => "key_unreadable",
            (TlsFile::Cert, TlsFileProblem::NotPem) => "cert_not_pem",
            (TlsFile::Key, TlsFileProblem::NotPem) => "key_not_pem",
            (_, TlsFileProblem::BadCertificate) => "bad_certificate",
            (_, TlsFileProblem::UnsupportedKey) => "unsupported_key",
            (_, TlsFileProblem::KeyMismatch) => "key_mismatch",
        }
    }

    /// Fixed text, naming no path and quoting nothing from the files (§15).
    pub fn text(&self) -> &'static str {
        match (self.file, self.problem) {
            (TlsFile::Cert, TlsFileProblem::Unreadable) => "the certificate file cannot be read",
            (TlsFile::Key, TlsFileProblem::Unreadable) => "the key file cannot be read",
            (TlsFile::Cert, TlsFileProblem::NotPem) => {
                "the certificate file holds no PEM certificate"
            }
            (TlsFile::Key, TlsFileProblem::NotPem) => "the key file holds no PEM private key",
            (_, TlsFileProblem::BadCertificate) => "the certificate cannot be parsed",
            (_, TlsFileProblem::UnsupportedKey) => {
                "the private key is not a usable RSA, ECDSA or Ed25519 key"
            }
            (_, TlsFileProblem::KeyMismatch) => "the private key does not match the certificate",
        }
    }
}

/// Reads and checks a pair: a PEM chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or
/// SEC1) that ring can sign with and whose public key is the leaf's.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, PairError> {
    let cert_pem = read_limited(cert).ok_or(PairError::cert(TlsFileProblem::Unreadable))?;
    let key_pem = read_limited(key).ok_or(PairError::key(TlsFileProblem::Unreadable))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| PairError::cert(TlsFileProblem::NotPem))?;
    if chain.is_empty() {
        return Err(PairError::cert(TlsFileProblem::NotPem));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| PairError::key(TlsFileProblem::NotPem))?;
    let signer = ring::default_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|_| PairError::key(TlsFileProblem::UnsupportedKey))?;
    let pair = CertifiedKey::new(chain, signer);
    match pair.keys_match() {
        // ring's keys always know their public key; "unknown" is rustls's own pass.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok(Arc::new(pair))
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(PairError::key(TlsFileProblem::KeyMismatch)),
        Err(_) => Err(PairError::cert(TlsFileProblem::BadCertificate)),
    }
}

/// The file's bytes; `None` if it cannot be read or is larger than [`MAX_PEM_FILE`].
fn read_limited(path: &Path) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(MAX_PEM_FILE + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (bytes.len() as u64 <= MAX_PEM_FILE).then_some(bytes)
}

/// The main listener's certificate: the pair loaded last.
#[derive(Debug)]
pub struct FileCerts {
    current: RwLock<Arc<CertifiedKey>>,
}

impl FileCerts {
    pub fn new(pair: Arc<CertifiedKey>) -> FileCerts {
        FileCerts {
            current: RwLock::new(pair),
        }
    }

    /// The pair new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn replace(&self, pair: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = pair;
    }
}

impl ResolvesServerCert for FileCerts {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// What the watcher compares: enough metadata of both files that a rewrite, a rename over
/// them, or a symlink pointed elsewhere (certbot's `live/`, Kubernetes' `..data`) shows up.
/// `None` while either file is missing.
type Signature = Option<[FileStamp; 2]>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<FileStamp> {
    // Follows symlinks: the file served is the target.
    let m = fs::metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

fn signature(cert: &Path, key: &Path) -> Signature {
    Some([stamp(cert)?, stamp(key)?])
}

/// The thread that reloads the pair. Dropping it stops the thread.
#[derive(Debug)]
pub struct Watcher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why [`watch`] could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchError {
    /// The pair did not load: a boot refusal (§14.3 item 2).
    Pair(PairError),
    /// The watcher thread could not be started.
    Thread,
}

/// Loads the pair and starts watching the files every `interval`.
pub fn watch(
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
) -> Result<(Arc<FileCerts>, Watcher), WatchError> {
    // Taken before the load: a change while loading is seen at the first look.
    let seen = signature(&cert, &key);
    let certs = Arc::new(FileCerts::new(
        load_pair(&cert, &key).map_err(WatchError::Pair)?,
    ));
    let (stop, stopped) = mpsc::channel();
    let target = certs.clone();
    let thread = std::thread::Builder::new()
        .name("switchyard-tls-files".to_owned())
        .spawn(move || watch_loop(&cert, &key, interval, seen, &target, &stopped))
        .map_err(|_| WatchError::Thread)?;
    Ok((
        certs,
        Watcher {
            stop: Some(stop),
            thread: Some(thread),
        },
    ))
}

fn watch_loop(
    cert: &Path,
    key: &Path,
    interval: Duration,
    mut seen: Signature,
    certs: &FileCerts,
    stopped: &mpsc::Receiver<()>,
) {
    // A change is loaded once it has held still for one interval: a pair written file by file,
    // or a file written in several steps, is not judged half-way.
    let mut settling: Option<Signature> = None;
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
        let now = signature(cert, key);
        if now == seen {
            settling = None;
            continue;
        }
        if settling != Some(now) {
            settling = Some(now);
            continue;
        }
        settling = None;
        // Whatever the outcome, this version of the files is judged once.
        seen = now;
        match load_pair(cert, key) {
            Ok(pair) => {
                certs.replace(pair);
                tracing::info!("tls_reloaded");
            }
            Err(e) => {
                tracing::warn!(reason = e.reason(), err = e.text(), "tls_reload_failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A fresh directory of its own (tests run in parallel).
    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("switchyard-tls-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// A self-signed certificate and its key, made now: PEM texts.
    fn pem_pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn write(dir: &Path, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
        let paths = (dir.join("cert.pem"), dir.join("key.pem"));
        fs::write(&paths.0, cert).unwrap();
        fs::write(&paths.1, key).unwrap();
        paths
    }

    fn leaf_der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    fn served(certs: &FileCerts) -> Vec<u8> {
        certs.current().cert[0].to_vec()
    }

    #[test]
    fn load_pair_accepts_a_matching_pair_and_names_each_fault() {
        let d = dir("load");
        let pair = pem_pair();
        let (cert, key) = write(&d, &pair);
        let loaded = load_pair(&cert, &key).unwrap();
        assert_eq!(loaded.cert[0].to_vec(), leaf_der(&pair.0));
        let other = d.join("other-key.pem");
        fs::write(&other, pem_pair().1).unwrap();
        let e = load_pair(&cert, &other).unwrap_err();
        assert_eq!(e, PairError::key(TlsFileProblem::KeyMismatch));
        assert_eq!(e.reason(), "key_mismatch");
        let missing = d.join("missing.pem");
        assert_eq!(
            load_pair(&missing, &key).unwrap_err(),
            PairError::cert(TlsFileProblem::Unreadable)
        );
        assert_eq!(
            load_pair(&cert, &missing).unwrap_err(),
            PairError::key(TlsFileProblem::Unreadable)
        );
        assert_eq!(
            load_pair(&key, &key).unwrap_err(),
            PairError::cert(TlsFileProblem::NotPem)
        );
        assert_eq!(
            load_pair(&cert, &cert).unwrap_err(),
            PairError::key(TlsFileProblem::NotPem)
        );
        // Beyond the size cap: not read at all, whatever it holds.
        let huge = d.join("huge.pem");
        let mut text = pair.0.clone().into_bytes();
        text.resize(MAX_PEM_FILE as usize + 1, b'\n');
        fs::write(&huge, &text).unwrap();
        assert_eq!(
            load_pair(&huge, &key).unwrap_err(),
            PairError::cert(TlsFileProblem::Unreadable)
        );
        text.truncate(MAX_PEM_FILE as usize);
        fs::write(&huge, &text).unwrap();
        assert!(load_pair(&huge, &key).is_ok());
        let half = d.join("half.pem");
        fs::write(&half, &pair.1[..pair.1.len() / 2]).unwrap();
        assert!(load_pair(&cert, &half).is_err());
    }

    #[test]
    fn texts_name_no_path() {
        for problem in [
            TlsFileProblem::Unreadable,
            TlsFileProblem::NotPem,
            TlsFileProblem::BadCertificate,
            TlsFileProblem::UnsupportedKey,
            TlsFileProblem::KeyMismatch,
        ] {
            for file in [TlsFile::Cert, TlsFile::Key] {
                let e = PairError { file, problem };
                assert!(!e.text().contains('/'), "{}", e.text());
                assert!(
                    e.reason()
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_')
                );
            }
        }
    }

    fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn watcher_swaps_good_pairs_and_keeps_the_last_good_one() {
        let d = dir("watch");
        let a = pem_pair();
        let (cert, key) = write(&d, &a);
        let interval = Duration::from_millis(20);
        let (certs, watcher) = watch(cert.clone(), key.clone(), interval).unwrap();
        assert_eq!(served(&certs), leaf_der(&a.0));
        let b = pem_pair();
        write(&d, &b);
        eventually("pair b", || served(&certs) == leaf_der(&b.0));
        // A key of another certificate: refused, b stays.
        fs::write(&key, pem_pair().1).unwrap();
        std::thread::sleep(interval * 10);
        assert_eq!(served(&certs), leaf_der(&b.0));
        // Files replaced by rename, as careful tools do: picked up.
        let c = pem_pair();
        let staged = dir("watch-staged");
        let (sc, sk) = write(&staged, &c);
        fs::rename(sk, &key).unwrap();
        fs::rename(sc, &cert).unwrap();
        eventually("pair c", || served(&certs) == leaf_der(&c.0));
        drop(watcher);
        // Stopped: nothing changes any more.
        write(&d, &pem_pair());
        std::thread::sleep(interval * 5);
        assert_eq!(served(&certs), leaf_der(&c.0));
    }
}
