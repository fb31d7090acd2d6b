//! The shared connection budget (issue 15): a server's `max_connections` is the budget of all
//! instances together. Each instance holds a **lease** on a share of it, a row per (server,
//! instance) in the registry's `budget_shares`, renewed by every heartbeat; its pool budget
//! (`pool::ServerBudget`) lets it open no more than that share.
//!
//! Invariant: the shares of a server's live leases sum to at most its budget. A share grows
//! only in the registry's transaction under the server's lock (`Registry::renew_share`), and
//! the local permits grow only after it commits. A share shrinks locally first (free permits
//! forgotten, idle connections closed until the instance holds no more than the new share),
//! and only then in the registry. So the sum of connections open over the instances never
//! passes the sum of the live shares, which never passes the budget.
//!
//! Redistribution, at every beat, per server: the instance writes its **demand** (connections
//! busy with a client plus connects waiting for room) and reads the others'. [`fair_targets`]
//! gives each live instance a max-min fair part of the budget over their demands, each demand
//! raised by a little headroom (a quarter of an equal part), and spreads what no one wants
//! evenly, so idle budget is usable at once wherever the next client lands. An instance that
//! wants it always gets at least an equal part (`budget / live instances`), and spare moves to
//! the hungriest without waiting for beats: a grant is capped by what the other leases leave
//! free, and an instance whose grant was capped calls the others (NOTIFY on the registry's
//! `tenantgate_budget`); they renew their lease for that server at once, shrinking to their
//! own fair part, and one that gave some back calls in turn, so the capped one renews and takes
//! it. The rebalancing loop ([`rebalance`]) answers those calls at most every
//! [`REBALANCE_TICK`], and also renews as soon as connects wait for room here while this
//! instance holds less than the budget and either its last grant was capped or its demand grew
//! since. So a new instance beside one holding the whole budget (an upgrade, a scale-out) gets
//! its part in a few registry round trips plus the time to close idle connections, not two
//! heartbeats; the heartbeat only renews (and catches calls missed while the listener was
//! down).
//!
//! Lapse. A lease is live while renewed within `[instance] heartbeat_ttl_seconds`; any instance
//! deletes lapsed ones. A killed instance's connections are gone at once (PostgreSQL sees its
//! sockets close). A live instance that cannot renew (registry down, or cut off from it) keeps
//! its share until one beat before its lease would lapse, counted from when it sent its last
//! successful renewal (the registry stamps that renewal later, so the instance always gives up
//! first), then shrinks to 0: free permits at once, idle connections closed at every beat,
//! busy ones once their client's transaction ends. The trade-off: a registry outage longer than
//! the TTL stops new backend connections on every instance that shares a server with another.
//! An instance that was alone on a server at its last renewal keeps its share instead, so a
//! single-instance deployment serves through a registry outage as before; the price is that an
//! instance started elsewhere during such an outage may open up to the whole budget beside it.
//!
//! At start an instance holds no share until its first renewal (done before it serves); a lone
//! instance gets the whole budget then, with no configuration. At a clean stop it closes its
//! idle connections and gives its shares back.
//!
//! This file must not sit on the checkout path nor open backend connections: only the
//! heartbeat loop calls it, and it changes only the budgets' permits and closes idle
//! connections through the pool map.

use std::collections::{HashMap, HashSet};
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::MissedTickBehavior;

use super::Instances;
use crate::registry::{BUDGET_CHANNEL, PeerMessage, ShareRecord, ShareRow};

/// How often a shrink waiting for busy connections to come back looks again.
const SHRINK_TICK: Duration = Duration::from_millis(20);

/// How often the rebalancing loop renews the leases that calls or local demand made due.
const REBALANCE_TICK: Duration = Duration::from_millis(100);

/// What this instance knows of its lease on one server.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseState {
    /// When the last successful renewal was sent (before the registry stamped it).
    renewed: Instant,
    /// No other instance held a live lease on the server at that renewal.
    alone: bool,
    /// That renewal granted less than this instance's fair part: others held the rest.
    capped: bool,
    /// The demand it recorded.
    demand: u32,
}

/// Per server, this instance's lease as of its last renewal.
pub(super) type Leases = std::sync::Mutex<HashMap<String, LeaseState>>;

