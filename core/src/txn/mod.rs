//! The pure half of cross-shard transactions: what one shard does with each
//! step ([`participant`]) and the view of several shards a coordinator runs
//! the engine over ([`read_set`]). The protocol, its recovery rule and why
//! its invariants hold are told in `idgraph-node`'s `txn` module, which
//! holds the coordinator (it talks to shards, so it lives in the shell).

pub mod participant;
pub mod read_set;

#[cfg(test)]
mod tests;

pub use participant::{apply_op, lock_on, prepared_before, read_key, KeyRead, LockRecord, TxnOp, TxnReply};
pub use read_set::ReadSet;
