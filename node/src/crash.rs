//! Crash points: places where a build with the `failpoints` feature can be
//! told to exit at once, as a crash there would end the process, so that
//! tests reach the states a crash leaves behind.
//!
//! Each point is named; `FAILPOINTS="<name>=return"` (the `fail` crate's
//! syntax, read at start-up) makes the process exit with status
//! [`CRASH_EXIT_CODE`] the first time it gets there, and
//! `FAILPOINTS="<name>=5%return"` on one pass in twenty. The points:
//!
//! | name | where |
//! |---|---|
//! | `txn::before-commit` | a coordinator has prepared every secondary, not yet asked the primary to commit |
//! | `txn::after-commit` | the primary committed; no secondary has applied |
//! | `txn::between-applies` | one secondary applied, the others not yet |
//! | `log::mid-write` | half of a batch of log records written to the node's log file: a torn tail |
//! | `raft::before-fsync` | log records written to the node's log file, not yet fdatasync'd or acknowledged |
//! | `raft::after-fsync` | log records fdatasync'd, not yet acknowledged to Raft |
//! | `storage::mid-apply` | the storage writer wrote an applied entry's redo record, its records partly (the entry may be acknowledged already) |
//! | `storage::mid-drain` | a snapshot build has read its shard; the writer is about to write one of the change sets it held back meanwhile (some earlier ones may be in the tree) |
//! | `raft::mid-snapshot` | a snapshot image's records written to its partial file, its header not yet complete; the image not kept |
//! | `raft::snapshot-install` | a received snapshot's records replaced the replica's, its log position not yet recorded |
//! | `placement::after-begin-move` | the metadata leader recorded a replica move; the group's membership is unchanged |
//! | `placement::after-membership-change` | the group's voters changed; the move is not yet recorded as finished |
//!
//! Without the feature a crash point compiles to nothing.
//!
//! Wait points ([`WAIT_POINTS`]) hold a state open that is otherwise brief,
//! so that tests can act while it lasts: `FAILPOINTS="<name>=sleep(MS)"`
//! makes the process wait there MS milliseconds, once it has printed
//! `wait point <name> reached` to its log.
//!
//! | name | where |
//! |---|---|
//! | `raft::snapshot-view` | a snapshot build holds its frozen view of the shard, its image not yet written |

/// Every crash point in the code (the table above).
pub const CRASH_POINTS: [&str; 12] = [
    "txn::before-commit",
    "txn::after-commit",
    "txn::between-applies",
    "log::mid-write",
    "raft::before-fsync",
    "raft::after-fsync",
    "storage::mid-apply",
    "storage::mid-drain",
    "raft::mid-snapshot",
    "raft::snapshot-install",
    "placement::after-begin-move",
    "placement::after-membership-change",
];

/// The crash points this build can stop at: all of them with the
/// `failpoints` feature, none without (`idgraph-node --crash-points`).
pub fn available() -> &'static [&'static str] {
    if cfg!(feature = "failpoints") {
        &CRASH_POINTS
    } else {
        &[]
    }
}

/// Exit status of a process stopped at a crash point.
pub const CRASH_EXIT_CODE: i32 = 86;

/// Exits the process here when the crash point `name` is configured.
pub fn crash_point(name: &str) {
    debug_assert!(CRASH_POINTS.contains(&name), "crash point {name} is not listed in CRASH_POINTS");
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |_| {
        eprintln!("crash point {name} reached: exiting");
        std::process::exit(CRASH_EXIT_CODE)
    });
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Every wait point in the code (the second table above).
pub const WAIT_POINTS: [&str; 1] = ["raft::snapshot-view"];

/// Waits here when the wait point `name` is configured.
pub fn wait_point(name: &str) {
    debug_assert!(WAIT_POINTS.contains(&name), "wait point {name} is not listed in WAIT_POINTS");
    #[cfg(feature = "failpoints")]
    {
        if fail::list().iter().any(|(point, _)| point == name) {
            eprintln!("wait point {name} reached");
        }
        fail::fail_point!(name);
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
