//! People: one presence per person across providers (DESIGN §9).
//!
//! The mapping (`[people]` file, [`crate::config::people`]) says which
//! `(source, principal)` identities are one person; with
//! `match_equal_principals`, a principal that is not mapped and has records
//! on two or more sources is a person too, whose id is the principal.
//!
//! Every applied presence change of an identity re-derives that one
//! person ([`derive`]): a lookup of the identity (one hash probe, also for
//! principals that belong to nobody), reads of the person's few identity
//! records, and a comparison with the person's current record. Only a
//! change of what a consumer sees (availability, activity, status text,
//! the deciding identity, the name) is committed, with its own `seq`, to the
//! same change log as presence changes, so person events stream, replay
//! and persist like presence events. The cost does not depend on the
//! number of people.
//!
//! A new mapping (reload) is swapped in whole and every person is
//! reconciled against it: people whose derived record changes get an event;
//! a person who is no longer mapped gets a final record (`unknown`, no
//! sources) and is forgotten.
//!
//! Locks: the mapping index is behind a read-write lock taken for reading
//! on every identity change and for writing only by a reload; person
//! records are behind one mutex, held while a person is derived and
//! committed so that two identities of one person changing at once are
//! decided one after the other, each on the other's result.

pub mod derive;
pub mod reload;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::config::people::Mapping;
use crate::presence::codec::Entry;
use crate::presence::journal::Journal;
use crate::presence::{Availability, Event, Millis, PersonRecord, Presence, Records};
use derive::{IdentityRecord, derive, in_call};

/// The mapping, indexed for the lookups an identity change makes.
#[derive(Default)]
struct Index {
    /// Principal → the `(source, person)` pairs it is an identity of.
    by_principal: HashMap<Arc<str>, Vec<(usize, u32)>>,
    people: Vec<Person>,
    /// Person id → position in `people`.
    by_id: HashMap<Arc<str>, u32>,
    /// Positions in `people`, ordered by id (for paging).
    sorted: Vec<u32>,
    match_equal: bool,
    version: u64,
}

struct Person {
    id: Arc<str>,
    name: Option<Arc<str>>,
    /// `(source index, principal)`, in the file's order.
    identities: Vec<(usize, Arc<str>)>,
}

impl Index {
    /// Indexes a mapping for these sources (an identity of a source that is
    /// not configured is left out: validation refuses such a file).
    fn build(mapping: &Mapping, records: &Records) -> Index {
        let mut index = Index {
            match_equal: mapping.match_equal_principals,
            version: mapping.version,
            ..Index::default()
        };
        for def in &mapping.people {
            let position = index.people.len() as u32;
            let identities: Vec<(usize, Arc<str>)> = def
                .identities
                .iter()
                .filter_map(|i| Some((records.source_index(&i.source)?, Arc::clone(&i.principal))))
                .collect();
            for (source, principal) in &identities {
                index
                    .by_principal
                    .entry(Arc::clone(principal))
                    .or_default()
                    .push((*source, position));
            }
            index.by_id.insert(Arc::clone(&def.id), position);
            index.people.push(Person {
                id: Arc::clone(&def.id),
                name: def.name.clone(),
                identities,
            });
        }
        let mut sorted: Vec<u32> = (0..index.people.len() as u32).collect();
        sorted.sort_unstable_by(|&a, &b| {
            index.people[a as usize]
                .id
                .cmp(&index.people[b as usize].id)
        });
        index.sorted = sorted;
        index
    }

    /// The explicit person an identity belongs to.
    fn explicit(&self, source: usize, principal: &str) -> Option<u32> {
        let pairs = self.by_principal.get(principal)?;
        pairs.iter().find(|(s, _)| *s == source).map(|(_, p)| *p)
    }
}

/// Whom an identity change concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// A mapped person (position in the index).
    Explicit(u32),
    /// An unmapped principal seen on several sources.
    Implicit(Arc<str>),
}

