//! Microsoft Graph rich notifications (`includeResourceData`): the
//! encryption certificate and private key of a `graph` source, and the
//! decryption of one item's `encryptedContent`.
//!
//! Graph encrypts each notification's resource with a fresh symmetric key and
//! sends that key wrapped with the public key of the certificate given at
//! subscription time
//! (<https://learn.microsoft.com/en-us/graph/change-notifications-with-resource-data>):
//! `dataKey` is RSA-OAEP (SHA-1, MGF1 SHA-1) of the key, `dataSignature` is
//! HMAC-SHA256 under that key of the ciphertext bytes, and `data` is AES-CBC
//! with PKCS7 padding, the IV being the key's first 16 bytes.
//!
//! This module owns that cryptography and nothing else: it never parses the
//! JSON it decrypts, never logs, and never hands out a byte of `data` whose
//! signature has not been checked (in constant time) first. Its errors and
//! `Debug` output name what failed, never key material.

use std::fmt;

use aes::Aes256;
use base64::Engine;
use base64::engine::general_purpose::{GeneralPurpose, PAD_INDIFFERENT};
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockModeDecrypt, KeyIvInit};
use hmac::{Hmac, KeyInit, Mac};
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::{PrivateKey, PublicKey};
use sha1::Sha1;
use sha2::Sha256;
use x509_cert::Certificate;
use x509_cert::der::referenced::OwnedToRef;
use x509_cert::der::{Decode, Document};
use x509_cert::spki::ObjectIdentifier;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// Standard alphabet; padding optional, as other Graph clients accept it.
const BASE64: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, PAD_INDIFFERENT);

/// `rsaEncryption` (RFC 8017, A.1): the only key type Graph encrypts to.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Accepted modulus sizes, in bits: nothing weaker than 2048 bits, and
/// nothing larger than Graph accepts for an encryption certificate.
const KEY_BITS: std::ops::RangeInclusive<u32> = 2048..=4096;

/// Length of the symmetric key Graph wraps in `dataKey` (AES-256).
const SYMMETRIC_KEY_LEN: usize = 32;

/// The configured certificate and private key of a `graph` source, checked
/// to belong together. `Debug` prints the certificate id and key size only.
#[derive(Clone)]
pub struct RichKey {
    certificate_id: String,
    certificate_base64: String,
    key: PrivateKey,
}

/// Why a certificate and key cannot be used. Messages name what is wrong with
/// the files, never their contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RichKeyError {
    #[error("encryption certificate: {0}")]
    Certificate(String),
    #[error("encryption certificate: the public key is not RSA (algorithm {algorithm})")]
    NotRsa { algorithm: String },
    #[error("encryption key: {0}")]
    Key(String),
    #[error("RSA key of {bits} bits: expected 2048 to 4096 bits")]
    KeySize { bits: u32 },
    #[error(
        "the private key does not belong to the encryption certificate (their public keys differ)"
    )]
    Mismatch,
    #[error("encryption certificate id is empty")]
    EmptyId,
}

/// The field of `encryptedContent` that an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    DataKey,
    DataSignature,
    Data,
}

impl Field {
    /// The JSON name Graph uses.
    pub fn name(self) -> &'static str {
        match self {
            Field::DataKey => "dataKey",
            Field::DataSignature => "dataSignature",
            Field::Data => "data",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why one item's `encryptedContent` was not decrypted. Plain values: no
/// allocation, nothing from the input or the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("encryptedContent.{field} is not valid base64")]
    Base64 { field: Field },
    /// The private key cannot unwrap `dataKey`: it was encrypted to another
    /// certificate, or is damaged.
    #[error("encryptedContent.dataKey cannot be decrypted with the configured private key")]
    KeyUnwrap,
    #[error("encryptedContent.dataKey holds a {len}-byte key, expected 32 (AES-256)")]
    KeyLength { len: usize },
    /// `dataSignature` is not the HMAC of `data` under the unwrapped key.
    #[error("encryptedContent.dataSignature does not match data")]
    SignatureMismatch,
    #[error("encryptedContent.data is not AES-CBC with PKCS7 padding")]
    Cipher,
}

impl RichKey {
    /// Parses the PEM certificate (X.509 with an RSA public key) and the
    /// PKCS#8 PEM private key (`BEGIN PRIVATE KEY`, unencrypted), and checks
    /// that they match: the certificate's public key is the key's public half.
    /// `certificate_id` is the configured `encryptionCertificateId`.
    pub fn from_pem(
        certificate_pem: &str,
        key_pem: &str,
        certificate_id: &str,
    ) -> Result<RichKey, RichKeyError> {
        if certificate_id.trim().is_empty() {
            return Err(RichKeyError::EmptyId);
        }
        let certificate = parse_certificate(certificate_pem)?;
        let key = parse_private_key(key_pem)?;
        // Compare the public halves: the key pair proves nothing by itself,
        // and a certificate for another key would have Graph encrypt to a key
        // this gateway does not hold, so every notification would fail.
        if key.as_public_key() != &certificate.public_key {
            return Err(RichKeyError::Mismatch);
        }
        Ok(RichKey {
            certificate_id: certificate_id.to_owned(),
            certificate_base64: certificate.base64,
            key,
        })
    }

