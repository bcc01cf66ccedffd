//! The PostgreSQL sessions the tables of one relay share: one pool for every table's row
//! acknowledgements and purges (`pool_size` sessions) and one `LISTEN` session for every
//! table's wake-ups.
//!
//! What stays per table is its leader-lock session: the polling source claims on it, parks go
//! through it and the lease fences it ([`crate::leader`]), so a table's claims can never run on a
//! session that does not hold that table's lock. A relay of `n` tables therefore holds at most
//! `n + pool_size + 1` sessions (the `+ 1` is the shared `LISTEN` session, with `listen = true`),
//! besides the short ones of the admin endpoint's status and of the `tables` rescan.
//!
//! Fairness: a table runs at most [`per_table`] acknowledgements at once — half of the pool, at
//! least one and at most two — so a table draining a large backlog leaves the rest of the pool to
//! the others; and the pool serves waiting tables first come, first served, so none is
//! overtaken by a busier one.

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

use crate::source::polling::{MarkSessions, SharedListener, Wakeups};
use crate::source::row_marks::{self, MAX_PENDING_ACKNOWLEDGEMENTS};

/// How many of a pool of `pool_size` sessions one table's acknowledgements may hold at once:
/// half of the pool, at least one and at most [`MAX_PENDING_ACKNOWLEDGEMENTS`].
pub fn per_table(pool_size: usize) -> usize {
    (pool_size / 2).clamp(1, MAX_PENDING_ACKNOWLEDGEMENTS)
}

/// The sessions a relay's tables share. See the [module docs](self). Cheap to clone.
#[derive(Debug, Clone)]
pub struct SharedSessions {
    pool: PgPool,
    per_table: usize,
    wakeups: Wakeups,
}

impl SharedSessions {
    /// A pool of `pool_size` sessions and one shared `LISTEN` session, for the tables of a
    /// group. Nothing connects until a table needs it. Needs a Tokio runtime.
    pub fn group(options: &PgConnectOptions, pool_size: usize) -> Self {
        Self {
            pool: row_marks::pool_of(options, pool_size),
            per_table: per_table(pool_size),
            wakeups: Wakeups::Shared(SharedListener::start(options)),
        }
    }

    /// The sessions of a single-table relay: a pool of `pool_size` and a `LISTEN` session of
    /// the source's own (as before the pool was shared). Needs a Tokio runtime.
    pub fn single(options: &PgConnectOptions, pool_size: usize) -> Self {
        Self {
            pool: row_marks::pool_of(options, pool_size),
            per_table: per_table(pool_size),
            wakeups: Wakeups::Own,
        }
    }

    /// The pool (acknowledgements, purges).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Where one table's polling source acknowledges its rows.
    pub fn marks(&self) -> MarkSessions {
        MarkSessions {
            pool: self.pool.clone(),
            limit: self.per_table,
        }
    }

    /// Where one table's polling source hears notifications.
    pub fn wakeups(&self) -> &Wakeups {
        &self.wakeups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_takes_at_most_half_of_the_pool() {
        assert_eq!(per_table(1), 1, "a pool of one is taken in turns");
        assert_eq!(
            per_table(2),
            1,
            "a busy table leaves one session to the others"
        );
        assert_eq!(per_table(3), 1);
        assert_eq!(per_table(4), 2);
        assert_eq!(per_table(100), MAX_PENDING_ACKNOWLEDGEMENTS);
    }
}