/// Person records and the people formed by equal principals.
#[derive(Default)]
struct State {
    records: HashMap<Arc<str>, Arc<PersonRecord>>,
    implicit: BTreeSet<Arc<str>>,
}

/// See the module doc.
#[derive(Default)]
pub struct People {
    /// Whether a mapping is in use (one load when not).
    enabled: AtomicBool,
    index: RwLock<Arc<Index>>,
    state: Mutex<State>,
    /// Person events committed (metrics).
    events: AtomicU64,
    /// Where the mapping came from and how its last reload went.
    status: Mutex<Option<MappingStatus>>,
}

/// The mapping's state for `GET /v1/people`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MappingStatus {
    pub version: u64,
    pub people: usize,
    pub file: String,
    pub loaded_at: Option<Millis>,
    pub match_equal_principals: bool,
    pub last_error: Option<ReloadError>,
}

/// Why the latest reload was refused (the previous mapping stays).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReloadError {
    pub message: String,
    pub at: Millis,
}

impl std::fmt::Debug for People {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("People")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

/// What a reconciliation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub people: usize,
    pub changed: usize,
    pub removed: usize,
}

/// A person's record change to commit: the new record (its `seq` is
/// assigned at commit) and whether the person stays (`false`: this is the
/// final record of a person no longer mapped).
#[derive(Clone, Debug)]
pub struct PersonChange {
    pub record: PersonRecord,
    pub stays: bool,
}

impl People {
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// The version of the mapping in use (0: none).
    pub fn version(&self) -> u64 {
        self.index.read().version
    }

    /// Number of people: mapped, and formed by equal principals.
    pub fn len(&self) -> usize {
        self.index.read().people.len() + self.state.lock().implicit.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mapping's state, once one is in use.
    pub fn status(&self) -> Option<MappingStatus> {
        let mut status = self.status.lock().clone()?;
        status.people = self.len();
        Some(status)
    }

    /// Records where the mapping came from and how its last reload went.
    pub fn set_status(&self, status: MappingStatus) {
        *self.status.lock() = Some(status);
    }

    /// Person events committed by this process.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Installs persisted person records (start-up, before any change).
    pub fn restore(&self, people: impl IntoIterator<Item = Arc<PersonRecord>>) {
        let mut state = self.state.lock();
        for record in people {
            state.records.insert(Arc::clone(&record.person), record);
        }
    }

    /// A person's current record, with the current records of their
    /// identities as `sources`; a mapped person without any identity
    /// record yet is `unknown` with `seq` 0.
    pub fn get(&self, id: &str, records: &Records) -> Option<PersonRecord> {
        let index = Arc::clone(&self.index.read());
        let stored = self.state.lock().records.get(id).cloned();
        let target = match index.by_id.get(id) {
            Some(&p) => Target::Explicit(p),
            None if stored.is_some() && index.match_equal => Target::Implicit(Arc::from(id)),
            None => return None,
        };
        let identities = identity_records(&index, &target, records);
        Some(match stored {
            Some(stored) => PersonRecord {
                sources: identities.into_iter().map(|i| i.record).collect(),
                ..(*stored).clone()
            },
            None => {
                let (id, name) = person_names(&index, &target);
                let mut record = record_of(id, name, identities, 0);
                record.seq = 0;
                record
            }
        })
    }

    /// Up to `limit` people with an id after `after`, in id order, keeping
    /// those whose availability `filter` accepts; and whether more follow.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        filter: impl Fn(Availability) -> bool,
        records: &Records,
    ) -> (Vec<PersonRecord>, Option<Arc<str>>) {
        let index = Arc::clone(&self.index.read());
        let implicit: Vec<Arc<str>> = {
            let state = self.state.lock();
            match after {
                Some(a) => state
                    .implicit
                    .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .cloned()
                    .collect(),
                None => state.implicit.iter().cloned().collect(),
            }
        };
        let start = after.map_or(0, |a| {
            index
                .sorted
                .partition_point(|&p| &*index.people[p as usize].id <= a)
        });
        let mut explicit = index.sorted[start..]
            .iter()
            .map(|&p| Arc::clone(&index.people[p as usize].id))
            .peekable();
        let mut implicit = implicit.into_iter().peekable();
        let mut items = Vec::new();
        let mut last: Option<Arc<str>> = None;
        loop {
            let next = match (explicit.peek(), implicit.peek()) {
                (Some(e), Some(i)) if i < e => implicit.next(),
                (Some(_), _) => explicit.next(),
                (None, Some(_)) => implicit.next(),
                (None, None) => break,
            };
            let Some(id) = next else { break };
            if items.len() == limit {
                return (items, last);
            }
            last = Some(Arc::clone(&id));
            // The filter is decided on the derived availability held (no
            // record: unknown) before anything is read or built, so a filter
            // that matches few people scans the rest cheaply.
            let held = self
                .state
                .lock()
                .records
                .get(&*id)
                .map_or(Availability::Unknown, |r| r.availability);
            if !filter(held) {
                continue;
            }
            if let Some(record) = self.get(&id, records) {
                items.push(record);
            }
        }
        (items, None)
    }

