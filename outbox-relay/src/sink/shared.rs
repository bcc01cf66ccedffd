//! One broker connection shared by the tables of a relay, numbered by generation.
//!
//! A [`SharedConnection`] holds at most one live connection. Every table's sink asks it for the
//! current one ([`SharedConnection::get_or_open`]) and remembers the generation it got. When a
//! table sees the connection fail it [`SharedConnection::retire`]s that generation: the first
//! table to do so drops it (the others find a newer generation in place and retire nothing), so
//! one failure replaces the connection exactly once however many tables observe it. The next
//! table to publish opens generation `n + 1`; a table still holding generation `n` notices it
//! is stale on its next publish and follows the sink's own failure path (fail what it had in
//! flight, be recreated, re-send in order) onto the new one.
//!
//! The NATS sink ([`crate::sink::nats`]) and the Redis sink ([`crate::sink::redis`]) share their
//! connection this way; so does the RabbitMQ sink ([`crate::sink::rabbitmq`]), each table on a
//! channel of its own, retiring the connection only when it is dead. A single-table relay uses
//! a `SharedConnection` of its own, so the failure path is the same code whatever the number of
//! tables.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// One connection of a [`SharedConnection`] and its generation number.
#[derive(Clone)]
pub struct Generation<C> {
    /// Increases by one with every connection opened (the first is 1).
    pub number: u64,
    /// The connection (a cheap handle, cloned to every table using it).
    pub connection: C,
}

/// One broker connection for many tables, replaced once per failure. See the
/// [module docs](self).
pub struct SharedConnection<C> {
    current: Mutex<Option<Generation<C>>>,
    /// Serialises opening, so tables asking at once open one connection between them.
    opening: tokio::sync::Mutex<()>,
    opened: AtomicU64,
}

impl<C: Clone> Default for SharedConnection<C> {
    fn default() -> Self {
        Self {
            current: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            opened: AtomicU64::new(0),
        }
    }
}

impl<C: Clone> SharedConnection<C> {
    /// The current connection, if one is open and not retired.
    pub fn current(&self) -> Option<Generation<C>> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// The current connection, or a new one from `open` when there is none or `dead` says the
    /// current one is gone (then it is retired first). Only one caller opens at a time; the
    /// others wait and get the connection it opened.
    pub async fn get_or_open<E, F, Fut>(
        &self,
        dead: impl Fn(&C) -> bool,
        open: F,
    ) -> Result<Generation<C>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<C, E>>,
    {
        let _opening = self.opening.lock().await;
        if let Some(current) = self.current() {
            if !dead(&current.connection) {
                return Ok(current);
            }
            self.retire(current.number);
        }
        let connection = open().await?;
        let generation = Generation {
            number: self.opened.fetch_add(1, Ordering::AcqRel) + 1,
            connection,
        };
        if let Ok(mut slot) = self.current.lock() {
            *slot = Some(generation.clone());
        }
        Ok(generation)
    }

    /// Drops generation `number` if it is still the current one and returns its connection (for
    /// the caller to close); `None` when it was replaced already (by another table that saw the
    /// same failure) or is not open.
    pub fn retire(&self, number: u64) -> Option<C> {
        let mut slot = self.current.lock().ok()?;
        if slot.as_ref().is_some_and(|g| g.number == number) {
            slot.take().map(|g| g.connection)
        } else {
            None
        }
    }

    /// How many connections were opened so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// Six tables that all saw generation 1 fail replace it exactly once: one retire drops it,
    /// the five others find nothing to drop, and the next publishes of all six share
    /// generation 2, opened once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_connection_is_replaced_exactly_once() {
        let shared = Arc::new(SharedConnection::<usize>::default());
        let opens = Arc::new(AtomicUsize::new(0));
        let open = |opens: Arc<AtomicUsize>| async move {
            Ok::<_, ()>(opens.fetch_add(1, Ordering::SeqCst))
        };
        let first = shared
            .get_or_open(|_| false, || open(opens.clone()))
            .await
            .unwrap();
        assert_eq!(first.number, 1);
        let retired: Vec<bool> = (0..6).map(|_| shared.retire(1).is_some()).collect();
        assert_eq!(retired.iter().filter(|r| **r).count(), 1, "{retired:?}");
        let mut tables = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let (shared, opens) = (shared.clone(), opens.clone());
            tables.spawn(async move {
                shared
                    .get_or_open(|_| false, || open(opens))
                    .await
                    .unwrap()
                    .number
            });
        }
        while let Some(number) = tables.join_next().await {
            assert_eq!(number.unwrap(), 2);
        }
        assert_eq!(opens.load(Ordering::SeqCst), 2);
        assert_eq!(shared.opened(), 2);
        // A late table retiring the old generation leaves the new one alone.
        assert!(shared.retire(1).is_none());
        assert_eq!(shared.current().map(|g| g.number), Some(2));
    }

    /// A connection the caller finds dead is replaced by the next `get_or_open`, and a failed
    /// open leaves nothing in place.
    #[tokio::test]
    async fn a_dead_connection_is_replaced_and_a_failed_open_leaves_none() {
        let shared = SharedConnection::<&str>::default();
        let g = shared
            .get_or_open(|_| false, || async { Ok::<_, ()>("a") })
            .await
            .unwrap();
        assert_eq!((g.number, g.connection), (1, "a"));
        let failed = shared
            .get_or_open(|c| *c == "a", || async { Err::<&str, _>("refused") })
            .await;
        assert_eq!(failed.err(), Some("refused"));
        assert!(shared.current().is_none());
        let g = shared
            .get_or_open(|_| false, || async { Ok::<_, ()>("b") })
            .await
            .unwrap();
        assert_eq!((g.number, g.connection), (2, "b"));
    }
}
