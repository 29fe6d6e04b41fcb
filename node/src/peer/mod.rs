//! The peer transport: Raft traffic and forwarded requests between nodes
//! over gRPC (`idgraph.v1.RaftTransport`). With the client-facing adapters
//! (`service`) and the process wiring (`server`, `main`), this is the only
//! code that names the generated proto types.
//!
//!
//! Every shard's messages to a node share one HTTP/2 connection ([`Peers`]
//! keeps one channel per address), so 16 or 64 shards do not multiply
//! connections. The frequent traffic, AppendEntries of every shard
//! (heartbeats included) and requests forwarded to shard leaders, goes
//! over one long-lived `Exchange` stream per peer: a sender task puts
//! every call waiting when it is free into one frame, the peer serves each
//! call as its own task and answers it by id as soon as it is done, in
//! frames of the answers ready together. So under load many shards share
//! one frame, and a call costs a few bytes on an open stream instead of an
//! HTTP/2 stream of its own (headers, trailers, a task on each side). A
//! peer that does not know `Exchange` (an older version during a rolling
//! upgrade) gets one `AppendEntries` or `Forward` call per message.
//! Votes, snapshots and the rare queries stay unary calls. Payloads are
//! MessagePack of openraft's own request and result types.
//!
//! - `client`: [`Peers`] (channels and exchanges) and [`ShardNetwork`],
//!   openraft's network over them; requests forwarded to a leader.
//! - `server`: [`RaftTransportService`], which hands each message to the
//!   replica it names.

mod client;
mod server;

pub use client::{Peers, ShardNetwork, ShardNetworkFactory};
pub use server::RaftTransportService;

/// Calls (or answers) in one exchange frame at most, either way.
const MAX_FRAME_CALLS: usize = 256;

/// Moves what waits in `rx` into `into` without waiting, until `into`
/// holds `max`: a frame is everything ready when its sender gets to send.
fn take_ready<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, into: &mut Vec<T>, max: usize) {
    while into.len() < max {
        match rx.try_recv() {
            Ok(more) => into.push(more),
            Err(_) => break,
        }
    }
}