    /// The current records of the people asked for (`None`: everyone)
    /// whose `seq` is at most `at`, in `seq` order (stream snapshots).
    pub fn snapshot(&self, ids: Option<&[String]>, at: u64) -> Vec<Arc<PersonRecord>> {
        let state = self.state.lock();
        let mut out: Vec<Arc<PersonRecord>> = match ids {
            None => state
                .records
                .values()
                .filter(|r| r.seq <= at)
                .cloned()
                .collect(),
            Some(ids) => {
                let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                ids.sort_unstable();
                ids.dedup();
                ids.iter()
                    .filter_map(|id| state.records.get(*id))
                    .filter(|r| r.seq <= at)
                    .cloned()
                    .collect()
            }
        };
        // Sorted after the lock is let go: identity changes wait for the
        // copy only.
        drop(state);
        out.sort_unstable_by_key(|r| r.seq);
        out
    }

    /// After a change of `(source, principal)`'s record: re-derives the
    /// person it belongs to, if any, and commits what changed through
    /// `commit` (memory backend: the change log and the journal).
    pub fn touched(
        &self,
        source: usize,
        principal: &str,
        records: &Records,
        commit: &dyn Fn(PersonChange) -> Arc<PersonRecord>,
    ) {
        if !self.enabled() {
            return;
        }
        // A principal of nobody costs the lookup only (no shared counter
        // touched besides the lock's).
        let index = {
            let index = self.index.read();
            if index.explicit(source, principal).is_none() && !index.match_equal {
                return;
            }
            Arc::clone(&index)
        };
        let target = match index.explicit(source, principal) {
            Some(p) => Target::Explicit(p),
            None => Target::Implicit(Arc::from(principal)),
        };
        let mut state = self.state.lock();
        if let Target::Implicit(p) = &target
            && !state.implicit.contains(p)
        {
            // A person once a second source has this principal.
            let sources = identity_records(&index, &target, records).len();
            if sources < 2 || index.by_id.contains_key(p) {
                return;
            }
            state.implicit.insert(Arc::clone(p));
        }
        self.settle(&index, &target, records, &mut state, commit);
    }

    /// Derives one person and commits the record if a consumer would see a
    /// difference; returns whether it did.
    fn settle(
        &self,
        index: &Index,
        target: &Target,
        records: &Records,
        state: &mut State,
        commit: &dyn Fn(PersonChange) -> Arc<PersonRecord>,
    ) -> bool {
        let identities = identity_records(index, target, records);
        let (id, name) = person_names(index, target);
        let current = state.records.get(&*id);
        if identities.is_empty() && current.is_none() {
            // Nothing known of this person yet: nothing to say.
            return false;
        }
        let record = record_of(Arc::clone(&id), name, identities, 0);
        if current.is_some_and(|c| c.same_derived(&record)) {
            return false;
        }
        let committed = commit(PersonChange {
            record,
            stays: true,
        });
        self.events.fetch_add(1, Ordering::Relaxed);
        state.records.insert(id, committed);
        true
    }

