//! idgraph-node: the identity-graph server.
//!
//! Module map. The pure core (model, rules, engine, the transaction
//! participant steps, the cluster map and its planner) is the
//! `idgraph-core` crate; this crate is the shell that carries its decisions
//! out, from storage outwards:
//! - [`storage`]: the graph on sled, the node's one Raft log (group commit),
//!   the in-memory Raft log of tests, and the conformance suite.
//! - [`raft`]: a shard as an openraft group: log store, state machine (the
//!   engine over the graph store), snapshots, the peer transport, and the
//!   replica that serves requests on the leader.
//! - [`txn`]: the cross-shard commit protocol (its essay) and the
//!   coordinator that runs the engine over records read from several shards
//!   and commits the result atomically.
//! - [`shard`]: one supervised ractor actor per Raft group replica.
//! - [`router`]: stamps commands, runs them on one shard or as cross-shard
//!   transactions, forwards to leaders.
//! - [`placement`]: keeps a node's replicas in line with the cluster map;
//!   the metadata leader carries out replica moves.
//! - [`service`]: the tonic adapters for `idgraph.v1` (conversions and the
//!   one error-to-status mapping live there).
//! - [`error`]: the one request error, from the router to the gRPC edge.
//! - [`kpi`]: per rule-set version counts of resolved events, collected by
//!   the canary coordinator.
//! - [`canary`]: the canary coordinator on the metadata leader.
//! - [`auth`]: bearer tokens and roles, checked in front of every service.
//! - [`tls`]: TLS for the gRPC port (certificates reloaded) and for peers.
//! - [`reload`]: a value read from files and read again when they change.
//! - [`metrics`]: the Prometheus metrics and the request-counting layer.
//! - [`config`] and [`server`]: configuration and process wiring (the
//!   metrics endpoint and readiness included).
//! - [`crash`]: named crash points for crash tests (`failpoints` feature).

pub mod auth;
pub mod canary;
pub mod config;
pub mod crash;
pub mod error;
pub mod kpi;
pub mod metrics;
pub mod peer;
pub mod placement;
pub mod raft;
pub mod reload;
pub mod router;
pub mod server;
pub mod service;
pub mod shard;
pub mod storage;
pub mod tls;
pub mod txn;
