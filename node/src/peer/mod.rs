//! The peer transport: Raft traffic and forwarded requests between nodes
//! over gRPC (`idgraph.v1.RaftTransport`). With the client-facing adapters
//! (`service`) and the process wiring (`server`, `main`), this is the only
//! code that names the generated proto types.
//!
//!
//! Every shard's messages to a node share one HTTP/2 connection ([`Peers`]
//! keeps one channel per address), so 16 or 64 shards do not multiply
//! connections. AppendEntries (heartbeats included) of all shards to the
//! same node are also batched: a sender task per peer takes every append
//! waiting when it is free and sends them as one `AppendBatch` call, so
//! under load many shards share one round trip. Payloads are MessagePack of
//! openraft's own request and result types.

//!
//! - `client`: [`Peers`] (channels and batchers) and [`ShardNetwork`],
//!   openraft's network over them; requests forwarded to a leader.
//! - `server`: [`RaftTransportService`], which hands each message to the
//!   replica it names.

mod client;
mod server;

pub use client::{Peers, ShardNetwork, ShardNetworkFactory};
pub use server::RaftTransportService;