    /// Swaps in a new mapping and brings every person in line with it:
    /// people whose derived record changes (identities moved, names
    /// changed) get an event; people no longer mapped get a final record
    /// (`unknown`, no sources) and are forgotten. Takes a while with many
    /// people: call it off the async workers.
    pub fn reconcile(
        &self,
        mapping: &Mapping,
        records: &Records,
        commit: &dyn Fn(PersonChange) -> Arc<PersonRecord>,
    ) -> Reconciled {
        let fresh = Arc::new(Index::build(mapping, records));
        let implicit = implicit_people(&fresh, records);
        {
            let mut state = self.state.lock();
            *self.index.write() = Arc::clone(&fresh);
            state.implicit = implicit.clone();
            self.enabled.store(true, Ordering::Release);
        }
        // One person at a time, each under the lock on its own: identity
        // changes go on meanwhile (decided with the new mapping already),
        // never waiting for the whole pass.
        let mut done = Reconciled::default();
        let targets = (0..fresh.people.len() as u32)
            .map(Target::Explicit)
            .chain(implicit.into_iter().map(Target::Implicit));
        for target in targets {
            done.people += 1;
            let mut state = self.state.lock();
            if self.settle(&fresh, &target, records, &mut state, commit) {
                done.changed += 1;
            }
        }
        let gone: Vec<Arc<str>> = {
            let state = self.state.lock();
            state
                .records
                .keys()
                .filter(|id| !fresh.by_id.contains_key(*id) && !state.implicit.contains(*id))
                .cloned()
                .collect()
        };
        for id in gone {
            let mut state = self.state.lock();
            let Some(name) = state.records.get(&id).map(|r| r.name.clone()) else {
                continue;
            };
            let record = record_of(Arc::clone(&id), name, Vec::new(), 0);
            commit(PersonChange {
                record,
                stays: false,
            });
            self.events.fetch_add(1, Ordering::Relaxed);
            state.records.remove(&id);
            done.removed += 1;
        }
        done
    }
}

impl People {}

/// The people formed by equal principals under `index`, as the records
/// are now: unmapped principals with records on two or more sources.
fn implicit_people(index: &Index, records: &Records) -> BTreeSet<Arc<str>> {
    if !index.match_equal {
        return BTreeSet::new();
    }
    let mut seen: HashMap<Arc<str>, usize> = HashMap::new();
    records.for_each(|source, principal, _| {
        let Some(s) = records.source_index(source) else {
            return;
        };
        if index.explicit(s, principal).is_none() {
            *seen.entry(Arc::from(principal)).or_default() += 1;
        }
    });
    seen.into_iter()
        .filter(|(p, n)| *n >= 2 && !index.by_id.contains_key(p))
        .map(|(p, _)| p)
        .collect()
}

/// An identity the rule looked at: `(source index, principal, revision of
/// its record)`, revision 0 when it has none.
pub type Revision = (usize, Arc<str>, u32);

/// A person's record derived from the records here, with what it was
/// derived from. The Redis backend commits it only while all of that is
/// still current in Redis (another replica may have changed an identity,
/// or committed the person, in between); see [`crate::presence::redis`].
#[derive(Clone, Debug)]
pub struct Derivation {
    /// The derived record (for a person no longer mapped: the final one).
    pub change: PersonChange,
    /// Whether a consumer would see a difference from the record held
    /// (only [`People::derive_touched`] returns derivations without one:
    /// the backend checks that no difference was missed for want of a
    /// change this replica has not seen yet).
    pub differs: bool,
    /// Every identity the rule looked at.
    pub identities: Vec<Revision>,
    /// The `seq` of the person's record held here, which the change
    /// replaces (0: none).
    pub replaces: u64,
}

