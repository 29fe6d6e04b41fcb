//! idgraph-node: the identity-graph server.
//!
//! Module map, from the pure core outwards:
//! - [`model`]: domain types (identifiers, profiles, merge records, changes).
//! - [`rules`]: the versioned rule set (normalisation, blocklists, limits,
//!   priorities, trait policies).
//! - [`engine`]: identity resolution; commands in, change sets out; no I/O.
//! - [`storage`]: the storage traits, the sled and in-memory stores, and
//!   their conformance suite.
//! - [`txn`]: cross-shard transactions: record placement, the participant
//!   steps (pure), and the coordinator that runs the engine over records
//!   read from several shards and commits the result atomically.
//! - [`raft`]: a shard as an openraft group: log store, state machine (the
//!   engine over the graph store), snapshots, gRPC transport, and the
//!   replica that serves requests on the leader.
//! - [`meta`]: the cluster map (nodes, replica placement, moves under way),
//!   the state of the metadata Raft group; pure, with the placement planner.
//! - [`placement`]: keeps a node's replicas in line with the cluster map;
//!   the metadata leader carries out replica moves.
//! - [`shard`]: one supervised ractor actor per Raft group replica.
//! - [`router`]: stamps commands, runs them on one shard or as cross-shard
//!   transactions, forwards to leaders.
//! - [`service`]: the tonic adapters for `idgraph.v1` (conversions and the
//!   one error-to-status mapping live there).
//! - [`config`] and [`server`]: configuration and process wiring.
//! - [`crash`]: named crash points for crash tests (`failpoints` feature).

pub mod config;
pub mod crash;
pub mod engine;
pub mod meta;
pub mod model;
pub mod placement;
pub mod raft;
pub mod router;
pub mod rules;
pub mod server;
pub mod service;
pub mod shard;
pub mod storage;
pub mod txn;
