//! The node's one request error: what the router answers for any request,
//! whatever shard or transaction failed below it. Lower layers keep their
//! own errors where they say more (`ShardFailure` for one shard, carried
//! through Raft and between nodes; `TxnError` for a cross-shard commit);
//! the router turns them into this, and only the gRPC edge turns this into
//! a `tonic::Status`.

use idgraph_core::engine::EngineError;

/// Why a request failed, classified by what the caller must do. The
/// router, the placement loop and the gRPC adapters share it;
/// `service::status` maps it to a gRPC status, in one place.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The shard cannot take requests now (restarting, stopping): retry.
    #[error("shard {shard} is unavailable: {reason}")]
    Unavailable { shard: String, reason: String },
    /// More writes arrived than the shard's log takes; nothing changed:
    /// retry after a backoff.
    #[error("shard {shard} is overloaded: {reason}")]
    Overloaded { shard: String, reason: String },
    /// The node's disk is full; nothing changed: retry once space is freed.
    #[error(
        "the disk of the node leading shard {shard} is full: it takes no new writes until space is freed on it, then resumes by itself"
    )]
    DiskFull { shard: String },
    /// Concurrent requests kept conflicting; nothing changed: retry.
    #[error("{0}")]
    Aborted(String),
    /// A bug: nothing the caller can do.
    #[error("internal error: {0}")]
    Internal(String),
}
