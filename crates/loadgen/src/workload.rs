//! A workload: unique tickets, repeats of earlier tickets (some under another Kafka key,
//! so on another partition), and malformed records, in a deterministic order.

use crate::tickets::{Ticket, ticket};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Unique,
    /// Repeats ticket `of` (same payload).
    Duplicate {
        of: usize,
    },
    /// A record ingest must dead-letter; the reason it should give.
    Malformed {
        reason: &'static str,
    },
}

#[derive(Debug, Clone)]
pub struct Record {
    pub kind: Kind,
    pub ticket: Option<Ticket>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl Record {
    /// A unique ticket, keyed by its id.
    pub fn of_ticket(t: Ticket) -> Self {
        Record { kind: Kind::Unique, key: Some(t.id.clone().into_bytes()), value: Some(t.to_json()), ticket: Some(t) }
    }
}

/// `n` unique tickets; those at the given positions carry a llm-sim marker
/// (`[[sim:NAME]]`) in their body, to choose which records fail and how.
pub fn marked_tickets(run: &str, n: usize, marked: &[(usize, &str)]) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let mut t = ticket(run, i);
            if let Some((_, marker)) = marked.iter().find(|(at, _)| *at == i) {
                t.body = format!("{} [[sim:{marker}]]", t.body);
            }
            Record::of_ticket(t)
        })
        .collect()
}

pub struct Spec {
    pub run: String,
    pub unique: usize,
    pub duplicates: usize,
    pub malformed: usize,
}

const MALFORMED: &[(&str, &[u8])] = &[
    ("invalid_json", b"{\"id\": \"broken"),
    ("missing_key_field", b"{\"subject\": \"no id here\", \"body\": \"hello\"}"),
    ("invalid_utf8", &[0x7b, 0xff, 0xfe, 0x7d]),
    ("not_an_object", b"[\"a\", \"list\"]"),
    ("empty_value", b""),
];

pub fn build(spec: &Spec) -> Vec<Record> {
    let mut records = marked_tickets(&spec.run, spec.unique, &[]);
    for d in 0..spec.duplicates.min(spec.unique * 4) {
        let of = (d * 7 + 3) % spec.unique.max(1);
        let t = ticket(&spec.run, of);
        // Every other repeat comes under another Kafka key, so most likely on another partition.
        let key = if d % 2 == 0 { t.id.clone().into_bytes() } else { format!("resend-{d}").into_bytes() };
        let original = records
            .iter()
            .position(|r| r.kind == Kind::Unique && r.ticket.as_ref().is_some_and(|o| o.id == t.id))
            .unwrap_or(0);
        let at = original + 1 + (d * 13 + 5) % (records.len() - original);
        records.insert(
            at,
            Record { kind: Kind::Duplicate { of }, key: Some(key), value: Some(t.to_json()), ticket: Some(t) },
        );
    }
    for m in 0..spec.malformed {
        let (reason, bytes) = MALFORMED[m % MALFORMED.len()];
        let at = ((m * 97 + 11) % (records.len() + 1)).min(records.len());
        let value = if reason == "empty_value" { None } else { Some(bytes.to_vec()) };
        records.insert(
            at,
            Record {
                kind: Kind::Malformed { reason },
                key: Some(format!("bad-{m}").into_bytes()),
                value,
                ticket: None,
            },
        );
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_duplicates_follow_their_originals() {
        let spec = Spec { run: "r".into(), unique: 50, duplicates: 20, malformed: 5 };
        let records = build(&spec);
        assert_eq!(records.len(), 75);
        assert_eq!(records.iter().filter(|r| r.kind == Kind::Unique).count(), 50);
        let malformed: Vec<_> = records
            .iter()
            .filter_map(|r| match r.kind {
                Kind::Malformed { reason } => Some(reason),
                _ => None,
            })
            .collect();
        assert_eq!(malformed.len(), 5);
        for (i, r) in records.iter().enumerate() {
            if let Kind::Duplicate { of } = r.kind {
                let original = records
                    .iter()
                    .position(|o| {
                        o.kind == Kind::Unique && o.ticket.as_ref().unwrap().id == r.ticket.as_ref().unwrap().id
                    })
                    .unwrap();
                assert!(original < i, "duplicate of {of} at {i} comes before its original at {original}");
            }
        }
    }
}
