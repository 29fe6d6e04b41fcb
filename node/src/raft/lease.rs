//! Leader leases: linearizable reads on a leader without a round trip.
//!
//! A linearizable read must see every write acknowledged before it
//! arrived. On the leader of the current term that holds once (1) no other
//! replica can have been elected meanwhile and (2) the leader's state
//! machine has applied what its term's first entry committed: openraft
//! answers a write only after the leader applied it, so every write
//! acknowledged in this term is already in the leader's state.
//!
//! A round of `ensure_linearizable` gives both: a quorum acknowledged a
//! heartbeat sent after the round started, and the leader applied up to the
//! commit point it saw. The lease stretches (1) over a while after that:
//!
//! - Every quorum that could elect another leader contains a replica that
//!   acknowledged the round, at a moment `a` after the round started at `t`.
//! - That replica, as a follower, refuses to vote while its vote is
//!   committed and younger than `election_timeout_max` (openraft 0.9's
//!   `handle_vote_req`; every heartbeat renews it), and campaigns itself only
//!   after `election_timeout_min` without a heartbeat. So no election can
//!   finish before `a + election_timeout_min >= t + election_timeout_min`.
//! - If the replica in common is the leader itself, it changed its vote in
//!   its Raft core before it answered the candidate (its metrics may say so
//!   only later). So a read under the lease is confirmed after it read, by
//!   a check of the vote inside the Raft core that started after the read
//!   (checks are shared by the reads waiting, like rounds): if the leader
//!   still holds the lease's vote then, no candidate has its vote yet, and
//!   any other quorum is held off by the first point.
//! - The lease holds only while this replica leads in the term and under
//!   the membership the round saw (a new configuration changes quorums).
//! - Every node must run the same `raft_heartbeat_ms` (the lease is
//!   computed from the leader's election timeout, the protection comes from
//!   the followers').
//!
//! The lease therefore runs from the round's start for half of
//! `election_timeout_min` (the other half absorbs clock-rate differences
//! and scheduling delays), and a read served under it checks the lease
//! again after reading: a read that took longer is discarded and served
//! after a round. A leadership transfer revokes the lease before the leader
//! lets the target campaign (the target campaigns at once, not after an
//! election timeout, and may win with the leader's vote or with that of a
//! replica that did not acknowledge the round); only a round that started
//! after the transfer was abandoned, or one in a new term, grants a lease
//! again (a round that started before may count the target's
//! acknowledgement from before it campaigned).
//!
//! A read served in the second half of the lease starts a round in the
//! background, so under a steady load of reads the lease is renewed before
//! it lapses and no read waits for a round.
//!
//! The lease's bookkeeping is plain data: time is passed in, so the rules
//! are unit-tested without a clock or a Raft group.

use openraft::{LogId, Vote};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What identifies a leadership the lease is for: the leader's committed
/// vote (its term and node) and the membership configuration's log id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leadership {
    pub vote: Vote<u64>,
    pub membership: Option<LogId<u64>>,
}

impl Leadership {
    pub fn term(&self) -> u64 {
        self.vote.leader_id().term
    }
}

#[derive(Clone, Copy, Debug)]
struct Held {
    of: Leadership,
    until: Instant,
}

#[derive(Debug, Default)]
struct State {
    held: Option<Held>,
    /// A term whose leadership is being handed over: no lease in it.
    revoked: Option<u64>,
    /// When the lease was last revoked or resumed: a round that started
    /// before it grants nothing (it may have been acknowledged by a
    /// transfer's target before that target campaigned).
    changed_at: Option<Instant>,
    /// A round renewing the lease is under way.
    renewing: bool,
}

/// A replica's leader lease. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct LeaderLease {
    length: Duration,
    state: Mutex<State>,
    /// Reads served under the lease, and after a round, not yet taken by
    /// the metrics.
    leased_reads: AtomicU64,
    round_reads: AtomicU64,
}

