//! What a test wrote ([`Ledger`]) against what the broker holds ([`Verdict`]): lost, phantom,
//! duplicated and out-of-order events, and the assertions the suites make on them.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::broker::Consumed;

/// What a test wrote: committed and rolled-back event ids, and each aggregate's committed
/// sequence in commit order.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Committed event ids.
    pub committed: HashSet<Uuid>,
    /// Rolled-back event ids.
    pub rolled_back: HashSet<Uuid>,
}

/// What reading the topics back showed, compared with a [`Ledger`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Committed events never read.
    pub lost: usize,
    /// Events read that were never committed.
    pub phantom: usize,
    /// Records read minus distinct ids.
    pub duplicates: usize,
    /// Per aggregate, a lower `outbox-aggregate-seq` read after a higher one (duplicates of an
    /// already-seen sequence number are not inversions).
    pub inversions: usize,
    /// Records read.
    pub records: usize,
}

impl Verdict {
    /// Compares `records` with `ledger`.
    pub fn check(ledger: &Ledger, records: &[Consumed]) -> Self {
        let mut seen = HashSet::new();
        let mut v = Verdict {
            records: records.len(),
            ..Default::default()
        };
        // Order is judged in offset order per partition.
        let mut sorted: Vec<&Consumed> = records.iter().collect();
        sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
        let mut highest: HashMap<(String, String), i64> = HashMap::new();
        for r in sorted {
            let id = r.event_id();
            let first_sighting = seen.insert(id);
            if !first_sighting {
                v.duplicates += 1;
            }
            if !ledger.committed.contains(&id) {
                v.phantom += 1;
            }
            let seq = r
                .header("outbox-aggregate-seq")
                .and_then(|s| s.parse::<i64>().ok());
            if let (Some(key), Some(seq)) = (r.key.clone(), seq) {
                let high = highest.entry((r.topic.clone(), key)).or_insert(i64::MIN);
                if seq < *high {
                    // A redelivered record below the high mark is a duplicate; a first sighting
                    // below it means an earlier event arrived after a later one.
                    if first_sighting {
                        v.inversions += 1;
                    }
                } else {
                    *high = seq;
                }
            }
        }
        v.lost = ledger
            .committed
            .iter()
            .filter(|id| !seen.contains(id))
            .count();
        v
    }

    /// Asserts the safety properties: no committed event lost, no phantom event, no
    /// per-aggregate order inversion (duplicates are allowed).
    pub fn assert_safe(&self) {
        assert_eq!(self.lost, 0, "lost events: {self:?}");
        assert_eq!(self.phantom, 0, "phantom events: {self:?}");
        assert_eq!(
            self.inversions, 0,
            "per-aggregate order inversions: {self:?}"
        );
    }

    /// Asserts [`Verdict::assert_safe`] and, since no fault was injected, no duplicate either:
    /// exactly one record per event committed in `ledger`.
    pub fn assert_exactly_once(&self, ledger: &Ledger) {
        self.assert_safe();
        assert_eq!(self.duplicates, 0, "duplicates without a fault: {self:?}");
        assert_eq!(self.records, ledger.committed.len());
    }
}