/// Max-min fair parts of `budget` over `demands` (one per live instance), summing to exactly
/// `budget` when there is at least one instance: each demand met up to an equal part of what
/// is left, the rest spread evenly (the first instances get the odd units).
pub fn fair_targets(budget: u32, demands: &[u32]) -> Vec<u32> {
    let n = u32::try_from(demands.len()).unwrap_or(u32::MAX);
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| demands.get(i).copied().unwrap_or(0));
    let mut targets = vec![0_u32; demands.len()];
    let mut left = budget;
    for (served, &i) in (0_u32..).zip(&order) {
        let equal = left / (n - served);
        let give = demands.get(i).copied().unwrap_or(0).min(equal);
        if let Some(t) = targets.get_mut(i) {
            *t = give;
        }
        left -= give;
    }
    let (each, odd) = (left / n, left % n);
    for (i, t) in (0_u32..).zip(targets.iter_mut()) {
        *t += each + u32::from(i < odd);
    }
    targets
}

/// The demand an instance is planned for: what it wants plus a quarter of an equal part, so an
/// instance with little load still has room for the next clients.
fn with_headroom(budget: u32, live: u32, demand: u32) -> u32 {
    demand.saturating_add((budget / live.max(1)).div_ceil(4))
}

/// This instance's part of a server's budget, from the live leases `rows` (its own row
/// included or not) and its fresh `demand`: `(share to use, share to record)`. The share to
/// use is its fair target capped by what the other leases leave; the record never drops below
/// `held`, the permits it has now (they go only once it has shrunk).
pub fn decide_share(
    budget: u32,
    rows: &[ShareRow],
    me: &str,
    demand: u32,
    held: u32,
) -> (u32, u32) {
    let (target, taken) = fair_part(budget, rows, me, demand);
    let usable = target.min(budget.saturating_sub(taken));
    (usable, usable.max(held))
}

/// This instance's fair part of a server's budget (see [`decide_share`]), and the shares the
/// other live leases hold.
fn fair_part(budget: u32, rows: &[ShareRow], me: &str, demand: u32) -> (u32, u32) {
    let others: Vec<&ShareRow> = rows.iter().filter(|r| r.instance_id != me).collect();
    let live = u32::try_from(others.len())
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    let mut demands: Vec<u32> = others
        .iter()
        .map(|r| with_headroom(budget, live, r.demand))
        .collect();
    demands.push(with_headroom(budget, live, demand));
    let target = fair_targets(budget, &demands).last().copied().unwrap_or(0);
    let taken = others.iter().map(|r| r.share).fold(0, u32::saturating_add);
    (target, taken)
}

impl Instances {
    /// At start, before serving: no share until the registry grants one.
    pub(super) fn drop_shares(&self) {
        for server in self.inner.pools.servers() {
            if let Some(budget) = self.inner.pools.budget(&server.name) {
                budget.shrink_toward(0);
            }
        }
    }

    /// Renews this instance's lease on every server's budget (one beat). Failures are logged;
    /// a lease not renewed lapses on its own (`enforce_lapse`).
    pub(super) async fn renew_shares(&self) {
        for server in self.inner.pools.servers() {
            if let Err(e) = self.renew_share(&server.name, server.max_connections).await {
                tracing::warn!(server = %server.name, error = %e, "renewing this instance's share of the server's budget failed");
            }
        }
    }

