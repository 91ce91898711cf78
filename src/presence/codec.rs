//! The binary form of persisted state: one framed entry per record write,
//! remembered event id, upstream value or sequence position.
//!
//! Used by the journal and snapshots of `data_dir` (and as the record value
//! of the Redis backend). Each frame is `len: u32 LE`, `crc32(payload): u32
//! LE`, then `payload` = a tag byte and the entry's fields; strings are a
//! varint length and UTF-8 bytes. A frame that is cut short or whose CRC does
//! not match ends a file's readable part: everything before it is good.
//!
//! This module only converts; it never touches files or the store.

use std::borrow::Cow;
use std::sync::Arc;

use super::model::{Availability, CallState, Calls, Millis, Presence};

/// Version of the entry format; files of another version are refused.
pub const FORMAT_VERSION: u32 = 1;

/// Largest frame a reader accepts: a record is a few hundred bytes, an
/// upstream value a few KiB. A larger length is corruption, not data.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A record's state as written: everything [`Presence`] holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordEntry<'a> {
    pub source: &'a str,
    pub principal: &'a str,
    /// This write is a change with a new `seq` (kept in the history), not a
    /// silent refresh.
    pub change: bool,
    pub presence: Cow<'a, Presence>,
}

/// One persisted fact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    /// The current state of one record after a write.
    Record(RecordEntry<'a>),
    /// A provider event id seen at `at` (for the dedup window).
    EventId {
        source: &'a str,
        id: &'a str,
        at: Millis,
    },
    /// An upstream value (subscription, refresh token); `None` deletes.
    Meta {
        key: &'a str,
        value: Option<&'a str>,
    },
    /// The last `seq` handed out (snapshots write it; history may be empty).
    Seq(u64),
    /// A person's derived record (DESIGN §9) as JSON; `change`: a person
    /// event (kept in the history); `present: false`: the person's final
    /// record, after which the person is forgotten.
    Person {
        id: &'a str,
        seq: u64,
        change: bool,
        present: bool,
        json: &'a str,
    },
}

const TAG_RECORD: u8 = 1;
const TAG_EVENT_ID: u8 = 2;
const TAG_META: u8 = 3;
const TAG_SEQ: u8 = 4;
const TAG_PERSON: u8 = 5;

/// Why bytes could not be read as an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("entry is cut short")]
    Truncated,
    #[error("entry checksum does not match")]
    Checksum,
    #[error("entry is malformed")]
    Malformed,
}