/// Shared backends (Redis): the decisions of [`People::touched`] and
/// [`People::reconcile`], returned as [`Derivation`]s for the backend to
/// commit (instead of committed under the state lock), and the records the
/// backend committed or received, installed afterwards.
impl People {
    /// [`People::touched`] without the commit: the derivation of the person
    /// `(source, principal)` belongs to, also when it shows no difference
    /// (see [`Derivation::differs`]); `None` when the identity is nobody's
    /// or nothing is known of the person.
    pub fn derive_touched(
        &self,
        source: usize,
        principal: &str,
        records: &Records,
    ) -> Option<Derivation> {
        if !self.enabled() {
            return None;
        }
        let index = Arc::clone(&self.index.read());
        let target = match index.explicit(source, principal) {
            Some(p) => Target::Explicit(p),
            None if index.match_equal => Target::Implicit(Arc::from(principal)),
            None => return None,
        };
        let mut state = self.state.lock();
        if let Target::Implicit(p) = &target
            && !state.implicit.contains(p)
        {
            let sources = identity_records(&index, &target, records).len();
            if sources < 2 || index.by_id.contains_key(p) {
                return None;
            }
            state.implicit.insert(Arc::clone(p));
        }
        derivation(&index, &target, records, &state, true)
    }

    /// The derivation of person `id` as the records are now (again, after
    /// a commit lost a race): the derived record when it differs from the
    /// one held; the final record when the person is no longer mapped but
    /// a record is held; otherwise `None`.
    pub fn derive_person(&self, id: &str, records: &Records) -> Option<Derivation> {
        let index = Arc::clone(&self.index.read());
        let state = self.state.lock();
        let target = match index.by_id.get(id) {
            Some(&p) => Target::Explicit(p),
            None if state.implicit.contains(id) => Target::Implicit(Arc::from(id)),
            None => return state.records.get(id).map(|r| farewell(r)),
        };
        derivation(&index, &target, records, &state, false)
    }

    /// [`People::reconcile`] without the commits: puts `mapping` in use and
    /// returns the derivations of every person whose record must change
    /// (final records for people no longer mapped), and how many people
    /// there are. Takes a while with many people: call it off the async
    /// workers.
    pub fn remap(&self, mapping: &Mapping, records: &Records) -> (Vec<Derivation>, usize) {
        let fresh = Arc::new(Index::build(mapping, records));
        let implicit = implicit_people(&fresh, records);
        {
            let mut state = self.state.lock();
            *self.index.write() = Arc::clone(&fresh);
            state.implicit = implicit.clone();
            self.enabled.store(true, Ordering::Release);
        }
        // One person at a time, each under the lock on its own (as in
        // `reconcile`).
        let targets = (0..fresh.people.len() as u32)
            .map(Target::Explicit)
            .chain(implicit.into_iter().map(Target::Implicit));
        let mut out = Vec::new();
        let mut people = 0;
        for target in targets {
            people += 1;
            let state = self.state.lock();
            out.extend(derivation(&fresh, &target, records, &state, false));
        }
        let state = self.state.lock();
        out.extend(
            state
                .records
                .iter()
                .filter(|(id, _)| !fresh.by_id.contains_key(*id) && !state.implicit.contains(*id))
                .map(|(_, r)| farewell(r)),
        );
        (out, people)
    }

    /// Installs a person record committed through a shared backend (here
    /// or by another replica) unless the record held is as new; a final
    /// record (`stays: false`) forgets the person. Returns whether it was
    /// installed.
    pub fn install(&self, record: Arc<PersonRecord>, stays: bool) -> bool {
        let index = Arc::clone(&self.index.read());
        let mut state = self.state.lock();
        if state
            .records
            .get(&record.person)
            .is_some_and(|held| held.seq >= record.seq)
        {
            return false;
        }
        let id = Arc::clone(&record.person);
        if !stays {
            state.records.remove(&id);
            state.implicit.remove(&id);
            return true;
        }
        if index.match_equal && !index.by_id.contains_key(&id) {
            // Formed by equal principals on the replica that derived it.
            state.implicit.insert(Arc::clone(&id));
        }
        state.records.insert(id, record);
        true
    }