    /// Renews this instance's lease on `server` (the heartbeat's and the rebalancing's one way
    /// to change a share): grows at once to what the registry granted, or shrinks and records
    /// the smaller share. Calls the others when the grant was capped by what they hold, or
    /// when it gave some back.
    async fn renew_share(
        &self,
        server: &str,
        max: u32,
    ) -> Result<(), crate::registry::RegistryError> {
        let pools = &self.inner.pools;
        let Some(budget) = pools.budget(server) else {
            return Ok(());
        };
        let _renewing = self.inner.renewing.lock().await;
        let demand = pools.server_demand(server);
        let held = budget.share();
        let me = self.id();
        let (mut usable, mut capped) = (held, false);
        let sent = Instant::now();
        let (rows, _) = self
            .inner
            .registry
            .renew_share(server, me, self.inner.config.ttl(), |rows| {
                let (use_now, record) = decide_share(max, rows, me, demand, held);
                usable = use_now;
                capped = use_now < fair_part(max, rows, me, demand).0;
                ShareRecord {
                    share: record,
                    demand,
                }
            })
            .await?;
        self.inner
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                server.to_owned(),
                LeaseState {
                    renewed: sent,
                    alone: rows.iter().all(|r| r.instance_id == me),
                    capped,
                    demand,
                },
            );
        let mut call = capped;
        if usable > held {
            budget.grow_to(usable);
            tracing::debug!(server, share = usable, demand, capped, "budget share grown");
        } else if usable < held {
            let reached = self.shrink(server, usable, self.shrink_bound()).await;
            if reached < held {
                self.inner.registry.lower_share(server, me, reached).await?;
                call = true;
            }
            tracing::debug!(
                server,
                share = reached,
                target = usable,
                demand,
                "budget share shrunk"
            );
        }
        if call {
            self.call_others(server).await;
        }
        Ok(())
    }

    /// Has the other instances renew their lease on `server` now (see the module doc).
    async fn call_others(&self, server: &str) {
        let payload = format!("{} {server}", self.id());
        if let Err(e) = self.inner.registry.notify(BUDGET_CHANNEL, &payload).await {
            tracing::debug!(server, error = %e, "calling the other instances about a budget share failed; they look at their next heartbeat");
        }
    }

    /// Time one shrink may take within a beat.
    fn shrink_bound(&self) -> Duration {
        self.inner.config.heartbeat() / 4
    }

    /// Lowers the share of `server` toward `target`, closing idle connections until it gets
    /// there or `within` has passed. Returns the share reached.
    async fn shrink(&self, server: &str, target: u32, within: Duration) -> u32 {
        let pools = &self.inner.pools;
        let Some(budget) = pools.budget(server) else {
            return 0;
        };
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let reached = budget.shrink_toward(target);
            if reached <= target || tokio::time::Instant::now() >= deadline {
                return reached;
            }
            if !pools.close_idle(server).await {
                // Busy connections: their permits come back when they are closed.
                tokio::time::sleep(SHRINK_TICK).await;
            }
        }
    }

    /// A lease about to lapse unrenewed (one beat before the TTL, counted from when its last
    /// renewal was sent) shrinks to 0, unless this instance was alone on the server.
    pub(super) async fn enforce_lapse(&self) {
        let margin = self
            .inner
            .config
            .ttl()
            .saturating_sub(self.inner.config.heartbeat());
        let lapsing: Vec<String> = self
            .inner
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, lease)| !lease.alone && lease.renewed.elapsed() >= margin)
            .map(|(server, _)| server.clone())
            .collect();
        for server in lapsing {
            let held = self.inner.pools.budget(&server).map_or(0, |b| b.share());
            if held > 0 {
                let reached = self.shrink(&server, 0, self.shrink_bound()).await;
                tracing::warn!(
                    server,
                    share = reached,
                    "this instance's budget lease was not renewed for a TTL; its share is given up"
                );
            }
        }
    }

    /// Clean stop: closes idle connections and gives the shares back (those of servers where
    /// busy connections remain are lowered to what is still open, and lapse).
    pub(super) async fn release_shares(&self) -> Result<(), crate::registry::RegistryError> {
        let mut all_closed = true;
        for server in self.inner.pools.servers() {
            let reached = self.shrink(&server.name, 0, self.inner.timeout).await;
            if reached > 0 {
                all_closed = false;
                self.inner
                    .registry
                    .lower_share(&server.name, self.id(), reached)
                    .await?;
            }
        }
        if all_closed {
            self.inner.registry.remove_shares(self.id()).await?;
        }
        for server in self.inner.pools.servers() {
            self.call_others(&server.name).await;
        }
        Ok(())
    }

    /// This instance's shares summed over the servers (SHOW INSTANCES `budget_share`).
    pub(super) fn share_total(&self) -> i64 {
        let pools = &self.inner.pools;
        pools
            .servers()
            .iter()
            .filter_map(|s| pools.budget(&s.name))
            .map(|b| i64::from(b.share()))
            .sum()
    }
}

