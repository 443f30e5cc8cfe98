//! The service account's RSA key and the RS256 JWT it signs (PROTOCOL.md §11 step 1).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// The OAuth2 scope the access token is asked for.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// How long the JWT assertion is valid (`exp` − `iat`).
pub const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// Why a private key was refused. Says nothing about the key's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// No `PRIVATE KEY` or `RSA PRIVATE KEY` PEM block.
    NotPem,
    /// A PEM block that is not an RSA key ring can sign with (another algorithm, a damaged key,
    /// or fewer than 2048 bits).
    NotRsa,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyError::NotPem => "no PKCS#8 or PKCS#1 PEM private key",
            KeyError::NotRsa => "the private key is not a usable RSA key",
        })
    }
}

impl std::error::Error for KeyError {}

/// An RSA private key, parsed once. `Debug` shows nothing of it.
pub struct SigningKey {
    pair: RsaKeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Parses the first private key of a PEM text: PKCS#8 (`PRIVATE KEY`, as Google issues them)
    /// or PKCS#1 (`RSA PRIVATE KEY`).
    pub fn from_pem(pem: &str) -> Result<SigningKey, KeyError> {
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| KeyError::NotPem)?;
        let pair = match &der {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err(KeyError::NotRsa),
        }
        .map_err(|_| KeyError::NotRsa)?;
        Ok(SigningKey { pair })
    }

    /// The public key as a DER `RSAPublicKey`, for verifying what this key signed.
    pub fn public_key_der(&self) -> &[u8] {
        self.pair.public().as_ref()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let mut signature = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message,
                &mut signature,
            )
            .expect("signing with a parsed RSA key into a modulus-sized buffer");
        signature
    }
}

/// Who signs the assertion: the service account's identity and key.
#[derive(Debug)]
pub struct Signer {
    pub client_email: String,
    pub private_key_id: Option<String>,
    pub key: SigningKey,
}

impl Signer {
    /// The RS256 JWT exchanged for an access token at `audience` (the token URL), issued at
    /// `iat` (Unix seconds).
    pub fn assertion(&self, audience: &str, iat: u64) -> String {
        let mut header = serde_json::Map::new();
        header.insert("alg".into(), "RS256".into());
        header.insert("typ".into(), "JWT".into());
        if let Some(kid) = &self.private_key_id {
            header.insert("kid".into(), kid.as_str().into());
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": audience,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME_SECS,
        });
        let mut jwt = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::Value::Object(header).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self.key.sign(jwt.as_bytes());
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        jwt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    const PKCS8: &str = include_str!("../testdata/test-only-key-pkcs8.pem");
    const PKCS1: &str = include_str!("../testdata/test-only-key-pkcs1.pem");
    const EC: &str = include_str!("../testdata/test-only-key-ec.pem");

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn both_pem_forms_parse_to_the_same_key() {
        let a = SigningKey::from_pem(PKCS8).unwrap();
        let b = SigningKey::from_pem(PKCS1).unwrap();
        assert_eq!(a.public_key_der(), b.public_key_der());
        assert_eq!(format!("{a:?}"), "SigningKey(..)");
    }

    #[test]
    fn other_keys_are_refused() {
        assert_eq!(SigningKey::from_pem(EC).unwrap_err(), KeyError::NotRsa);
        assert_eq!(
            SigningKey::from_pem("no pem here").unwrap_err(),
            KeyError::NotPem
        );
        let damaged = PKCS8.replacen("MII", "MIJ", 1);
        assert!(SigningKey::from_pem(&damaged).is_err());
        let armour_only = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        assert!(SigningKey::from_pem(armour_only).is_err());
    }

    #[test]
    fn assertion_has_the_claims_and_a_valid_signature() {
        let signer = Signer {
            client_email: "relay@p.iam.gserviceaccount.com".into(),
            private_key_id: Some("kid1".into()),
            key: SigningKey::from_pem(PKCS8).unwrap(),
        };
        let jwt = signer.assertion("http://127.0.0.1:1/token", 1_700_000_000);
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(
            decode(parts[0]),
            serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "kid1"})
        );
        assert_eq!(
            decode(parts[1]),
            serde_json::json!({
                "iss": "relay@p.iam.gserviceaccount.com",
                "scope": SCOPE,
                "aud": "http://127.0.0.1:1/token",
                "iat": 1_700_000_000u64,
                "exp": 1_700_003_600u64,
            })
        );
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let signed = format!("{}.{}", parts[0], parts[1]);
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, signer.key.public_key_der())
            .verify(signed.as_bytes(), &signature)
            .expect("signature verifies");
        // Without a key id there is no `kid`.
        let signer = Signer {
            private_key_id: None,
            ..signer
        };
        let jwt = signer.assertion("aud", 1);
        let header = decode(jwt.split('.').next().unwrap());
        assert_eq!(header, serde_json::json!({"alg": "RS256", "typ": "JWT"}));
    }
}
