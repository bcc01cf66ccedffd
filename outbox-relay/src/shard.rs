//! Several active relays on one outbox table (polling source): the table's aggregates are split
//! into a fixed number of shards, and each running instance relays the shards it owns.
//!
//! # The shard of an event
//!
//! An event's shard is a hash of its `aggregateid` modulo the configured `shards` (`N`), computed
//! by PostgreSQL from the first 32 bits of the MD5 digest of the id:
//!
//! ```sql
//! ('x' || substr(md5(aggregateid::text), 1, 8))::bit(32)::bigint % N
//! ```
//!
//! MD5 is fully specified, so the shard of an aggregate is the same on every PostgreSQL version
//! and every platform (`hashtext`/`hashtextextended`, the hash partitioning functions, depend on
//! the server's byte order, and nothing promises they stay as they are). Every event of an
//! aggregate lands in one shard, so relaying each shard in `seq` order keeps each aggregate's
//! order. `migrate` with `shards` set creates a partial expression index on
//! `(shard, seq) WHERE published_at IS NULL` ([`index_statement`]); the claim reads each owned
//! shard's oldest rows from it and merges them in `seq` order (see [`crate::table::Claim`]).
//!
//! # Who relays which shard
//!
//! Everything an instance holds is an advisory lock on its one lock session (the leader
//! session of [`crate::leader`]), so the lease, the heartbeat and the fencing of a paused
//! instance cover all of it at once: when the server ends that session (a crash, `kill -9`, a
//! pause past the lease), every shard it held is free for the others at the same moment.
//!
//! - **Membership**: the table's relay lock, held in *shared* mode by every sharded instance
//!   (an unsharded relay takes it exclusively, so the two never run together on one table).
//!   The live members are the sessions holding it, as `pg_locks` shows them.
//! - **Shard count**: a shared lock named after `N`. A relay configured with another `N` (whose
//!   shards would cut the aggregates differently) stands by until the others are gone; joining
//!   is serialised by a short exclusive join lock, so two relays with different counts never
//!   both get in.
//! - **Shards**: one exclusive advisory lock per shard.
//!
//! # Rebalancing
//!
//! At every heartbeat ([`rebalance`]) an instance counts the members `m` and aims for its fair
//! share `ceil(N / m)` ([`plan`]):
//!
//! - with fewer shards than that, it takes free shards (`pg_try_advisory_lock`);
//! - with more, it **drains** the surplus: it stops claiming those shards at once, and releases
//!   each (`pg_advisory_unlock`) only once none of its rows is in flight any more (every row
//!   claimed from it was acknowledged by the broker and its acknowledgement is durable, or the
//!   window was dropped and the producer replaced). The next owner starts from the first
//!   unacknowledged row, after everything the previous owner published.
//!
//! So a shard is relayed by one instance at a time, and an aggregate's events keep their order
//! across a handover. A join or a leave settles within about two heartbeats (`leader_lease / 2`)
//! plus the time to acknowledge the draining instance's window.

use std::collections::BTreeSet;
use std::sync::Mutex as StdMutex;

use outbox_core::OutboxTable;
use prometheus_client::metrics::gauge::Gauge;
use sqlx::PgConnection;

/// The most shards a table can be split into.
pub const MAX_SHARDS: u32 = 1024;

/// The SQL expression of an event's shard among `count`, over the `aggregateid` column of the
/// table aliased `alias` (an empty alias for the bare column, as in the index). `count` is
/// written into the text: the index and the claims must spell the same expression.
pub fn expression(count: u32, alias: &str) -> String {
    let column = if alias.is_empty() {
        "aggregateid".to_owned()
    } else {
        format!("{alias}.aggregateid")
    };
    format!("((('x' || substr(md5(({column})::text), 1, 8))::bit(32)::bigint % {count}))")
}

