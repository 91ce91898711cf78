//! Constant-time proofs that a request came from the provider.
//!
//! Verifiers see raw bytes and headers only: they never parse JSON and never
//! allocate per request. A successful check yields [`Verified`], the only way
//! a body reaches a provider's parser, so an unverified body cannot be parsed
//! by accident.

pub mod client_state;
pub mod correlation;
pub mod hmac_hex;
pub mod standard;

pub use correlation::CorrelationIds;
pub use hmac_hex::HmacHexVerifier;
pub use standard::StandardVerifier;

/// Why a request failed verification. Carries no data, so it cannot leak a
/// secret or an expected signature into a response or a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The proof header is absent or empty.
    #[error("missing")]
    Missing,
    /// The proof header is present but not in the expected format.
    #[error("malformed")]
    Malformed,
    /// Well-formed, but no configured key produces it.
    #[error("mismatch")]
    Mismatch,
    /// The proof is outside its validity window (timestamped schemes).
    #[error("expired")]
    Expired,
}

impl VerifyError {
    /// Stable label for metrics and `/v1/sources`.
    pub const fn as_str(self) -> &'static str {
        match self {
            VerifyError::Missing => "missing",
            VerifyError::Malformed => "malformed",
            VerifyError::Mismatch => "mismatch",
            VerifyError::Expired => "expired",
        }
    }
}

/// A request body that passed verification.
#[derive(Clone, Copy, Debug)]
pub struct Verified<'a>(&'a [u8]);

impl<'a> Verified<'a> {
    /// The verified bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Marks bytes as verified. Only verifiers (and tests) may do this.
    pub(crate) fn new(body: &'a [u8]) -> Self {
        Verified(body)
    }

    /// Marks a message from an authenticated transport (a TLS socket opened
    /// with the provider's token) as verified: the transport is the proof.
    pub(crate) fn from_authenticated_transport(body: &'a [u8]) -> Self {
        Verified(body)
    }

    /// Marks bytes as verified, for benchmarks and tests of parsers, which
    /// must be callable without a signature.
    #[doc(hidden)]
    pub fn assume_verified_for_tests(body: &'a [u8]) -> Self {
        Verified(body)
    }
}