    /// The certificate as base64 of its DER: the subscription's
    /// `encryptionCertificate`.
    pub fn certificate_base64(&self) -> &str {
        &self.certificate_base64
    }

    /// The configured id: the subscription's `encryptionCertificateId`, which
    /// Graph echoes in each item's `encryptedContent`.
    pub fn certificate_id(&self) -> &str {
        &self.certificate_id
    }

    /// Decrypts one item's `encryptedContent` from its three base64 fields as
    /// sent, and returns the plaintext (the resource as JSON).
    ///
    /// `dataKey` is unwrapped with RSA-OAEP (SHA-1), blinded with the
    /// operating system's RNG; the HMAC-SHA256 of `data` under that key is
    /// compared with `dataSignature` in constant time before `data` is used
    /// for anything else; only then is it decrypted (AES-256-CBC, IV = the
    /// key's first 16 bytes, PKCS7 padding). The key is wiped after use.
    pub fn decrypt(
        &self,
        data_key: &str,
        data_signature: &str,
        data: &str,
    ) -> Result<Vec<u8>, DecryptError> {
        // Every field is decoded before the private-key operation, the
        // expensive step, so that malformed items cost nothing.
        let wrapped = decode(data_key, Field::DataKey)?;
        let signature = decode(data_signature, Field::DataSignature)?;
        let mut buffer = decode(data, Field::Data)?;

        let key = Zeroizing::new(
            self.key
                .oaep_decrypt::<Sha1>(&wrapped)
                .map_err(|_| DecryptError::KeyUnwrap)?,
        );
        if key.len() != SYMMETRIC_KEY_LEN {
            return Err(DecryptError::KeyLength { len: key.len() });
        }

        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(&buffer);
        mac.verify_slice(&signature)
            .map_err(|_| DecryptError::SignatureMismatch)?;

        let cipher = cbc::Decryptor::<Aes256>::new_from_slices(&key, &key[..16])
            .map_err(|_| DecryptError::Cipher)?;
        let plaintext_len = cipher
            .decrypt_padded::<Pkcs7>(&mut buffer)
            .map_err(|_| DecryptError::Cipher)?
            .len();
        buffer.truncate(plaintext_len);
        Ok(buffer)
    }
}

impl fmt::Debug for RichKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RichKey")
            .field("certificate_id", &self.certificate_id)
            .field("key_bits", &modulus_bits(self.key.as_public_key()))
            .field("private_key", &"<redacted>")
            .finish()
    }
}

fn decode(value: &str, field: Field) -> Result<Vec<u8>, DecryptError> {
    BASE64
        .decode(value)
        .map_err(|_| DecryptError::Base64 { field })
}

fn modulus_bits(key: &PublicKey) -> u32 {
    key.n().as_ref().bit_width()
}

/// A parsed encryption certificate.
struct ParsedCertificate {
    base64: String,
    public_key: PublicKey,
}

fn parse_certificate(pem: &str) -> Result<ParsedCertificate, RichKeyError> {
    let (label, der) = Document::from_pem(pem.trim()).map_err(|e| {
        RichKeyError::Certificate(format!("expected one PEM block (BEGIN CERTIFICATE): {e}"))
    })?;
    if label != "CERTIFICATE" {
        return Err(RichKeyError::Certificate(format!(
            "expected a PEM CERTIFICATE, found {label}"
        )));
    }
    let certificate = Certificate::from_der(der.as_bytes())
        .map_err(|e| RichKeyError::Certificate(format!("not an X.509 certificate: {e}")))?;
    let spki = certificate.tbs_certificate().subject_public_key_info();
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err(RichKeyError::NotRsa {
            algorithm: spki.algorithm.oid.to_string(),
        });
    }
    let public_key = PublicKey::try_from(spki.owned_to_ref())
        .map_err(|e| RichKeyError::Certificate(format!("malformed RSA public key: {e}")))?;
    check_size(&public_key)?;
    Ok(ParsedCertificate {
        base64: BASE64.encode(der.as_bytes()),
        public_key,
    })
}

