//! The precedence rule of DESIGN §9: which identity decides a person's
//! presence.
//!
//! Pure: identity records in, derived fields out. An identity with an
//! active call (connected or held) makes the person `busy` / `in_a_call`
//! whatever the others say; otherwise the availability that ranks highest
//! wins, with that record's activity and status text, ties going to the
//! most recently observed (and then to the first in the mapping's order).

use std::sync::Arc;

use crate::presence::{Availability, CallState, Decider, Presence, PresenceRecord};

/// How strongly an availability claims the person: `do_not_disturb` >
/// `busy` > `busy_idle` > `available` > `available_idle` >
/// `be_right_back` > `away` > `offline` > `unknown`.
pub const fn rank(availability: Availability) -> u8 {
    match availability {
        Availability::DoNotDisturb => 8,
        Availability::Busy => 7,
        Availability::BusyIdle => 6,
        Availability::Available => 5,
        Availability::AvailableIdle => 4,
        Availability::BeRightBack => 3,
        Availability::Away => 2,
        Availability::Offline => 1,
        Availability::Unknown => 0,
    }
}

/// Whether a record has a call in progress (ringing is not one yet).
pub fn in_call(presence: &Presence) -> bool {
    presence.calls.as_ref().is_some_and(|calls| {
        calls
            .active
            .iter()
            .any(|(_, state)| matches!(state, CallState::Connected | CallState::Held))
    })
}

/// One identity's record, as the rule reads it.
#[derive(Clone, Debug)]
pub struct IdentityRecord {
    pub record: PresenceRecord,
    pub in_call: bool,
}

/// What the rule decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    pub availability: Availability,
    pub activity: Option<Arc<str>>,
    pub status_text: Option<Arc<str>>,
    pub observed_at: Option<crate::presence::Millis>,
    pub decided_by: Option<Decider>,
}

/// The activity a call gives a person.
const IN_A_CALL: &str = "in_a_call";

/// Applies the rule to the identities' records (in the mapping's order).
pub fn derive(identities: &[IdentityRecord]) -> Derived {
    // In a call, the availability no longer counts: the latest call wins.
    let key = |i: &IdentityRecord| {
        let rank = if i.in_call {
            0
        } else {
            rank(i.record.availability)
        };
        (i.in_call, rank, i.record.observed_at)
    };
    let mut winner: Option<&IdentityRecord> = None;
    for identity in identities {
        // Strictly greater: among equals the first keeps it.
        if winner.is_none_or(|w| key(identity) > key(w)) {
            winner = Some(identity);
        }
    }
    let Some(w) = winner else {
        return Derived {
            availability: Availability::Unknown,
            activity: None,
            status_text: None,
            observed_at: None,
            decided_by: None,
        };
    };
    let (availability, activity) = if w.in_call {
        (Availability::Busy, Some(Arc::from(IN_A_CALL)))
    } else {
        (w.record.availability, w.record.activity.clone())
    };
    Derived {
        availability,
        activity,
        status_text: w.record.status_text.clone(),
        observed_at: Some(w.record.observed_at),
        decided_by: Some(Decider {
            source: Arc::clone(&w.record.source),
            principal: Arc::clone(&w.record.principal),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Millis;

    fn identity(
        source: &str,
        availability: Availability,
        at: i64,
        in_call: bool,
    ) -> IdentityRecord {
        IdentityRecord {
            record: PresenceRecord {
                source: Arc::from(source),
                principal: Arc::from("p"),
                availability,
                activity: Some(Arc::from(format!("{source}-activity"))),
                status_text: Some(Arc::from(format!("{source}-text"))),
                raw_status: None,
                observed_at: Millis(at),
                received_at: Millis(at),
                seq: 1,
            },
            in_call,
        }
    }

    /// The order DESIGN §9 gives, highest first.
    const ORDER: [Availability; 9] = [
        Availability::DoNotDisturb,
        Availability::Busy,
        Availability::BusyIdle,
        Availability::Available,
        Availability::AvailableIdle,
        Availability::BeRightBack,
        Availability::Away,
        Availability::Offline,
        Availability::Unknown,
    ];

    /// Every ordered pair of availabilities, in both identity orders and
    /// with either one observed later: the higher rank wins with its own
    /// activity and text; equal ranks go to the later observation.
    #[test]
    fn every_pair_of_availabilities_follows_the_precedence() {
        assert_eq!(ORDER.len(), Availability::ALL.len());
        for (i, &a) in ORDER.iter().enumerate() {
            for (j, &b) in ORDER.iter().enumerate() {
                for (at_a, at_b) in [(10, 20), (20, 10), (15, 15)] {
                    let records = [identity("a", a, at_a, false), identity("b", b, at_b, false)];
                    for order in [[0, 1], [1, 0]] {
                        let list = [records[order[0]].clone(), records[order[1]].clone()];
                        let derived = derive(&list);
                        let expect = if i < j {
                            "a"
                        } else if j < i {
                            "b"
                        } else if at_a != at_b {
                            if at_a > at_b { "a" } else { "b" }
                        } else {
                            // Same rank, same time: the first listed.
                            if order[0] == 0 { "a" } else { "b" }
                        };
                        let case = format!("{a} at {at_a} vs {b} at {at_b}, order {order:?}");
                        let decider = derived.decided_by.expect("decided");
                        assert_eq!(&*decider.source, expect, "{case}");
                        let won = if expect == "a" { a } else { b };
                        assert_eq!(derived.availability, won, "{case}");
                        assert_eq!(
                            derived.activity.as_deref(),
                            Some(format!("{expect}-activity").as_str()),
                            "{case}"
                        );
                        assert_eq!(
                            derived.status_text.as_deref(),
                            Some(format!("{expect}-text").as_str()),
                            "{case}"
                        );
                    }
                }
            }
        }
    }

    /// A call overrides every availability, do-not-disturb included, of
    /// either identity.
    #[test]
    fn an_identity_in_a_call_makes_the_person_busy_in_a_call() {
        for &other in &ORDER {
            for &calling in &ORDER {
                let list = [
                    identity("desk", calling, 1, true),
                    identity("teams", other, 99, false),
                ];
                for list in [list.clone(), [list[1].clone(), list[0].clone()]] {
                    let derived = derive(&list);
                    assert_eq!(
                        derived.availability,
                        Availability::Busy,
                        "{calling}/{other}"
                    );
                    assert_eq!(derived.activity.as_deref(), Some("in_a_call"));
                    assert_eq!(&*derived.decided_by.unwrap().source, "desk");
                    assert_eq!(derived.status_text.as_deref(), Some("desk-text"));
                    assert_eq!(derived.observed_at, Some(Millis(1)));
                }
            }
        }
        // Two identities in calls: the later observed one decides.
        let derived = derive(&[
            identity("a", Availability::Away, 5, true),
            identity("b", Availability::Offline, 6, true),
        ]);
        assert_eq!(&*derived.decided_by.unwrap().source, "b");
    }

    #[test]
    fn no_identity_record_is_unknown_decided_by_nobody() {
        let derived = derive(&[]);
        assert_eq!(derived.availability, Availability::Unknown);
        assert_eq!(derived.decided_by, None);
        assert_eq!(derived.observed_at, None);
        assert_eq!(derived.activity, None);
    }
}