/// Appends one framed entry to `out`.
pub fn encode(entry: &Entry<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    match entry {
        Entry::Record(r) => {
            out.push(TAG_RECORD);
            put_str(out, r.source);
            put_str(out, r.principal);
            encode_presence(&r.presence, r.change, out);
        }
        Entry::EventId { source, id, at } => {
            out.push(TAG_EVENT_ID);
            put_str(out, source);
            put_str(out, id);
            put_i64(out, at.0);
        }
        Entry::Meta { key, value } => {
            out.push(TAG_META);
            put_str(out, key);
            match value {
                Some(v) => {
                    out.push(1);
                    put_str(out, v);
                }
                None => out.push(0),
            }
        }
        Entry::Seq(seq) => {
            out.push(TAG_SEQ);
            put_varint(out, *seq);
        }
        Entry::Person {
            id,
            seq,
            change,
            present,
            json,
        } => {
            out.push(TAG_PERSON);
            put_str(out, id);
            put_varint(out, *seq);
            out.push(u8::from(*change) | (u8::from(*present) << 1));
            put_str(out, json);
        }
    }
    let payload = &out[start + 8..];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The record fields without source and principal (also the Redis value).
pub fn encode_presence(p: &Presence, change: bool, out: &mut Vec<u8>) {
    let flags = u8::from(change) | (u8::from(p.reported) << 1);
    out.push(flags);
    put_varint(out, p.seq);
    out.push(p.availability as u8);
    put_opt(out, p.activity.as_deref());
    put_opt(out, p.status_text.as_deref());
    put_opt(out, p.raw_status.as_deref());
    put_i64(out, p.observed_at.0);
    put_i64(out, p.received_at.0);
    match &p.calls {
        None => out.push(0),
        Some(calls) => {
            out.push(1);
            put_varint(out, calls.active.len() as u64);
            for (id, state) in &calls.active {
                put_str(out, id);
                out.push(*state as u8);
            }
            put_opt(out, calls.previous.as_deref());
        }
    }
}

/// Reads the framed entry at the start of `bytes`; returns it and its
/// length in bytes.
pub fn decode(bytes: &[u8]) -> Result<(Entry<'_>, usize), DecodeError> {
    let header: [u8; 8] = bytes
        .get(..8)
        .and_then(|h| h.try_into().ok())
        .ok_or(DecodeError::Truncated)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_FRAME {
        return Err(DecodeError::Malformed);
    }
    let payload = bytes.get(8..8 + len).ok_or(DecodeError::Truncated)?;
    if crc32fast::hash(payload) != crc {
        return Err(DecodeError::Checksum);
    }
    let mut r = Reader(payload);
    let entry = match r.u8()? {
        TAG_RECORD => {
            let source = r.str()?;
            let principal = r.str()?;
            let (presence, change) = r.presence()?;
            Entry::Record(RecordEntry {
                source,
                principal,
                change,
                presence: Cow::Owned(presence),
            })
        }
        TAG_EVENT_ID => Entry::EventId {
            source: r.str()?,
            id: r.str()?,
            at: Millis(r.i64()?),
        },
        TAG_META => {
            let key = r.str()?;
            let value = match r.u8()? {
                0 => None,
                1 => Some(r.str()?),
                _ => return Err(DecodeError::Malformed),
            };
            Entry::Meta { key, value }
        }
        TAG_SEQ => Entry::Seq(r.varint()?),
        TAG_PERSON => {
            let id = r.str()?;
            let seq = r.varint()?;
            let flags = r.u8()?;
            if flags > 3 {
                return Err(DecodeError::Malformed);
            }
            Entry::Person {
                id,
                seq,
                change: flags & 1 == 1,
                present: flags & 2 == 2,
                json: r.str()?,
            }
        }
        _ => return Err(DecodeError::Malformed),
    };
    if !r.0.is_empty() {
        return Err(DecodeError::Malformed);
    }
    Ok((entry, 8 + len))
}

/// Reads what [`encode_presence`] wrote; returns the presence and whether it
/// was a change.
pub fn decode_presence(bytes: &[u8]) -> Result<(Presence, bool), DecodeError> {
    let mut r = Reader(bytes);
    let out = r.presence()?;
    if !r.0.is_empty() {
        return Err(DecodeError::Malformed);
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_i64(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        let bytes: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| DecodeError::Malformed)?;
        Ok(i64::from_le_bytes(bytes))
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError::Malformed)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = usize::try_from(self.varint()?).map_err(|_| DecodeError::Malformed)?;
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::Malformed)
    }

    fn opt(&mut self) -> Result<Option<Arc<str>>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(Arc::from(self.str()?))),
            _ => Err(DecodeError::Malformed),
        }
    }

    fn presence(&mut self) -> Result<(Presence, bool), DecodeError> {
        let flags = self.u8()?;
        if flags > 3 {
            return Err(DecodeError::Malformed);
        }
        let seq = self.varint()?;
        let availability = *Availability::ALL
            .get(usize::from(self.u8()?))
            .ok_or(DecodeError::Malformed)?;
        let activity = self.opt()?;
        let status_text = self.opt()?;
        let raw_status = self.opt()?;
        let observed_at = Millis(self.i64()?);
        let received_at = Millis(self.i64()?);
        let calls = match self.u8()? {
            0 => None,
            1 => {
                let n = self.varint()?;
                // Each call takes at least two bytes: a bogus count cannot
                // make us reserve much.
                if n > self.0.len() as u64 / 2 {
                    return Err(DecodeError::Malformed);
                }
                let mut active = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let id: Box<str> = self.str()?.into();
                    let state = match self.u8()? {
                        0 => CallState::Ringing,
                        1 => CallState::Connected,
                        2 => CallState::Held,
                        _ => return Err(DecodeError::Malformed),
                    };
                    active.push((id, state));
                }
                let previous = self.opt()?;
                Some(Box::new(Calls { active, previous }))
            }
            _ => return Err(DecodeError::Malformed),
        };
        Ok((
            Presence {
                availability,
                activity,
                status_text,
                raw_status,
                observed_at,
                received_at,
                seq,
                calls,
                reported: flags & 2 != 0,
                rev: 0,
            },
            flags & 1 != 0,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn presence() -> Presence {
        Presence {
            availability: Availability::Busy,
            activity: Some(Arc::from("in_a_call")),
            status_text: Some(Arc::from("On a call — back soon")),
            raw_status: None,
            observed_at: Millis(1_764_000_930_123),
            received_at: Millis(-5),
            seq: 300,
            calls: Some(Box::new(Calls {
                active: vec![
                    ("c1".into(), CallState::Connected),
                    ("c2".into(), CallState::Held),
                ],
                previous: Some(Arc::from("presenting")),
            })),
            reported: true,
            rev: 0,
        }
    }

    #[test]
    fn every_entry_kind_round_trips() {
        let entries = [
            Entry::Record(RecordEntry {
                source: "mitel",
                principal: "2f1c9a1e",
                change: true,
                presence: Cow::Owned(presence()),
            }),
            Entry::Record(RecordEntry {
                source: "ns",
                principal: "1001@acme",
                change: false,
                presence: Cow::Owned(Presence {
                    calls: None,
                    reported: false,
                    ..presence()
                }),
            }),
            Entry::EventId {
                source: "mitel",
                id: "evt-1",
                at: Millis(42),
            },
            Entry::Meta {
                key: "sub/ns/presence",
                value: Some("{\"id\":\"x\"}"),
            },
            Entry::Meta {
                key: "sub/ns/call",
                value: None,
            },
            Entry::Seq(u64::MAX),
        ];
        let mut bytes = Vec::new();
        for e in &entries {
            encode(e, &mut bytes);
        }
        let mut at = 0;
        for e in &entries {
            let (decoded, len) = decode(&bytes[at..]).unwrap();
            assert_eq!(&decoded, e);
            at += len;
        }
        assert_eq!(at, bytes.len());
        assert_eq!(decode(&bytes[at..]), Err(DecodeError::Truncated));
    }

    #[test]
    fn a_cut_or_flipped_frame_is_detected() {
        let mut bytes = Vec::new();
        encode(&Entry::Seq(7), &mut bytes);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]).err(), Some(DecodeError::Truncated));
        }
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(decode(&bytes).err(), Some(DecodeError::Checksum));
    }

    proptest! {
        /// Arbitrary bytes never panic the reader, whatever they claim.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
            let _ = decode_presence(&bytes);
        }

        /// A valid frame with any payload bytes changed is refused.
        #[test]
        fn a_changed_byte_is_refused(flip in 8usize..40, bit in 0u8..8) {
            let mut bytes = Vec::new();
            encode(&Entry::Record(RecordEntry {
                source: "s",
                principal: "p",
                change: true,
                presence: Cow::Owned(presence()),
            }), &mut bytes);
            let i = flip.min(bytes.len() - 1);
            bytes[i] ^= 1 << bit;
            prop_assert!(decode(&bytes).is_err());
        }
    }
}