/// The name (unqualified, unquoted) of the shard index of `table` for `count` shards:
/// `<table>_shards<count>_idx`, the table part cut so the name fits PostgreSQL's 63 bytes.
pub fn index_name(table: &OutboxTable, count: u32) -> String {
    let suffix = format!("_shards{count}_idx");
    let name = table.name().as_str();
    let mut keep = name.len().min(63 - suffix.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &name[..keep])
}

/// Quotes an identifier.
fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// The statement `migrate` runs for `count` shards: a partial index of unpublished rows on
/// `(shard, seq)`, built without blocking the writers.
pub fn index_statement(table: &OutboxTable, count: u32) -> String {
    format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({}, seq) WHERE published_at IS NULL",
        quoted(&index_name(table, count)),
        table.qualified(),
        expression(count, "")
    )
}

/// The schema-qualified, quoted name of the shard index (for `DROP INDEX`).
pub fn index_qualified(table: &OutboxTable, count: u32) -> String {
    match table.schema() {
        Some(schema) => format!("{}.{}", schema.quoted(), quoted(&index_name(table, count))),
        None => quoted(&index_name(table, count)),
    }
}

/// The advisory lock keys of a sharded table (computed on the table as PostgreSQL resolves it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardKeys {
    /// The table's relay lock: held shared by every member.
    pub members: i64,
    /// Held shared by every member configured with this shard count.
    pub count: i64,
    /// Taken exclusively, briefly, while an instance joins.
    pub join: i64,
    /// The lock of shard `s`, at index `s`.
    pub shards: Vec<i64>,
}

impl ShardKeys {
    /// The keys of `table` (resolved) split into `count` shards.
    pub fn new(table: &OutboxTable, count: u32) -> Self {
        Self {
            members: table.lock_key("relay"),
            count: count_key(table, count),
            join: table.lock_key("relay-shard-join"),
            shards: (0..count)
                .map(|s| table.lock_key(&format!("relay-shard-{s}")))
                .collect(),
        }
    }
}

/// The key members configured with `count` shards hold shared.
fn count_key(table: &OutboxTable, count: u32) -> i64 {
    table.lock_key(&format!("relay-shards-{count}"))
}

/// Granted advisory locks of this database: the key (as `pg_advisory_lock(bigint)` takes it)
/// and the holder's pid.
const ADVISORY_LOCKS: &str = "SELECT ((l.classid::bigint << 32) | l.objid::bigint) AS key, l.pid
     FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND ((l.classid::bigint << 32) | l.objid::bigint) = ANY($1)";

/// Who holds which of `keys`: `(key, pid)` for every granted lock (a shared lock once per
/// holder).
pub async fn holders(
    conn: &mut PgConnection,
    keys: &[i64],
) -> Result<Vec<(i64, i32)>, sqlx::Error> {
    sqlx::query_as(ADVISORY_LOCKS)
        .bind(keys)
        .fetch_all(conn)
        .await
}

/// Why an instance could not join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another instance is joining right now.
    Joining,
    /// An unsharded relay holds the table's relay lock.
    Unsharded,
    /// Relays configured with another shard count run on the table.
    OtherCount(u32),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Joining => f.write_str("another relay is joining"),
            Refusal::Unsharded => f.write_str(
                "an unsharded relay (no `shards` setting) is active on this table: standing by until it stops",
            ),
            Refusal::OtherCount(n) => write!(
                f,
                "relays with shards = {n} are active on this table (every relay of a table must use the same shard count): standing by until they stop"
            ),
        }
    }
}

async fn try_lock(conn: &mut PgConnection, key: i64, shared: bool) -> Result<bool, sqlx::Error> {
    let sql = if shared {
        "SELECT pg_try_advisory_lock_shared($1)"
    } else {
        "SELECT pg_try_advisory_lock($1)"
    };
    sqlx::query_scalar(sql).bind(key).fetch_one(conn).await
}

async fn unlock(conn: &mut PgConnection, key: i64, shared: bool) -> Result<(), sqlx::Error> {
    let sql = if shared {
        "SELECT pg_advisory_unlock_shared($1)"
    } else {
        "SELECT pg_advisory_unlock($1)"
    };
    sqlx::query(sql).bind(key).execute(conn).await?;
    Ok(())
}

