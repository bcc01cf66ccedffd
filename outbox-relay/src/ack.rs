//! The one place that decides what may be acknowledged to the source.
//!
//! Kafka acknowledges records individually and, after a failure, possibly out of order. The source
//! may learn only about the **contiguous prefix** of a batch whose events were all handled —
//! delivered, or durably parked ([`crate::park`]): acknowledging a later success past an earlier
//! transient failure would, after the rewind that follows, publish the failed event after its
//! successor and break per-aggregate order (or lose it, for a cursor- or LSN-based source).

use crate::sink::Outcome;

/// The length of the leading run of handled events: everything before the first failure, or the
/// first record whose produce request was refused and that has not been tried alone yet
/// ([`Outcome::Suspect`]).
pub fn handled_prefix<E>(outcomes: &[Outcome<E>]) -> usize {
    outcomes
        .iter()
        .take_while(|o| !matches!(o, Outcome::Failed(_) | Outcome::Suspect(_)))
        .count()
}

#[cfg(test)]
mod tests {
    use super::handled_prefix;
    use crate::sink::{Delivered, Outcome};

    /// A broker client's error, as far as acknowledgement cares.
    type Error = &'static str;

    fn ok() -> Outcome<Error> {
        Outcome::Delivered(Delivered {
            partition: 0,
            offset: 0,
        })
    }

    fn failed() -> Outcome<Error> {
        Outcome::Failed("timed out")
    }

    #[test]
    fn stops_at_the_first_transient_failure() {
        assert_eq!(handled_prefix(&[ok(), ok(), failed(), ok()]), 2);
        assert_eq!(handled_prefix(&[failed(), ok()]), 0);
        assert_eq!(handled_prefix(&[ok(), ok()]), 2);
        assert_eq!(handled_prefix::<Error>(&[]), 0);
    }

    #[test]
    fn a_suspect_record_is_not_handled_until_it_was_tried_alone() {
        let suspect = Outcome::Suspect("refused");
        assert_eq!(handled_prefix(&[ok(), suspect, ok()]), 1);
    }

    #[test]
    fn parked_events_count_as_handled() {
        let rejected = Outcome::Rejected("too large");
        let held = Outcome::Held { behind: 1 };
        assert_eq!(handled_prefix(&[ok(), rejected, held, ok(), failed()]), 4);
    }
}
