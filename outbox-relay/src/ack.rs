//! The one place that decides what may be acknowledged to the source.
//!
//! Kafka acknowledges records individually and, after a failure, possibly out of order. The source
//! may learn only about the **contiguous prefix** of a batch whose records were all acknowledged:
//! acknowledging a later success past an earlier failure would, after the rewind that follows,
//! publish the failed event after its successor and break per-aggregate order (or lose it, for
//! a cursor-based source).

/// The length of the leading run of successes in `outcomes`.
pub fn delivered_prefix<T, E>(outcomes: &[Result<T, E>]) -> usize {
    outcomes.iter().take_while(|r| r.is_ok()).count()
}

#[cfg(test)]
mod tests {
    use super::delivered_prefix;

    #[test]
    fn stops_at_the_first_failure() {
        let r: Vec<Result<u8, ()>> = vec![Ok(1), Ok(2), Err(()), Ok(4)];
        assert_eq!(delivered_prefix(&r), 2);
        let r: Vec<Result<u8, ()>> = vec![Err(()), Ok(2)];
        assert_eq!(delivered_prefix(&r), 0);
        let r: Vec<Result<u8, ()>> = vec![Ok(1), Ok(2)];
        assert_eq!(delivered_prefix(&r), 2);
        let r: Vec<Result<u8, ()>> = vec![];
        assert_eq!(delivered_prefix(&r), 0);
    }
}