/// Joins the members of `table` (resolved) split into `count` shards on `conn`: takes the
/// membership and shard-count locks in shared mode (and `also`, the relay lock under an older
/// spelling, when given), or none of them and says why. Shards are taken afterwards, by
/// [`rebalance`].
pub async fn join(
    conn: &mut PgConnection,
    table: &OutboxTable,
    count: u32,
    also: Option<i64>,
) -> Result<Result<(), Refusal>, sqlx::Error> {
    let keys = ShardKeys::new(table, count);
    if !try_lock(conn, keys.join, false).await? {
        return Ok(Err(Refusal::Joining));
    }
    let outcome = join_locked(conn, table, &keys, count, also).await;
    unlock(conn, keys.join, false).await?;
    outcome
}

async fn join_locked(
    conn: &mut PgConnection,
    table: &OutboxTable,
    keys: &ShardKeys,
    count: u32,
    also: Option<i64>,
) -> Result<Result<(), Refusal>, sqlx::Error> {
    let others: Vec<(u32, i64)> = (1..=MAX_SHARDS)
        .filter(|n| *n != count)
        .map(|n| (n, count_key(table, n)))
        .collect();
    let other_keys: Vec<i64> = others.iter().map(|(_, k)| *k).collect();
    if let Some((key, _)) = holders(conn, &other_keys).await?.first() {
        let n = others.iter().find(|(_, k)| k == key).map_or(0, |(n, _)| *n);
        return Ok(Err(Refusal::OtherCount(n)));
    }
    if !try_lock(conn, keys.members, true).await? {
        return Ok(Err(Refusal::Unsharded));
    }
    if let Some(also) = also
        && !try_lock(conn, also, true).await?
    {
        unlock(conn, keys.members, true).await?;
        return Ok(Err(Refusal::Unsharded));
    }
    try_lock(conn, keys.count, true).await?;
    Ok(Ok(()))
}

/// What one rebalancing step does ([`plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The fair share: `ceil(shards / members)`.
    pub share: usize,
    /// The shards to drain from now on (not claimed; released once idle).
    pub draining: BTreeSet<u32>,
    /// Draining shards with nothing in flight: release them now.
    pub release: Vec<u32>,
    /// How many free shards to try to take.
    pub take: usize,
}

/// The fair-share decision of an instance holding `held` (of which `draining` are being handed
/// off and `busy` have rows in flight) when `members` instances split `count` shards:
///
/// - the share is `ceil(count / members)`;
/// - with more than the share, the highest-numbered surplus shards drain (a shard already
///   draining stays so while there is a surplus), and those of them with nothing in flight are
///   released;
/// - with the share or fewer, nothing drains (a draining shard not yet released is kept), and
///   the missing shards are to be taken from the free ones.
pub fn plan(
    count: u32,
    members: usize,
    held: &BTreeSet<u32>,
    draining: &BTreeSet<u32>,
    busy: &BTreeSet<u32>,
) -> Step {
    let share = (count as usize).div_ceil(members.max(1));
    if held.len() <= share {
        return Step {
            share,
            draining: BTreeSet::new(),
            release: Vec::new(),
            take: share - held.len(),
        };
    }
    let surplus = held.len() - share;
    let mut next: BTreeSet<u32> = draining
        .iter()
        .copied()
        .filter(|s| held.contains(s))
        .rev()
        .take(surplus)
        .collect();
    for s in held.iter().rev() {
        if next.len() >= surplus {
            break;
        }
        next.insert(*s);
    }
    let release = next.iter().copied().filter(|s| !busy.contains(s)).collect();
    Step {
        share,
        draining: next,
        release,
        take: 0,
    }
}

/// The shards an instance holds, shared by its heartbeat (which rebalances them on the lock
/// session) and its polling source (which claims from them and reports which have rows in
/// flight). Both work under the lock session's mutex, so the source never claims from a shard
/// the heartbeat is releasing.
#[derive(Debug)]
pub struct Ownership {
    count: u32,
    keys: ShardKeys,
    state: StdMutex<State>,
    owned: Gauge,
}