    /// Forgets the record held of person `id` if its `seq` is below
    /// `below`: the shared backend holds none (another replica committed
    /// the person's final record).
    pub fn forget(&self, id: &str, below: u64) {
        let mut state = self.state.lock();
        if state.records.get(id).is_some_and(|held| held.seq < below) {
            state.records.remove(id);
        }
    }

    /// Counts a person event this process committed through a shared
    /// backend (see [`People::events`]).
    pub fn count_event(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }
}

/// The derivation of one person as the records are now, when a consumer
/// would see a difference from the record held (or also without one:
/// `always`).
fn derivation(
    index: &Index,
    target: &Target,
    records: &Records,
    state: &State,
    always: bool,
) -> Option<Derivation> {
    let (identities, revisions) = identity_records_and_revisions(index, target, records);
    let (id, name) = person_names(index, target);
    let current = state.records.get(&*id);
    if identities.is_empty() && current.is_none() {
        return None;
    }
    let record = record_of(id, name, identities, 0);
    let differs = !current.is_some_and(|c| c.same_derived(&record));
    if !differs && !always {
        return None;
    }
    Some(Derivation {
        change: PersonChange {
            record,
            stays: true,
        },
        differs,
        identities: revisions,
        replaces: current.map_or(0, |c| c.seq),
    })
}

/// The final record of a person no longer mapped: `unknown`, no sources.
fn farewell(held: &PersonRecord) -> Derivation {
    Derivation {
        change: PersonChange {
            record: record_of(Arc::clone(&held.person), held.name.clone(), Vec::new(), 0),
            stays: false,
        },
        differs: true,
        identities: Vec::new(),
        replaces: held.seq,
    }
}

/// [`identity_records`], and the revision of every identity looked at (0:
/// no record), read together so that the revisions are those of the
/// records the rule is given.
fn identity_records_and_revisions(
    index: &Index,
    target: &Target,
    records: &Records,
) -> (Vec<IdentityRecord>, Vec<Revision>) {
    let identities: Vec<(usize, Arc<str>)> = match target {
        Target::Explicit(p) => index.people[*p as usize].identities.clone(),
        Target::Implicit(principal) => (0..records.source_count())
            .filter(|&s| index.explicit(s, principal).is_none())
            .map(|s| (s, Arc::clone(principal)))
            .collect(),
    };
    let mut found = Vec::with_capacity(identities.len());
    let mut revisions = Vec::with_capacity(identities.len());
    for (source, principal) in identities {
        let presence = records.get_presence(source, &principal);
        revisions.push((
            source,
            Arc::clone(&principal),
            presence.as_ref().map_or(0, |p| p.rev),
        ));
        if let (Some(presence), Some(id)) = (presence, records.source_id(source)) {
            found.push(identity_record(id, &principal, presence));
        }
    }
    (found, revisions)
}

/// An identity's record as the rule reads it, sharing the mapping's copy of
/// the principal (no allocation for it).
fn identity_record(source: &Arc<str>, principal: &Arc<str>, presence: Presence) -> IdentityRecord {
    IdentityRecord {
        in_call: in_call(&presence),
        record: crate::presence::PresenceRecord {
            source: Arc::clone(source),
            principal: Arc::clone(principal),
            availability: presence.availability,
            activity: presence.activity,
            status_text: presence.status_text,
            raw_status: presence.raw_status,
            observed_at: presence.observed_at,
            received_at: presence.received_at,
            seq: presence.seq,
        },
    }
}

