//! Test keys for Microsoft Graph rich notifications: a 2048-bit RSA key and a
//! self-signed certificate for it, both PEM, as an operator would configure
//! them (PKCS#8 key, X.509 certificate).
//!
//! Keys come from a seeded RNG, so every run makes the same ones and nothing
//! depends on today's date (the certificate is valid 2025 to 2049; the
//! gateway does not check validity anyway). Include it with
//! `#[path = "common/graph_keys.rs"] mod graph_keys;` (tests) or
//! `#[path = "../tests/common/graph_keys.rs"]` (benches); it needs only
//! dev-dependencies. Generating a key takes a moment: keep the result in a
//! `OnceLock` when several tests need it.
#![allow(dead_code)] // each includer uses a different part

use std::str::FromStr;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rsa::PrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use x509_cert::TbsCertificate;
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::der::EncodePem;
use x509_cert::der::asn1::GeneralizedTime;
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef};
use x509_cert::time::{Time, Validity};

/// 2025-01-01T00:00:00Z and 2049-12-31T00:00:00Z.
const NOT_BEFORE_SECS: u64 = 1_735_689_600;
const NOT_AFTER_SECS: u64 = 2_524_521_600;

/// `(certificate_pem, key_pem)` of the usual test key (2048 bits).
pub fn generate() -> (String, String) {
    generate_seeded(1)
}

/// `(certificate_pem, key_pem)` of a 2048-bit key made from `seed`: another
/// seed, another key.
pub fn generate_seeded(seed: u64) -> (String, String) {
    let key = PrivateKey::new(&mut StdRng::seed_from_u64(seed), 2048).expect("RSA key generation");
    let key_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .expect("PKCS#8 encoding")
        .to_string();
    let spki = SubjectPublicKeyInfoOwned::from_key(key.as_public_key()).expect("public key info");
    (certificate(key, spki), key_pem)
}

/// A certificate carrying `spki` (any key type), signed by the RSA key in
/// `key_pem`: to test certificates whose key is not what the gateway expects.
pub fn self_signed(key_pem: &str, spki: SubjectPublicKeyInfoOwned) -> String {
    let key = PrivateKey::from_pkcs8_pem(key_pem).expect("PKCS#8 RSA key");
    certificate(key, spki)
}

fn certificate(signer: PrivateKey, spki: SubjectPublicKeyInfoOwned) -> String {
    let time = |secs| {
        Time::GeneralTime(
            GeneralizedTime::from_unix_duration(Duration::from_secs(secs)).expect("valid time"),
        )
    };
    let subject = Name::from_str("CN=presence-gateway test").expect("name");
    let builder = CertificateBuilder::new(
        SelfSigned(subject),
        SerialNumber::from(1u32),
        Validity::new(time(NOT_BEFORE_SECS), time(NOT_AFTER_SECS)),
        spki,
    )
    .expect("certificate builder");
    let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(signer);
    builder
        .build::<_, rsa::pkcs1v15::Signature>(&signer)
        .expect("signed certificate")
        .to_pem(LineEnding::LF)
        .expect("PEM encoding")
}

/// Issuer = subject, no extensions: the plainest self-signed certificate, like
/// `openssl req -x509` makes for Graph's `encryptionCertificate`.
struct SelfSigned(Name);

impl BuilderProfile for SelfSigned {
    fn get_issuer(&self, subject: &Name) -> Name {
        subject.clone()
    }

    fn get_subject(&self) -> Name {
        self.0.clone()
    }

    fn build_extensions(
        &self,
        _spk: SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: SubjectPublicKeyInfoRef<'_>,
        _tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        Ok(Vec::new())
    }
}
