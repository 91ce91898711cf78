//! When to do what with a managed subscription: a pure function of its
//! state and the time, so every decision is testable without a clock.

/// What the manager does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Adopt a matching subscription, or create one.
    Create,
    /// Extend the subscription we have.
    Renew,
}

/// The next action and when (epoch ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub action: Action,
    pub at: i64,
}

/// Lifetime settings of a source's subscriptions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Requested lifetime of a subscription, ms.
    pub lifetime_ms: i64,
    /// Renew this long before expiry, ms (less than the lifetime).
    pub renew_before_ms: i64,
}

/// What the schedule needs to know about a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Situation {
    /// Whether we hold a subscription (created or adopted, not known gone).
    pub held: bool,
    /// Its expiry, when known (epoch ms).
    pub expires_at: Option<i64>,
    /// After a failure: the earliest time to try again (epoch ms).
    pub retry_at: Option<i64>,
}

/// The next step for a subscription in `situation` at `now`.
///
/// - Nothing held: create (or adopt), now or when the last failure allows.
/// - Held with a known expiry: renew `renew_before` ahead of it; if that
///   time has passed, now. A failed renewal waits for its retry time, but
///   never past the expiry itself while there is time left.
/// - Held without a known expiry (the provider did not say): renew one
///   lifetime minus the margin after now, so it is renewed periodically.
pub fn plan(situation: Situation, now: i64, timing: Timing) -> Plan {
    if !situation.held {
        return Plan {
            action: Action::Create,
            at: situation.retry_at.unwrap_or(now).max(now),
        };
    }
    let due = match situation.expires_at {
        Some(expires_at) => expires_at - timing.renew_before_ms,
        None => now + (timing.lifetime_ms - timing.renew_before_ms),
    };
    let at = match (situation.retry_at, situation.expires_at) {
        (Some(retry), Some(expires_at)) if expires_at > now => retry.min(expires_at).max(due),
        (Some(retry), _) => retry.max(due),
        (None, _) => due,
    };
    Plan {
        action: Action::Renew,
        at: at.max(now),
    }
}

/// Exponential backoff with jitter, honouring `Retry-After`.
///
/// The delay doubles per consecutive failure from `initial_ms` up to
/// `max_ms`, and is then spread uniformly over its upper half, so that many
/// gateways (or sources) failing together after an outage do not retry in
/// step. A `Retry-After` from the provider is used when it asks for longer.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub initial_ms: i64,
    pub max_ms: i64,
    failures: u32,
}

impl Backoff {
    pub fn new(initial_ms: i64, max_ms: i64) -> Self {
        Backoff {
            initial_ms: initial_ms.max(1),
            max_ms: max_ms.max(initial_ms.max(1)),
            failures: 0,
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The delay after one more failure; `jitter` is uniform in [0, 1).
    pub fn next_delay(&mut self, retry_after_ms: Option<i64>, jitter: f64) -> i64 {
        let exp = self
            .initial_ms
            .saturating_mul(1i64.checked_shl(self.failures.min(40)).unwrap_or(i64::MAX))
            .min(self.max_ms);
        self.failures = self.failures.saturating_add(1);
        let spread = exp / 2 + ((exp - exp / 2) as f64 * jitter.clamp(0.0, 1.0)) as i64;
        match retry_after_ms {
            Some(asked) => asked.clamp(spread, self.max_ms.max(asked.min(3_600_000))),
            None => spread,
        }
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A jitter value in [0, 1) from the process's random hasher keys.
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
    (n >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        lifetime_ms: 3_600_000,
        renew_before_ms: 600_000,
    };

    fn held(expires_at: Option<i64>, retry_at: Option<i64>) -> Situation {
        Situation {
            held: true,
            expires_at,
            retry_at,
        }
    }

    #[test]
    fn nothing_held_means_create_now_or_after_the_backoff() {
        let none = Situation {
            held: false,
            expires_at: None,
            retry_at: None,
        };
        assert_eq!(
            plan(none, 1_000, T),
            Plan {
                action: Action::Create,
                at: 1_000
            }
        );
        let waiting = Situation {
            retry_at: Some(5_000),
            ..none
        };
        assert_eq!(plan(waiting, 1_000, T).at, 5_000);
        assert_eq!(plan(waiting, 9_000, T).at, 9_000, "never in the past");
    }

    #[test]
    fn renewal_is_due_the_margin_before_expiry() {
        let p = plan(held(Some(10_000_000), None), 1_000, T);
        assert_eq!(
            p,
            Plan {
                action: Action::Renew,
                at: 9_400_000
            }
        );
        // Past due (the gateway was busy, or started late): now.
        assert_eq!(
            plan(held(Some(10_000_000), None), 9_500_000, T).at,
            9_500_000
        );
        // Unknown expiry: periodically.
        assert_eq!(plan(held(None, None), 1_000, T).at, 1_000 + 3_000_000);
    }

    #[test]
    fn failed_renewals_back_off_but_not_past_expiry() {
        // Retry later than due, still before expiry: the retry time.
        assert_eq!(
            plan(held(Some(10_000_000), Some(9_500_000)), 9_400_001, T).at,
            9_500_000
        );
        // A retry time past expiry is pulled in to the expiry.
        assert_eq!(
            plan(held(Some(10_000_000), Some(12_000_000)), 9_400_001, T).at,
            10_000_000
        );
        // Expired already: the backoff decides.
        assert_eq!(
            plan(held(Some(10_000_000), Some(12_000_000)), 10_500_000, T).at,
            12_000_000
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() {
        let mut b = Backoff::new(1_000, 60_000);
        assert_eq!(b.next_delay(None, 0.0), 500);
        assert_eq!(b.next_delay(None, 0.999_999), 2_000 - 1);
        assert_eq!(b.next_delay(None, 0.5), 3_000);
        for _ in 0..20 {
            b.next_delay(None, 0.5);
        }
        assert_eq!(b.next_delay(None, 0.0), 30_000, "capped at max, jittered");
        assert_eq!(b.failures(), 24);
        // Retry-After asks for more: granted (up to an hour).
        assert_eq!(b.next_delay(Some(120_000), 0.0), 120_000);
        assert_eq!(b.next_delay(Some(10_000_000), 0.0), 3_600_000);
        // Asking for less than the backoff does not shorten it.
        assert_eq!(b.next_delay(Some(1), 0.0), 30_000);
        b.reset();
        assert_eq!(b.next_delay(None, 0.0), 500);
    }

    #[test]
    fn jitter_is_in_range_and_varies() {
        let values: Vec<f64> = (0..100).map(|_| jitter()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        assert!(values.windows(2).any(|w| w[0] != w[1]));
    }
}