/// The records of a person's identities that exist, in the mapping's order.
fn identity_records(index: &Index, target: &Target, records: &Records) -> Vec<IdentityRecord> {
    let read = |source: usize, principal: &Arc<str>| {
        let presence = records.get_presence(source, principal)?;
        Some(identity_record(
            records.source_id(source)?,
            principal,
            presence,
        ))
    };
    match target {
        Target::Explicit(p) => index.people[*p as usize]
            .identities
            .iter()
            .filter_map(|(s, principal)| read(*s, principal))
            .collect(),
        Target::Implicit(principal) => (0..records.source_count())
            .filter(|&s| index.explicit(s, principal).is_none())
            .filter_map(|s| read(s, principal))
            .collect(),
    }
}

fn person_names(index: &Index, target: &Target) -> (Arc<str>, Option<Arc<str>>) {
    match target {
        Target::Explicit(p) => {
            let person = &index.people[*p as usize];
            (Arc::clone(&person.id), person.name.clone())
        }
        Target::Implicit(principal) => (Arc::clone(principal), None),
    }
}

/// The person record the rule gives for these identity records.
fn record_of(
    id: Arc<str>,
    name: Option<Arc<str>>,
    identities: Vec<IdentityRecord>,
    seq: u64,
) -> PersonRecord {
    let derived = derive(&identities);
    PersonRecord {
        person: id,
        name,
        availability: derived.availability,
        activity: derived.activity,
        status_text: derived.status_text,
        observed_at: derived.observed_at,
        seq,
        decided_by: derived.decided_by,
        sources: identities.into_iter().map(|i| i.record).collect(),
    }
}

