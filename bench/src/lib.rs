//! idgraph-bench: drives idgraph, PostgreSQL and sled alone with the same
//! generated events and concurrency, and measures them side by side.
//!
//! Module map:
//! - [`world`]: the event generator with its ground truth, and pairwise
//!   precision and recall of the profiles a system produced.
//! - [`peers`]: the systems driven, behind one [`peers::Peer`] trait.
//! - [`run`]: the workloads and what they measure (HDR histograms).

pub mod peers;
pub mod run;
pub mod world;
