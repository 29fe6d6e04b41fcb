//! When a replica builds its next snapshot.
//!
//! A build writes the whole shard into an image file (`docs/storage.md`,
//! *Snapshot images*): its length grows with the shard, from milliseconds
//! to over a minute (14 s at about 5.5 million identifiers, 39 s at 11.5
//! million, 83 s at 17.5 million on a 2-core machine, `bench/analysis.md`).
//! Writes go on meanwhile, but the build takes a core and the disk, and the
//! writes it holds back must be stored after it. openraft's own policy
//! builds after a fixed number of log entries, so as a shard grows its
//! builds would take an ever larger share of the time, and a shard of a
//! hundred million identifiers would spend most of it building.
//!
//! So openraft's policy is off (`SnapshotPolicy::Never`), and each replica
//! asks for a build ([`SnapshotPace::due`], checked twice a second) once
//! both hold:
//! - at least `raft_snapshot_logs` entries were applied since the last
//!   snapshot (the old rule, which keeps a small shard's log short);
//! - the last build ended at least [`IDLE_PER_BUILD`] times its length ago,
//!   so that builds take at most a tenth of the time, however large the
//!   shard.
//!
//! The log grows meanwhile: after a 39 s build, about six minutes of
//! entries until the next. That costs disk, not safety: an entry leaves the log
//! only once a snapshot holds it, whichever policy asks for the snapshot.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Time without a build after a build, as a multiple of its length.
pub const IDLE_PER_BUILD: u32 = 9;

/// The last build of a replica: when it ended and how long it took.
#[derive(Default)]
pub struct SnapshotPace {
    last: Mutex<Option<(Instant, Duration)>>,
}

impl SnapshotPace {
    /// Notes a build that started at `started` and has just ended.
    pub fn built(&self, started: Instant) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some((Instant::now(), started.elapsed()));
        }
    }

    /// Whether a build is due at `now`, with `entries` applied since the
    /// last snapshot and a build wanted every `every` entries.
    pub fn due(&self, entries: u64, every: u64, now: Instant) -> bool {
        if entries < every {
            return false;
        }
        let last = self.last.lock().ok().and_then(|l| *l);
        last.is_none_or(|(ended, took)| now.saturating_duration_since(ended) >= took * IDLE_PER_BUILD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_is_due_after_enough_entries_and_nine_times_the_last_build_s_length() {
        let pace = SnapshotPace::default();
        let now = Instant::now();
        assert!(!pace.due(99, 100, now), "too few entries");
        assert!(pace.due(100, 100, now), "no build yet: the entries decide");
        // A build of two seconds that ended at `ended`.
        let ended = now;
        *pace.last.lock().unwrap() = Some((ended, Duration::from_secs(2)));
        assert!(!pace.due(1_000_000, 100, ended + Duration::from_secs(17)), "17 s after a 2 s build");
        assert!(pace.due(1_000_000, 100, ended + Duration::from_secs(18)), "18 s after it");
        assert!(!pace.due(99, 100, ended + Duration::from_secs(60)), "time alone does not make one due");
        // A short build leaves the entries to decide, as before.
        pace.built(Instant::now());
        assert!(pace.due(100, 100, Instant::now() + Duration::from_millis(50)));
    }
}