fn parse_private_key(pem: &str) -> Result<PrivateKey, RichKeyError> {
    let pem = pem.trim();
    // The label alone, to explain the usual mistakes without decoding them.
    match x509_cert::der::pem::decode_label(pem.as_bytes()) {
        Ok("PRIVATE KEY") => {}
        Ok("RSA PRIVATE KEY") => {
            return Err(RichKeyError::Key(
                "PKCS#1 (BEGIN RSA PRIVATE KEY) is not supported; convert it to PKCS#8 with \
                 `openssl pkcs8 -topk8 -nocrypt`"
                    .into(),
            ));
        }
        Ok("ENCRYPTED PRIVATE KEY") => {
            return Err(RichKeyError::Key(
                "encrypted PKCS#8 is not supported; store it unencrypted (BEGIN PRIVATE KEY)"
                    .into(),
            ));
        }
        Ok(other) => {
            return Err(RichKeyError::Key(format!(
                "expected a PEM PRIVATE KEY (PKCS#8), found {other}"
            )));
        }
        Err(e) => {
            return Err(RichKeyError::Key(format!(
                "expected a PEM PRIVATE KEY (PKCS#8): {e}"
            )));
        }
    }
    // pkcs8 and der errors describe structure (tags, lengths, positions),
    // never the bytes they saw.
    let key = PrivateKey::from_pkcs8_pem(pem)
        .map_err(|e| RichKeyError::Key(format!("not a PKCS#8 RSA private key: {e}")))?;
    check_size(key.as_public_key())?;
    Ok(key)
}

fn check_size(key: &PublicKey) -> Result<(), RichKeyError> {
    let bits = modulus_bits(key);
    if KEY_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(RichKeyError::KeySize { bits })
    }
}

/// `encryptedContent` as Graph would send it (see [`encrypt_for_tests`]).
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct EncryptedContent {
    pub data_key: String,
    pub data_signature: String,
    pub data: String,
    /// Upper-case hex SHA-1 of the certificate's DER, like Graph's
    /// `encryptionCertificateThumbprint`.
    pub certificate_thumbprint: String,
}

impl EncryptedContent {
    /// The `encryptedContent` object of a notification item.
    pub fn to_json(&self, certificate_id: &str) -> serde_json::Value {
        serde_json::json!({
            "data": self.data,
            "dataSignature": self.data_signature,
            "dataKey": self.data_key,
            "encryptionCertificateId": certificate_id,
            "encryptionCertificateThumbprint": self.certificate_thumbprint,
        })
    }
}

/// Encrypts `plaintext` to `certificate_pem` the way Graph does: a random
/// 32-byte key, AES-256-CBC with PKCS7 padding and IV = the key's first 16
/// bytes, HMAC-SHA256 of the ciphertext under the key, RSA-OAEP (SHA-1) of the
/// key with the certificate's public key; all base64. For tests and benches
/// (the gateway itself never encrypts).
#[doc(hidden)]
pub fn encrypt_for_tests<R>(
    certificate_pem: &str,
    plaintext: &[u8],
    rng: &mut R,
) -> Result<EncryptedContent, RichKeyError>
where
    R: rsa::rand_core::CryptoRng + ?Sized,
{
    use cbc::cipher::BlockModeEncrypt;
    use sha1::Digest;

    let certificate = parse_certificate(certificate_pem)?;
    let mut key = Zeroizing::new([0u8; SYMMETRIC_KEY_LEN]);
    rng.fill_bytes(key.as_mut());

    let cipher = cbc::Encryptor::<Aes256>::new_from_slices(key.as_ref(), &key[..16])
        .unwrap_or_else(|_| unreachable!("32-byte key and 16-byte IV"));
    // PKCS7 always adds 1 to 16 bytes.
    let mut ciphertext = plaintext.to_vec();
    ciphertext.resize(plaintext.len() + 16, 0);
    let ciphertext_len = cipher
        .encrypt_padded::<Pkcs7>(&mut ciphertext, plaintext.len())
        .unwrap_or_else(|_| unreachable!("room for a whole padding block"))
        .len();
    ciphertext.truncate(ciphertext_len);

    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key.as_ref())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(&ciphertext);
    let signature = mac.finalize().into_bytes();

    let wrapped = certificate
        .public_key
        .oaep_encrypt_with_rng::<Sha1, _>(rng, key.as_ref())
        .map_err(|e| RichKeyError::Certificate(format!("cannot encrypt to its key: {e}")))?;

    let der = BASE64
        .decode(&certificate.base64)
        .unwrap_or_else(|_| unreachable!("encoded above"));
    Ok(EncryptedContent {
        data_key: BASE64.encode(wrapped),
        data_signature: BASE64.encode(signature),
        data: BASE64.encode(ciphertext),
        certificate_thumbprint: hex::encode_upper(Sha1::digest(&der)),
    })
}