#[derive(Debug, Default)]
struct State {
    held: BTreeSet<u32>,
    draining: BTreeSet<u32>,
    busy: BTreeSet<u32>,
}

impl Ownership {
    /// Nothing held yet, among `count` shards with these keys; `owned` shows how many are held.
    pub fn new(count: u32, keys: ShardKeys, owned: Gauge) -> Self {
        owned.set(0);
        Self {
            count,
            keys,
            state: StdMutex::new(State::default()),
            owned,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shard count.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The shards this instance may claim from: held and not draining. Read it under the lock
    /// session's mutex, together with the claim.
    pub fn claimable(&self) -> Vec<i64> {
        let s = self.state();
        s.held
            .difference(&s.draining)
            .map(|s| i64::from(*s))
            .collect()
    }

    /// The shards held (claimable or draining).
    pub fn held(&self) -> Vec<u32> {
        self.state().held.iter().copied().collect()
    }

    /// The source's report: the shards with rows in flight (claimed, not yet durably
    /// acknowledged, or dropped from a window whose producer is not yet replaced).
    pub fn set_busy(&self, busy: BTreeSet<u32>) {
        self.state().busy = busy;
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        self.owned.set(0);
    }
}

/// One rebalancing step on the lock session `conn` (called by the heartbeat, under the session's
/// mutex): counts the members, releases the drained surplus, marks more surplus as draining, or
/// takes free shards up to the fair share. See the [module docs](self).
pub async fn rebalance(conn: &mut PgConnection, own: &Ownership) -> Result<(), sqlx::Error> {
    let members = holders(conn, &[own.keys.members]).await?.len();
    let step = {
        let s = own.state();
        plan(own.count, members, &s.held, &s.draining, &s.busy)
    };
    for shard in &step.release {
        unlock(conn, own.keys.shards[*shard as usize], false).await?;
    }
    let mut taken = Vec::new();
    if step.take > 0 {
        let locked: BTreeSet<i64> = holders(conn, &own.keys.shards)
            .await?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        // Start at a place of this process's own, so that instances joining together do not
        // all contend for shard 0 first.
        let start = std::process::id() % own.count;
        let candidates = (0..own.count)
            .map(|i| (start + i) % own.count)
            .filter(|s| !locked.contains(&own.keys.shards[*s as usize]));
        for shard in candidates {
            if taken.len() >= step.take {
                break;
            }
            let held = own.state().held.contains(&shard);
            if !held && try_lock(conn, own.keys.shards[shard as usize], false).await? {
                taken.push(shard);
            }
        }
    }
    let mut s = own.state();
    let started: Vec<u32> = step.draining.difference(&s.draining).copied().collect();
    for shard in &step.release {
        s.held.remove(shard);
    }
    s.draining = step
        .draining
        .into_iter()
        .filter(|d| !step.release.contains(d))
        .collect();
    s.held.extend(taken.iter().copied());
    own.owned.set(s.held.len() as i64);
    if !taken.is_empty() || !step.release.is_empty() || !started.is_empty() {
        tracing::info!(
            members,
            share = step.share,
            taken = ?taken,
            draining = ?started,
            released = ?step.release,
            owned = ?s.held,
            "shards rebalanced"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[u32]) -> BTreeSet<u32> {
        items.iter().copied().collect()
    }

    /// Runs `plan` for every instance until nothing changes, as the heartbeats would; shards are
    /// taken lowest first from the free ones. Returns each instance's shards.
    fn settle(count: u32, owned: &mut [BTreeSet<u32>]) {
        let members = owned.len();
        for _ in 0..10 {
            let mut changed = false;
            for i in 0..members {
                let step = plan(
                    count,
                    members,
                    &owned[i],
                    &BTreeSet::new(),
                    &BTreeSet::new(),
                );
                for s in &step.release {
                    owned[i].remove(s);
                    changed = true;
                }
                for _ in 0..step.take {
                    let taken: BTreeSet<u32> = owned.iter().flatten().copied().collect();
                    if let Some(free) = (0..count).find(|s| !taken.contains(s)) {
                        owned[i].insert(free);
                        changed = true;
                    }
                }
            }
            if !changed {
                return;
            }
        }
        panic!("no fixed point: {owned:?}");
    }

    fn assert_partition(count: u32, owned: &[BTreeSet<u32>]) {
        let all: Vec<u32> = owned.iter().flatten().copied().collect();
        let distinct: BTreeSet<u32> = all.iter().copied().collect();
        assert_eq!(all.len(), distinct.len(), "a shard owned twice: {owned:?}");
        assert_eq!(distinct, (0..count).collect(), "a shard unowned: {owned:?}");
        let share = (count as usize).div_ceil(owned.len());
        for o in owned {
            assert!(o.len() <= share && !o.is_empty(), "unfair: {owned:?}");
        }
    }

    #[test]
    fn a_join_moves_shards_to_the_newcomer_and_a_leave_hands_them_over() {
        let mut owned = vec![BTreeSet::new()];
        settle(16, &mut owned);
        assert_eq!(owned[0].len(), 16, "alone: every shard");
        owned.push(BTreeSet::new());
        settle(16, &mut owned);
        assert_partition(16, &owned);
        assert_eq!((owned[0].len(), owned[1].len()), (8, 8));
        owned.push(BTreeSet::new());
        settle(16, &mut owned);
        assert_partition(16, &owned);
        // Leave (or death): the survivors take the orphaned shards.
        owned.remove(1);
        settle(16, &mut owned);
        assert_partition(16, &owned);
        assert_eq!((owned[0].len(), owned[1].len()), (8, 8));
    }

    #[test]
    fn surplus_drains_first_and_is_released_only_when_idle() {
        let held = set(&[0, 1, 2, 3, 4, 5, 6, 7]);
        // A second member: share 4, the four highest drain; two still have rows in flight.
        let step = plan(8, 2, &held, &BTreeSet::new(), &set(&[6, 7]));
        assert_eq!(step.share, 4);
        assert_eq!(step.draining, set(&[4, 5, 6, 7]));
        assert_eq!(step.release, vec![4, 5]);
        assert_eq!(step.take, 0);
        // Next heartbeat: 6 and 7 still draining, released once idle.
        let held = set(&[0, 1, 2, 3, 6, 7]);
        let step = plan(8, 2, &held, &set(&[6, 7]), &set(&[7]));
        assert_eq!(step.draining, set(&[6, 7]));
        assert_eq!(step.release, vec![6]);
        // The other member left before the hand-off finished: keep them, take the rest.
        let step = plan(8, 1, &held, &set(&[6, 7]), &set(&[7]));
        assert!(step.draining.is_empty() && step.release.is_empty());
        assert_eq!(step.take, 2);
    }

    #[test]
    fn more_members_than_shards_leave_some_idle() {
        let step = plan(2, 3, &BTreeSet::new(), &BTreeSet::new(), &BTreeSet::new());
        assert_eq!((step.share, step.take), (1, 1));
    }

    #[test]
    fn the_expression_and_the_index_spell_the_same_hash() {
        let table = OutboxTable::new(Some("shop"), "outbox").unwrap();
        assert_eq!(
            expression(16, "o"),
            "((('x' || substr(md5((o.aggregateid)::text), 1, 8))::bit(32)::bigint % 16))"
        );
        assert_eq!(
            index_statement(&table, 16),
            format!(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS \"outbox_shards16_idx\" ON \"shop\".\"outbox\" ({}, seq) WHERE published_at IS NULL",
                expression(16, "")
            )
        );
        assert_eq!(
            index_qualified(&table, 16),
            "\"shop\".\"outbox_shards16_idx\""
        );
        let long = OutboxTable::new(None, &"t".repeat(63)).unwrap();
        assert_eq!(index_name(&long, 1024).len(), 63);
    }
}