/// The rebalancing loop (see the module doc): every [`REBALANCE_TICK`], renews the leases of
/// the servers another instance called about since the last tick, and of those where connects
/// wait for room while this instance might get more. Runs until [`Instances::stop`].
pub(super) async fn rebalance(instances: Instances, mut calls: Receiver<PeerMessage>) {
    let mut tick = tokio::time::interval(REBALANCE_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut due: HashSet<String> = HashSet::new();
    let mut listening = true;
    loop {
        tokio::select! {
            () = instances.inner.stop.cancelled() => return,
            call = calls.recv(), if listening => match call {
                Ok(PeerMessage::Budget(payload)) => {
                    if let Some((from, server)) = payload.split_once(' ') {
                        if from != instances.id() {
                            due.insert(server.to_owned());
                        }
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    due.extend(instances.inner.pools.servers().iter().map(|s| s.name.clone()));
                }
                // The directory is gone (shutting down): the heartbeat still renews.
                Err(RecvError::Closed) => listening = false,
            },
            _ = tick.tick() => {
                due.extend(instances.hungry_servers());
                for server in std::mem::take(&mut due) {
                    let Some(max) = instances.inner.pools.servers().iter().find(|s| s.name == server).map(|s| s.max_connections) else {
                        continue;
                    };
                    if let Err(e) = instances.renew_share(&server, max).await {
                        tracing::debug!(server, error = %e, "renewing a budget share between heartbeats failed; the heartbeat retries");
                    }
                }
            }
        }
    }
}

impl Instances {
    /// Servers where connects wait for room now, this instance holds less than the budget,
    /// and its last grant was capped by the others or its demand grew since.
    fn hungry_servers(&self) -> Vec<String> {
        let pools = &self.inner.pools;
        let leases = self
            .inner
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pools
            .servers()
            .iter()
            .filter(|server| {
                let Some(budget) = pools.budget(&server.name) else {
                    return false;
                };
                let waiting = budget.waiting_now();
                if waiting == 0 || budget.share() >= budget.max_connections() {
                    return false;
                }
                leases.get(&server.name).is_some_and(|lease| {
                    lease.capped || budget.in_use().saturating_add(waiting) > lease.demand
                })
            })
            .map(|server| server.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, share: u32, demand: u32) -> ShareRow {
        ShareRow {
            instance_id: id.to_owned(),
            share,
            demand,
        }
    }

    #[test]
    fn fair_targets_meet_small_demands_and_split_the_rest() {
        assert_eq!(fair_targets(30, &[100, 100, 100]), vec![10, 10, 10]);
        assert_eq!(fair_targets(31, &[100, 100, 100]).iter().sum::<u32>(), 31);
        // The hungry one gets what the others leave; spare is spread evenly.
        assert_eq!(fair_targets(30, &[2, 100, 3]), vec![2, 25, 3]);
        assert_eq!(fair_targets(30, &[0, 0, 6]), vec![8, 8, 14]);
        assert_eq!(fair_targets(30, &[40]), vec![30]);
        assert_eq!(fair_targets(30, &[]), Vec::<u32>::new());
        assert_eq!(fair_targets(0, &[5, 5]), vec![0, 0]);
        for demands in [[0, 0, 0], [1, 50, 7], [9, 10, 11], [u32::MAX, 0, u32::MAX]] {
            let t = fair_targets(30, &demands);
            assert_eq!(t.iter().sum::<u32>(), 30, "{demands:?} -> {t:?}");
            // Whoever wants an equal part gets one.
            for (d, t) in demands.iter().zip(&t) {
                assert!(*t >= (*d).min(10), "{demands:?} -> {t:?}");
            }
        }
    }

    #[test]
    fn a_lone_instance_gets_the_whole_budget() {
        assert_eq!(decide_share(30, &[], "a", 0, 0), (30, 30));
        assert_eq!(decide_share(30, &[row("a", 30, 3)], "a", 0, 30), (30, 30));
    }

    #[test]
    fn a_grant_never_takes_what_others_hold() {
        // b holds 25 it no longer wants: a is planned for more but may use only the 5 left.
        let rows = [row("b", 25, 0)];
        assert_eq!(decide_share(30, &rows, "a", 40, 0), (5, 5));
        // Once b has shrunk (to its 4 of headroom plus half the spare), a gets the rest.
        let rows = [row("b", 4, 0)];
        assert_eq!(decide_share(30, &rows, "a", 40, 5), (26, 26));
    }

    #[test]
    fn a_shrinking_share_is_recorded_at_what_is_held() {
        // Three hungry instances: a holds 20 and must come down to 10; it records 20 until
        // it has closed connections.
        let rows = [row("a", 20, 30), row("b", 5, 30), row("c", 5, 30)];
        assert_eq!(decide_share(30, &rows, "a", 30, 20), (10, 20));
    }

    #[test]
    fn shares_of_instances_deciding_in_turn_never_pass_the_budget() {
        // Each instance decides under the lock from the others' recorded shares; whatever
        // the demands, the recorded shares of usable permits stay within the budget.
        let ids = ["a", "b", "c"];
        let mut shares = [0_u32; 3];
        let demands = [[40, 0, 3], [0, 40, 40], [12, 12, 12], [0, 0, 0], [50, 1, 1]];
        for round in demands.iter().cycle().take(40) {
            for (i, id) in ids.iter().enumerate() {
                let rows: Vec<ShareRow> = ids
                    .iter()
                    .zip(shares)
                    .zip(round)
                    .map(|((id, s), d)| row(id, s, *d))
                    .collect();
                let (usable, _) = decide_share(30, &rows, id, round[i], shares[i]);
                shares[i] = usable;
                assert!(shares.iter().sum::<u32>() <= 30, "{shares:?}");
            }
        }
    }
}