impl LeaderLease {
    /// A lease of half `election_timeout_min` after each confirmed round.
    pub fn for_election_timeout(election_timeout_min: Duration) -> LeaderLease {
        LeaderLease {
            length: election_timeout_min / 2,
            state: Mutex::new(State::default()),
            leased_reads: AtomicU64::new(0),
            round_reads: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A round that started at `started` confirmed `of` (the same before
    /// and after the round): the lease runs until `started + length`.
    pub fn confirmed(&self, of: Leadership, started: Instant) {
        let mut s = self.state();
        if s.revoked == Some(of.term()) || s.changed_at.is_some_and(|c| started <= c) {
            return;
        }
        let until = started + self.length;
        s.held = match s.held {
            Some(h) if h.of == of && h.until >= until => Some(h),
            _ => Some(Held { of, until }),
        };
    }

    /// Whether a read arriving `now` may be served without a round, by a
    /// replica that leads `current`.
    pub fn holds(&self, current: Leadership, now: Instant) -> bool {
        let s = self.state();
        s.revoked != Some(current.term()) && s.held.is_some_and(|h| h.of == current && now < h.until)
    }

    /// No lease in `term` from now on (a leadership transfer begins).
    pub fn revoke(&self, term: u64) {
        let mut s = self.state();
        s.held = None;
        s.revoked = Some(term);
        s.changed_at = Some(Instant::now());
    }

    /// The transfer was abandoned: rounds that start from now on may grant
    /// leases again.
    pub fn resume(&self) {
        let mut s = self.state();
        s.revoked = None;
        s.changed_at = Some(Instant::now());
    }

    /// The vote of the leadership the lease is held for, if one is.
    pub fn held_vote(&self) -> Option<Vote<u64>> {
        self.state().held.map(|h| h.of.vote)
    }

    /// Whether a read served under the lease at `now` should start a round
    /// in the background: more than half the lease has run and no renewal
    /// is under way (then the caller has claimed it and calls
    /// [`LeaderLease::renewed`] when the round ends). Under a steady load of
    /// reads the lease is renewed before it lapses, and no read waits for a
    /// round.
    pub fn claim_renewal(&self, now: Instant) -> bool {
        let mut s = self.state();
        let due = s.held.is_some_and(|h| h.until.saturating_duration_since(now) < self.length / 2);
        if due && !s.renewing {
            s.renewing = true;
            return true;
        }
        false
    }

    /// The renewal round claimed by [`LeaderLease::claim_renewal`] ended.
    pub fn renewed(&self) {
        self.state().renewing = false;
    }

    /// Counts a linearizable read, served under the lease or after a round.
    pub fn count_read(&self, leased: bool) {
        let counter = if leased { &self.leased_reads } else { &self.round_reads };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The reads counted since the last call: (under the lease, after a round).
    pub fn take_read_counts(&self) -> (u64, u64) {
        (self.leased_reads.swap(0, Ordering::Relaxed), self.round_reads.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(term: u64, membership_index: u64) -> Leadership {
        let mut vote = Vote::new(term, 1);
        vote.commit();
        Leadership { vote, membership: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), membership_index)) }
    }

    #[test]
    fn a_lease_runs_half_the_election_timeout_from_the_rounds_start() {
        let lease = LeaderLease::for_election_timeout(Duration::from_millis(300));
        let t = Instant::now();
        assert!(!lease.holds(of(2, 1), t), "no round, no lease");
        lease.confirmed(of(2, 1), t);
        assert!(lease.holds(of(2, 1), t + Duration::from_millis(149)));
        assert!(!lease.holds(of(2, 1), t + Duration::from_millis(150)));
        // A later round extends it; an older one does not shorten it.
        lease.confirmed(of(2, 1), t + Duration::from_millis(100));
        lease.confirmed(of(2, 1), t + Duration::from_millis(10));
        assert!(lease.holds(of(2, 1), t + Duration::from_millis(249)));
        assert!(!lease.holds(of(2, 1), t + Duration::from_millis(250)));
    }

    #[test]
    fn reads_late_in_a_lease_renew_it_once_at_a_time() {
        let lease = LeaderLease::for_election_timeout(Duration::from_millis(300));
        let t = Instant::now();
        assert!(!lease.claim_renewal(t), "no lease to renew");
        lease.confirmed(of(2, 1), t);
        assert!(!lease.claim_renewal(t + Duration::from_millis(50)), "early in the lease");
        assert!(lease.claim_renewal(t + Duration::from_millis(80)), "past half of it");
        assert!(!lease.claim_renewal(t + Duration::from_millis(90)), "one renewal at a time");
        lease.confirmed(of(2, 1), t + Duration::from_millis(80));
        lease.renewed();
        assert!(!lease.claim_renewal(t + Duration::from_millis(100)), "renewed");
        assert!(lease.claim_renewal(t + Duration::from_millis(160)));
    }

    #[test]
    fn a_new_term_or_membership_needs_a_round_of_its_own() {
        let lease = LeaderLease::for_election_timeout(Duration::from_millis(300));
        let t = Instant::now();
        lease.confirmed(of(2, 1), t);
        assert!(!lease.holds(of(3, 1), t), "another term");
        assert!(!lease.holds(of(2, 7), t), "another membership");
        lease.confirmed(of(3, 1), t);
        assert!(lease.holds(of(3, 1), t));
        assert!(!lease.holds(of(2, 1), t), "the old term's lease is gone");
    }

    #[test]
    fn a_transfer_revokes_the_lease_until_it_is_abandoned_or_the_term_changes() {
        let lease = LeaderLease::for_election_timeout(Duration::from_millis(300));
        let t = Instant::now();
        lease.confirmed(of(2, 1), t);
        lease.revoke(2);
        assert!(!lease.holds(of(2, 1), t));
        // Rounds during the transfer confirm reads but grant no lease.
        let during = Instant::now() + Duration::from_millis(1);
        lease.confirmed(of(2, 1), during);
        assert!(!lease.holds(of(2, 1), during));
        // Won again in a later term, by a round after the revocation.
        let later = Instant::now() + Duration::from_millis(1);
        lease.confirmed(of(4, 1), later);
        assert!(lease.holds(of(4, 1), later));
        // Abandoned: a round that started before the transfer was given up
        // grants nothing; one that started after it does.
        let before = Instant::now();
        lease.revoke(4);
        lease.resume();
        lease.confirmed(of(4, 1), before);
        assert!(!lease.holds(of(4, 1), before), "a round from before the transfer");
        let after = Instant::now() + Duration::from_millis(1);
        lease.confirmed(of(4, 1), after);
        assert!(lease.holds(of(4, 1), after));
        assert_eq!(lease.held_vote(), Some(of(4, 1).vote));
    }
}
