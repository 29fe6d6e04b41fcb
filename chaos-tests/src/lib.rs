//! idgraph-chaos: a fault-injection harness that runs real `idgraph-node`
//! processes, injects faults, and checks the cluster's promises over the
//! recorded history and the final state.
//!
//! Module map:
//! - [`cluster`]: the node processes (start, `kill -9`, SIGSTOP/SIGCONT,
//!   restart, reaping the ones that exit on their own).
//! - [`proxy`]: the fault-injecting TCP links between nodes (cuts, latency).
//! - [`nemesis`]: the seeded fault schedule.
//! - [`workload`]: the concurrent clients and the history they record.
//! - [`linearizability`]: a Porcupine-style checker and the graph model.
//! - [`checker`]: the checkers over the history and the final state.
//! - [`harness`]: a whole run, start to report; [`report`]: its report.

pub mod canary;
pub mod checker;
pub mod cluster;
pub mod harness;
pub mod linearizability;
pub mod nemesis;
pub mod proxy;
pub mod report;
pub mod workload;
