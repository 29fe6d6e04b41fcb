//! idgraph-core: the pure heart of idgraph. Identifiers and rules go in,
//! change sets come out; nothing here does I/O, spawns a task or knows a
//! storage engine, Raft or gRPC (the crate depends on none of them, so the
//! boundary is a compile error, not a convention). `idgraph-node` is the
//! shell that carries the decisions out.
//!
//! Module map, from the bottom up:
//! - [`model`]: domain types (identifiers, profiles, merge records, change
//!   sets, shard ids).
//! - [`rules`]: the versioned rule set (normalisation, blocklists, limits,
//!   priorities, trait policies).
//! - [`graph`]: the graph as the engine reads it ([`graph::GraphRead`]) and
//!   a store applies it ([`graph::GraphStore`]), its key space over shards
//!   ([`graph::GraphKey`]), the record encoding, the staged overlay of a log
//!   entry and the in-memory store.
//! - [`engine`]: identity resolution; commands in, change sets out.
//! - [`txn`]: the participant steps of cross-shard transactions (prepare,
//!   commit, apply, abort, resolve) as pure functions of a shard's store,
//!   and the read set a coordinator runs the engine over.
//! - [`retention`]: event dedup records forgotten once their retention has
//!   passed.
//! - [`meta`]: the cluster map (nodes, replica placement, moves under way)
//!   and its placement planner.
//! - [`canary`]: canary rollouts of rule-set versions: the plan, the KPI
//!   samples, the judge and the replicated rollout state.
//! - [`checks`]: the graph's invariants, checked the same way by every test
//!   that checks a graph.

pub mod canary;
pub mod checks;
pub mod engine;
pub mod graph;
pub mod meta;
pub mod model;
pub mod retention;
pub mod rules;
pub mod txn;