/// Commits a person change to the memory backend: the next `seq` from the
/// change log and, in the same step (so the journal keeps `seq` order), the
/// journal entry when `data_dir` is set.
pub fn commit_local(
    records: &Records,
    journal: Option<&Journal>,
    change: PersonChange,
) -> Arc<PersonRecord> {
    let mut committed = None;
    records.changes().commit_event(|seq| {
        let record = Arc::new(PersonRecord {
            seq,
            ..change.record
        });
        if let Some(journal) = journal {
            let json = serde_json::to_string(&*record).unwrap_or_default();
            journal.append(&Entry::Person {
                id: &record.person,
                seq,
                change: true,
                present: change.stays,
                json: &json,
            });
        }
        committed = Some(Arc::clone(&record));
        Event::Person(record)
    });
    // `commit_event` always calls its closure.
    committed.unwrap_or_else(|| Arc::new(record_of(Arc::from(""), None, Vec::new(), 0)))
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::config::people::{Identity, PersonDef};
    use crate::presence::records::StoreLimits;
    use crate::presence::{PresenceUpdate, Store};

    fn limits() -> StoreLimits {
        StoreLimits {
            history: 100,
            dedup_window_ms: 0,
            dedup_capacity: 1,
            stream_buffer: 16,
            max_future_skew_ms: 300_000,
        }
    }

    fn store() -> Store {
        Store::new(&[Arc::from("a"), Arc::from("b"), Arc::from("c")], limits())
    }

    fn mapping(version: u64, people: &[(&str, &[(&str, &str)])], equal: bool) -> Mapping {
        Mapping {
            version,
            match_equal_principals: equal,
            people: people
                .iter()
                .map(|(id, identities)| PersonDef {
                    id: Arc::from(*id),
                    name: None,
                    identities: identities
                        .iter()
                        .map(|(s, p)| Identity {
                            source: Arc::from(*s),
                            principal: Arc::from(*p),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    async fn set(store: &Store, source: usize, principal: &str, a: Availability, at: i64) {
        let update = PresenceUpdate {
            principal: Cow::Owned(principal.to_owned()),
            availability: a,
            activity: None,
            status_text: None,
            raw_status: None,
            observed_at: Some(Millis(at)),
            event_id: None,
        };
        store
            .apply(source, &update, Millis(at))
            .await
            .expect("applied");
    }

    fn people_events(store: &Store) -> Vec<(String, Availability)> {
        store
            .changes()
            .since(0)
            .expect("history")
            .iter()
            .filter_map(|c| c.person().map(|p| (p.person.to_string(), p.availability)))
            .collect()
    }

    #[tokio::test]
    async fn only_the_touched_person_is_derived_and_only_changes_are_events() {
        let store = store();
        store.reconcile_people(&mapping(1, &[("ana", &[("a", "x"), ("b", "y")])], false));
        set(&store, 0, "x", Availability::Available, 1).await;
        set(&store, 1, "y", Availability::Away, 2).await;
        set(&store, 1, "y", Availability::Offline, 3).await;
        set(&store, 0, "other", Availability::Busy, 4).await;
        set(&store, 1, "y", Availability::DoNotDisturb, 5).await;
        assert_eq!(
            people_events(&store),
            [
                ("ana".to_owned(), Availability::Available),
                ("ana".to_owned(), Availability::DoNotDisturb)
            ]
        );
        let ana = store.people().get("ana", store.records()).unwrap();
        assert_eq!(ana.sources.len(), 2);
        assert_eq!(ana.sources[1].availability, Availability::DoNotDisturb);
    }

    #[tokio::test]
    async fn equal_principals_form_a_person_once_two_sources_have_them() {
        let store = store();
        store.reconcile_people(&mapping(1, &[("ana", &[("a", "x")])], true));
        set(&store, 0, "kim", Availability::Available, 1).await;
        assert!(store.people().get("kim", store.records()).is_none());
        set(&store, 1, "kim", Availability::Busy, 2).await;
        let kim = store.people().get("kim", store.records()).expect("kim");
        assert_eq!(kim.availability, Availability::Busy);
        set(&store, 2, "kim", Availability::DoNotDisturb, 3).await;
        let kim = store.people().get("kim", store.records()).expect("kim");
        assert_eq!(kim.sources.len(), 3);
        // Ana's mapped identity on `a` is hers alone.
        set(&store, 1, "x", Availability::Busy, 4).await;
        assert!(store.people().get("x", store.records()).is_none());
        assert_eq!(store.people().len(), 2);
    }

    #[tokio::test]
    async fn reconciling_moves_identities_and_ends_removed_people() {
        let store = store();
        store.reconcile_people(&mapping(
            1,
            &[("ana", &[("a", "x"), ("b", "y")]), ("bo", &[("c", "z")])],
            false,
        ));
        set(&store, 0, "x", Availability::Available, 1).await;
        set(&store, 1, "y", Availability::Busy, 2).await;
        set(&store, 2, "z", Availability::Away, 3).await;
        let before = store.changes().last_seq();
        let done = store.reconcile_people(&mapping(
            2,
            &[("ana", &[("a", "x")]), ("bo", &[("c", "z"), ("b", "y")])],
            false,
        ));
        assert_eq!((done.people, done.changed, done.removed), (2, 2, 0));
        // The same mapping again: nothing.
        let again = store.reconcile_people(&mapping(
            3,
            &[("ana", &[("a", "x")]), ("bo", &[("c", "z"), ("b", "y")])],
            false,
        ));
        assert_eq!(again.changed + again.removed, 0);
        let done = store.reconcile_people(&mapping(4, &[("ana", &[("a", "x")])], false));
        assert_eq!(done.removed, 1);
        let events: Vec<_> = store
            .changes()
            .since(before)
            .unwrap()
            .iter()
            .filter_map(|c| c.person().cloned())
            .collect();
        let summary: Vec<_> = events
            .iter()
            .map(|p| (&*p.person, p.availability, p.sources.len()))
            .collect();
        assert_eq!(
            summary,
            [
                ("ana", Availability::Available, 1),
                ("bo", Availability::Busy, 2),
                ("bo", Availability::Unknown, 0),
            ]
        );
        assert!(store.people().get("bo", store.records()).is_none());
        assert_eq!(store.people().version(), 4);
    }
}
