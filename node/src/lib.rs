//! idgraph-node: the identity-graph server.
//!
//! Module map, from the pure core outwards:
//! - [`model`]: domain types (identifiers, profiles, merge records, changes).
//! - [`rules`]: the versioned rule set (normalisation, blocklists, limits,
//!   priorities, trait policies).
//! - [`engine`]: identity resolution; commands in, change sets out; no I/O.
//! - [`storage`]: the storage traits, the sled and in-memory stores, and
//!   their conformance suite.
//! - [`shard`]: one ractor actor per shard replica: runs the engine,
//!   applies and fsyncs its changes (group commit), answers reads.
//! - [`service`]: the tonic adapters for `idgraph.v1` (conversions and the
//!   one error-to-status mapping live there).
//! - [`config`] and [`server`]: configuration and process wiring.

pub mod config;
pub mod engine;
pub mod model;
pub mod raft;
pub mod router;
pub mod rules;
pub mod server;
pub mod service;
pub mod shard;
pub mod storage;
