//! Graph's `clientState`: the secret the gateway gave Graph when it created
//! a subscription, echoed in every notification item. Compared in constant
//! time (the length of the configured secret is not hidden: it is fixed and
//! Graph limits it to 128 characters anyway).

use std::fmt;

use subtle::ConstantTimeEq;

use super::VerifyError;

/// The configured client state of one source.
#[derive(Clone)]
pub struct ClientState(Box<[u8]>);

impl fmt::Debug for ClientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientState([redacted])")
    }
}

impl ClientState {
    pub fn new(secret: &[u8]) -> Self {
        ClientState(secret.into())
    }

    /// Checks one item's `clientState` (`None`: the item has none).
    pub fn check(&self, presented: Option<&str>) -> Result<(), VerifyError> {
        let presented = match presented {
            None | Some("") => return Err(VerifyError::Missing),
            Some(p) => p.as_bytes(),
        };
        if bool::from(presented.ct_eq(&self.0)) {
            Ok(())
        } else {
            Err(VerifyError::Mismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_state_matches() {
        let state = ClientState::new(b"gw-client-state-6f3b2c");
        assert_eq!(state.check(Some("gw-client-state-6f3b2c")), Ok(()));
        assert_eq!(state.check(None), Err(VerifyError::Missing));
        assert_eq!(state.check(Some("")), Err(VerifyError::Missing));
        for wrong in [
            "gw-client-state-6f3b2d",
            "gw-client-state-6f3b2",
            "GW-CLIENT-STATE-6F3B2C",
            "gw-client-state-6f3b2c ",
        ] {
            assert_eq!(
                state.check(Some(wrong)),
                Err(VerifyError::Mismatch),
                "{wrong}"
            );
        }
        assert!(!format!("{state:?}").contains("6f3b"));
    }
}