#[cfg(test)]
#[path = "../../tests/common/graph_keys.rs"]
mod graph_keys;

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const PRESENCE: &str = r##"{"@odata.type":"#Microsoft.Graph.presence","id":"66825e03-7ef5-42da-9069-724602c31f6b","availability":"Busy","activity":"InACall"}"##;
    const CERT_ID: &str = "presence-gateway-1";

    /// The key pair most tests use, made once per test binary.
    fn pair() -> &'static (String, String) {
        static PAIR: OnceLock<(String, String)> = OnceLock::new();
        PAIR.get_or_init(graph_keys::generate)
    }

    /// A second, unrelated key pair.
    fn other_pair() -> &'static (String, String) {
        static PAIR: OnceLock<(String, String)> = OnceLock::new();
        PAIR.get_or_init(|| graph_keys::generate_seeded(2))
    }

    fn rich_key() -> RichKey {
        let (cert, key) = pair();
        RichKey::from_pem(cert, key, CERT_ID).expect("matching pair")
    }

    fn encrypt(plaintext: &[u8]) -> EncryptedContent {
        encrypt_for_tests(&pair().0, plaintext, &mut StdRng::seed_from_u64(7)).expect("encrypts")
    }

    fn decrypt(key: &RichKey, content: &EncryptedContent) -> Result<Vec<u8>, DecryptError> {
        key.decrypt(&content.data_key, &content.data_signature, &content.data)
    }

    /// `value` decoded, changed by `change`, encoded again.
    fn tampered(value: &str, change: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut bytes = BASE64.decode(value).expect("base64");
        change(&mut bytes);
        BASE64.encode(bytes)
    }

    #[test]
    fn decrypts_what_graph_encrypts() {
        let key = rich_key();
        let content = encrypt(PRESENCE.as_bytes());
        assert_eq!(decrypt(&key, &content).unwrap(), PRESENCE.as_bytes());
        let parsed: serde_json::Value = serde_json::from_slice(&decrypt(&key, &content).unwrap())
            .expect("the plaintext is JSON");
        assert_eq!(parsed["availability"], "Busy");
    }

    #[test]
    fn decrypts_an_item_encrypted_by_openssl() {
        let key = RichKey::from_pem(openssl::CERT, openssl::KEY, CERT_ID).expect("matching pair");
        let plaintext = key
            .decrypt(openssl::DATA_KEY, openssl::DATA_SIGNATURE, openssl::DATA)
            .expect("decrypts");
        assert_eq!(plaintext, PRESENCE.as_bytes());
    }

    #[test]
    fn decrypts_any_length_including_whole_blocks_and_empty() {
        let key = rich_key();
        for len in [0, 1, 15, 16, 17, 32, 1000] {
            let plaintext = vec![b'x'; len];
            assert_eq!(
                decrypt(&key, &encrypt(&plaintext)).unwrap(),
                plaintext,
                "{len}"
            );
        }
    }

    #[test]
    fn exposes_certificate_der_and_id() {
        let key = rich_key();
        assert_eq!(key.certificate_id(), CERT_ID);
        let der = BASE64.decode(key.certificate_base64()).expect("base64");
        let (_, from_pem) = Document::from_pem(pair().0.trim()).expect("pem");
        assert_eq!(der, from_pem.as_bytes());
        assert!(!key.certificate_base64().contains('\n'));
    }

    #[test]
    fn rejects_data_changed_by_one_byte() {
        let key = rich_key();
        let mut content = encrypt(PRESENCE.as_bytes());
        content.data = tampered(&content.data, |b| b[0] ^= 1);
        assert_eq!(
            decrypt(&key, &content),
            Err(DecryptError::SignatureMismatch)
        );
    }

    #[test]
    fn rejects_data_cut_or_extended() {
        let key = rich_key();
        let content = encrypt(PRESENCE.as_bytes());
        for change in [
            (|b: &mut Vec<u8>| b.truncate(b.len() - 16)) as fn(&mut Vec<u8>),
            |b| b.extend_from_slice(&[0; 16]),
        ] {
            let mut changed = content.clone();
            changed.data = tampered(&content.data, change);
            assert_eq!(
                decrypt(&key, &changed),
                Err(DecryptError::SignatureMismatch)
            );
        }
    }

    #[test]
    fn rejects_changed_or_shortened_signature() {
        let key = rich_key();
        let content = encrypt(PRESENCE.as_bytes());
        for change in [
            (|b: &mut Vec<u8>| b[31] ^= 0x80) as fn(&mut Vec<u8>),
            |b| b.truncate(16),
            |b| b.clear(),
            |b| b.push(0),
        ] {
            let mut changed = content.clone();
            changed.data_signature = tampered(&content.data_signature, change);
            assert_eq!(
                decrypt(&key, &changed),
                Err(DecryptError::SignatureMismatch)
            );
        }
    }

    #[test]
    fn rejects_a_signature_from_another_item() {
        let key = rich_key();
        let mut content = encrypt(PRESENCE.as_bytes());
        content.data_signature = encrypt(b"{}").data_signature;
        assert_eq!(
            decrypt(&key, &content),
            Err(DecryptError::SignatureMismatch)
        );
    }

    #[test]
    fn rejects_a_data_key_for_another_certificate() {
        let key = rich_key();
        let mut content = encrypt(PRESENCE.as_bytes());
        let for_other =
            encrypt_for_tests(&other_pair().0, b"{}", &mut StdRng::seed_from_u64(8)).unwrap();
        content.data_key = for_other.data_key;
        assert_eq!(decrypt(&key, &content), Err(DecryptError::KeyUnwrap));
    }

    #[test]
    fn rejects_a_damaged_data_key() {
        let key = rich_key();
        let content = encrypt(PRESENCE.as_bytes());
        for change in [
            (|b: &mut Vec<u8>| b[100] ^= 1) as fn(&mut Vec<u8>),
            |b| b.truncate(128),
            |b| b.clear(),
        ] {
            let mut changed = content.clone();
            changed.data_key = tampered(&content.data_key, change);
            assert_eq!(decrypt(&key, &changed), Err(DecryptError::KeyUnwrap));
        }
    }

    #[test]
    fn rejects_a_symmetric_key_that_is_not_32_bytes() {
        let key = rich_key();
        let mut content = encrypt(PRESENCE.as_bytes());
        let public = key.key.to_public_key();
        let short = public
            .oaep_encrypt_with_rng::<Sha1, _>(&mut StdRng::seed_from_u64(9), &[1; 16])
            .unwrap();
        content.data_key = BASE64.encode(short);
        assert_eq!(
            decrypt(&key, &content),
            Err(DecryptError::KeyLength { len: 16 })
        );
    }

    #[test]
    fn rejects_bad_padding_even_when_signed() {
        // A sender holding the key (only Graph) could sign bad ciphertext; it
        // is still refused, as a cipher error.
        let key = rich_key();
        let mut content = encrypt(PRESENCE.as_bytes());
        let symmetric = key
            .key
            .oaep_decrypt::<Sha1>(&BASE64.decode(&content.data_key).unwrap())
            .unwrap();
        let mut data = BASE64.decode(&content.data).unwrap();
        data.truncate(data.len() - 1); // not a whole number of blocks
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&symmetric).unwrap();
        mac.update(&data);
        content.data = BASE64.encode(&data);
        content.data_signature = BASE64.encode(mac.finalize().into_bytes());
        assert_eq!(decrypt(&key, &content), Err(DecryptError::Cipher));
    }

    #[test]
    fn rejects_bad_base64_in_each_field() {
        let key = rich_key();
        let good = encrypt(PRESENCE.as_bytes());
        for bad in ["not base64!", "Zm9v=YmFy", "Zm9v\n"] {
            let cases = [
                (
                    Field::DataKey,
                    bad,
                    good.data_signature.as_str(),
                    good.data.as_str(),
                ),
                (
                    Field::DataSignature,
                    good.data_key.as_str(),
                    bad,
                    good.data.as_str(),
                ),
                (
                    Field::Data,
                    good.data_key.as_str(),
                    good.data_signature.as_str(),
                    bad,
                ),
            ];
            for (field, data_key, signature, data) in cases {
                assert_eq!(
                    key.decrypt(data_key, signature, data),
                    Err(DecryptError::Base64 { field }),
                    "{field} = {bad:?}"
                );
            }
        }
    }

    #[test]
    fn accepts_base64_without_padding() {
        let key = rich_key();
        let content = encrypt(PRESENCE.as_bytes());
        let data_key = content.data_key.trim_end_matches('=');
        let signature = content.data_signature.trim_end_matches('=');
        let data = content.data.trim_end_matches('=');
        assert_eq!(
            key.decrypt(data_key, signature, data).unwrap(),
            PRESENCE.as_bytes()
        );
    }

    #[test]
    fn rejects_a_certificate_for_another_key() {
        let (cert, _) = pair();
        let (_, other_key) = other_pair();
        assert_eq!(
            RichKey::from_pem(cert, other_key, CERT_ID).unwrap_err(),
            RichKeyError::Mismatch
        );
    }

    #[test]
    fn rejects_an_empty_certificate_id() {
        let (cert, key) = pair();
        for id in ["", "  "] {
            assert_eq!(
                RichKey::from_pem(cert, key, id).unwrap_err(),
                RichKeyError::EmptyId
            );
        }
    }

    #[test]
    fn rejects_garbage_and_swapped_pem() {
        let (cert, key) = pair();
        let garbage = [
            "",
            "garbage",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ];
        for bad in garbage {
            assert!(
                matches!(
                    RichKey::from_pem(bad, key, CERT_ID),
                    Err(RichKeyError::Certificate(_))
                ),
                "certificate {bad:?}"
            );
        }
        for bad in garbage
            .iter()
            .copied()
            .chain(["-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
        {
            assert!(
                matches!(
                    RichKey::from_pem(cert, bad, CERT_ID),
                    Err(RichKeyError::Key(_))
                ),
                "key {bad:?}"
            );
        }
        assert!(matches!(
            RichKey::from_pem(key, cert, CERT_ID),
            Err(RichKeyError::Certificate(_))
        ));
    }

    #[test]
    fn explains_pkcs1_and_encrypted_keys() {
        let (cert, _) = pair();
        for (label, hint) in [
            ("RSA PRIVATE KEY", "PKCS#1"),
            ("ENCRYPTED PRIVATE KEY", "encrypted"),
        ] {
            let pem = format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
            let error = RichKey::from_pem(cert, &pem, CERT_ID).unwrap_err();
            assert!(error.to_string().contains(hint), "{error}");
        }
    }

    #[test]
    fn rejects_a_certificate_whose_key_is_not_rsa() {
        use x509_cert::der::asn1::BitString;
        use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

        let ed25519 = SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: ObjectIdentifier::new_unwrap("1.3.101.112"),
                parameters: None,
            },
            subject_public_key: BitString::from_bytes(&[7; 32]).unwrap(),
        };
        let (_, key) = pair();
        let cert = graph_keys::self_signed(key, ed25519);
        assert_eq!(
            RichKey::from_pem(&cert, key, CERT_ID).unwrap_err(),
            RichKeyError::NotRsa {
                algorithm: "1.3.101.112".into()
            }
        );
    }

    #[test]
    fn debug_and_errors_show_no_key_material() {
        let key = rich_key();
        let debug = format!("{key:?}");
        assert!(debug.contains(CERT_ID) && debug.contains("2048"), "{debug}");
        let (_, key_pem) = pair();
        // No line of the PEM body, nor the modulus or the exponent in any base.
        for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!debug.contains(&line[..16]), "{debug}");
        }
        assert!(
            !debug.contains("BoxedUint") && !debug.contains("primes"),
            "{debug}"
        );

        let broken = key_pem.replacen("MII", "MIJ", 1);
        let error = RichKey::from_pem(&pair().0, &broken, CERT_ID).unwrap_err();
        for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!error.to_string().contains(&line[..16]), "{error}");
        }
    }

    #[test]
    fn graph_json_names_every_field() {
        let content = encrypt(PRESENCE.as_bytes());
        let json = content.to_json(CERT_ID);
        for field in ["data", "dataSignature", "dataKey"] {
            assert!(
                json[field].as_str().is_some_and(|v| !v.is_empty()),
                "{field}"
            );
        }
        assert_eq!(json["encryptionCertificateId"], CERT_ID);
        assert_eq!(
            json["encryptionCertificateThumbprint"]
                .as_str()
                .unwrap()
                .len(),
            40
        );
    }

    #[test]
    fn rich_key_can_be_shared_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<RichKey>();
    }

    /// An item encrypted by OpenSSL 3 commands (not by this module), to a
    /// throwaway key made for this test and protecting nothing: `openssl req -x509 -newkey rsa:2048
    /// -nodes`, `openssl enc -aes-256-cbc -K <key> -iv <key[..16]>`, `openssl
    /// dgst -sha256 -mac HMAC` over the ciphertext, `openssl pkeyutl -encrypt
    /// -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1`.
    mod openssl {
        pub const CERT: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIDGzCCAgOgAwIBAgIUDZTbzuvh0/qHHA+kOk0C+yqZkg0wDQYJKoZIhvcNAQEL\n\
BQAwHDEaMBgGA1UEAwwRb3BlbnNzbCBncmFwaCBrYXQwIBcNMjYxMTI3MDgyMDI5\n\
WhgPMjA1MTA3MTkwODIwMjlaMBwxGjAYBgNVBAMMEW9wZW5zc2wgZ3JhcGgga2F0\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqvOOEQ+KfZn8x7uNj1E9\n\
MptvIc1p5HKmNmKkfc1uShc26cO6GIekGsvUb7KRN+z+nN0LrOjXC6Kbt45bAulg\n\
kvrXRPg0/jYgD9avz9gVi28UpCQZL0xNEDVtMTe0437rrkW/7FlhbuqaU6HGqo6h\n\
1K9Twwd8G6qZG3ryq2LYZq2Y9DXLUtsm7QyC1ehoJlRjNy7xe6jk9zCkyYGwzGhu\n\
WU/s+DfcNPF3M6gbX5VKTc1geIs4/RpxPQN/PltkT8ItL5cw5H3tlscnmQljc6Ja\n\
v3F1I3lnv9qFJ/hud8AV4a45/vbXvUVT2ix1GDHtsln/1SYa4CU7+JtSfq35oQJM\n\
fQIDAQABo1MwUTAdBgNVHQ4EFgQUV+ZS0cLsYTCNDxg2HATsiQxZF0cwHwYDVR0j\n\
BBgwFoAUV+ZS0cLsYTCNDxg2HATsiQxZF0cwDwYDVR0TAQH/BAUwAwEB/zANBgkq\n\
hkiG9w0BAQsFAAOCAQEALnk0YBgFdKmNd+WeettW9JsxQFFnTu/4ng4mU4o65fNm\n\
+EQY/Jv+aeu/5t+QIQCgLYg5Z+3W8GZHEe9Oy8OxorFK3qxwDk8c2ou7eMrl2F5k\n\
tymdbmnymCevaydQ/YOTckBaK4WRiz1b1a5/jLG5r7Brs56WbJQCjHEZLiAAKluN\n\
Pb6oz6vgtGM2kZ8cVGgmAJmiReYc3xyfA5gjfjR62pUOphl2LubUTvWDjnWgHETT\n\
m/dMILVaiFNmF1bdx3zsobQcxSSKPvbLpOq2djuzBGt8Zb+8v3h5aRxPQohxwLw+\n\
4GKO99R4TH3ayD7NoaIXJccA6p5ULLKCC2i/A11cpw==\n\
-----END CERTIFICATE-----\n";
        pub const KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCq844RD4p9mfzH\n\
u42PUT0ym28hzWnkcqY2YqR9zW5KFzbpw7oYh6Qay9RvspE37P6c3Qus6NcLopu3\n\
jlsC6WCS+tdE+DT+NiAP1q/P2BWLbxSkJBkvTE0QNW0xN7TjfuuuRb/sWWFu6ppT\n\
ocaqjqHUr1PDB3wbqpkbevKrYthmrZj0NctS2ybtDILV6GgmVGM3LvF7qOT3MKTJ\n\
gbDMaG5ZT+z4N9w08XczqBtflUpNzWB4izj9GnE9A38+W2RPwi0vlzDkfe2WxyeZ\n\
CWNzolq/cXUjeWe/2oUn+G53wBXhrjn+9te9RVPaLHUYMe2yWf/VJhrgJTv4m1J+\n\
rfmhAkx9AgMBAAECgf8CjaCvr5rLVIFyAcSE5v0DALi3QP/MWp63fIVw4xkN5B2x\n\
nFjf5sxfe/cowvp3U9aXzHkj7s7O9ERuLhuIOuUJLtQIQrvTLkcQE51BUEQvSWpf\n\
3AwLxurJJgMhInegOYFLoJHi5r4kYmuvaqwUdqN7p9drP3UimkuQ/2M3DfeW3EXn\n\
Qgd20RPyqnex1rSrc7WzXhKieUE26FIj8qsY3S9jIdrmC5bv8W67VHPIVp7zzWH5\n\
Be7PmzIGg4orJMpFgzL4boO0alODhNkojPpvkxzEhPVa3PJx5UhwCVRgWzm4+QhG\n\
OCtYK8Xd0KiixOMyctdJ6arcpfrxwGmRxMeIZsECgYEA6QVVdmJCs560XMmcLcGH\n\
skt33weSe5C+bYmLXFm7AdGISn7RoNi2Rx2CLv3OgnXxSTHeg8vhrjZJJOBpNbjI\n\
ZofhOu/zFjtTBhGF2Fe2nUAH9NgvM6Ngd1UJLeiXz4rx3IJW6fA3vTluNPHuFfWr\n\
aokRzssQddt3pVqGFrazjhECgYEAu89DX6wlY47CPSr+N9w1QEzxkFdgxSxST5w+\n\
NdzRqnpopFiv4fGsRds5G/2UIqfVaUsBzBzhsF0mPG8z9zfiJFoHta5pQoFjxOrU\n\
+kmbtlUdUZJRjcSMRkdlPIyNwwaB8lwEMmOPlB7KWRlf0iBFovI6reBuHHX8Cdz0\n\
9h03m60CgYEAkeU2CiYhjybZ1JKih395f6eCyRCLpXQN1rVcnRjNXqkbRVE73RJy\n\
pfoSzWs6BjLkPKjNogVgKtxwVXdwSCOGzbNb0LP1pkDEjbMg80CP5Mr3cFR+0T0E\n\
pBKI6caMbnSXVDIDSvuNWpt/pgSnxfYIOm7RyIEZsEEWG2CfPc9sgpECgYEAnMP0\n\
yPc4flG7cLNiX94/1NxlBsboz6yfSDRy+SLJIDPtBMHCjibcVbMXiHWyIPtW9/zU\n\
EzxIZp5aPDfWeJT8/rrnlI9w7UJztPsPq5uljhydzGkGCf/11vPhXRk1e4UDEvob\n\
xrO0NT8+SAEWKp8lgU4QDPM49ijFqLX3AziAIkECgYBgS41kg4Pagk44SIuiqX0U\n\
xiwyyI9ueuGzBIeVzcIY1rjmM/PUXcqQkZ6N9gt0uqQRnxZjLZG+xBHe45Re0Fbx\n\
IWl8j/+RTg7FQ/DcG7tKsCZWzyFCqBdGlGVWZd2FvCCJTtLGaLMAq3J2IzzRAuBH\n\
zd2YjsKfZ3O6aVu8UjjUCg==\n\
-----END PRIVATE KEY-----\n";
        pub const DATA_KEY: &str = concat!(
            "l4DxQVZuvuDz7w91SzBXgM9KMrTA90ZAhztuHi41ZUDGfC96JPyGSS9metsFTO+5FTy+Id/N4iKYSLdA",
            "C5ujk83vGHBV05kXatQJnqKZ87KWfGiDHerSCSNTViRBg45atMB/yFiXSxDNLo2rfuGnd4aG10IzLzit",
            "JMdlLNQmKpxe7WjHSbvXzThTIT7leGuV+pfBKVYebi9gZm0SFE+e7Igz39byPjvc3vU38EmjzkayrTzJ",
            "BoV7Q6Ju9eTQrc6GblRybGsnx2Qu+CCWKrGjADhgVQhqgdwM+n8kGCRINPm2RwerZZXWfQv6LnoVvLnW",
            "CvqUxLtjyXtfoMnJg1/YAQ==",
        );
        pub const DATA_SIGNATURE: &str = "V+q9oIWH0FqRKrQskpin8x3/PXSWg0QUfJCKXeRGloM=";
        pub const DATA: &str = concat!(
            "54pmrO+CxNUZzPfS0MHMJbMdbupiWsPxUrjRVXCCxKXSaSk8qrKCU/jl//m0jck4APHiG1e+UNl448NP",
            "Y1BUAPafFN0Gt9UUJNJ+XvUHuid+1U1UEoW6X6M4FOv2GuweJ6Xvwo2v4uZxyrpvMkJGlPy7G5Ni/pWb",
            "x9wAbTjuK4jhpBFDBRfpyWN2Zzq9Wv6P",
        );
    }
}
