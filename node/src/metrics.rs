//! The node's Prometheus metrics (the `prometheus` crate; `/metrics` on
//! `metrics_listen`, served by `server`).
//!
//! Counters are counted where things happen (the gRPC layer for requests,
//! the router for resolved events and transactions); gauges of Raft state,
//! storage sizes and readiness are set when the endpoint is scraped, from
//! what the node knows then. Every name is in `deploy/metrics.txt`, which
//! the Grafana dashboard may use and nothing else (a test checks both).

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The gRPC methods requests are counted under; anything else is `other`
/// (the label's values stay bounded whatever clients send).
const METHODS: &[&str] = &[
    "Identify",
    "IdentifyStream",
    "GetProfile",
    "Merge",
    "Unmerge",
    "DeleteProfile",
    "GetMergeRecord",
    "ListHubs",
    "GetStats",
    "GetRuleSet",
    "PutRuleSet",
    "ListRuleSets",
    "StartCanary",
    "GetCanary",
    "ListCanaries",
    "PromoteCanary",
    "AbortCanary",
    "GetCluster",
    "AddNode",
    "RemoveNode",
    "TransferLeader",
    "GetDigests",
    "ListAudit",
    "Backup",
    "Restore",
    "AppendEntries",
    "AppendBatch",
    "Exchange",
    "Vote",
    "InstallSnapshot",
    "Forward",
    "ClusterMap",
    "Kpis",
    "Features",
    "Check",
    "Watch",
];

/// One node's metrics.
pub struct NodeMetrics {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    pub events: IntCounter,
    pub merges: IntCounter,
    pub conflicts: IntCounter,
    pub new_profiles: IntCounter,
    pub txn_retries: IntCounter,
    pub txn_aborts: IntCounter,
    pub events_forgotten: IntCounter,
    pub backup_held_steps: IntCounter,
    /// Linearizable reads on this node's leaders, by how leadership was
    /// confirmed: `lease` or `round` (a heartbeat round).
    pub linearizable_reads: IntCounterVec,
    /// Calls received over peers' exchanges, by kind: `append` or `forward`.
    pub peer_calls: IntCounterVec,
    /// Frames received over peers' exchanges (calls per frame is the
    /// batching).
    pub peer_frames: IntCounter,
    pub hubs: IntGauge,
    pub raft_role: IntGaugeVec,
    pub raft_term: IntGaugeVec,
    pub raft_last_log_index: IntGaugeVec,
    pub raft_applied_index: IntGaugeVec,
    pub raft_snapshot_index: IntGaugeVec,
    pub snapshot_bytes: IntGaugeVec,
    /// Memory held by a replica's applied writes not yet in sled's tree
    /// (they pile up while a snapshot build reads the shard).
    pub pending_write_bytes: IntGaugeVec,
    pub log_bytes: IntGauge,
    pub storage_bytes: IntGauge,
    pub ready: IntGauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Names and labels are constants of this file: an error is a bug that
    // the tests meet first.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl NodeMetrics {
    pub fn new() -> Arc<NodeMetrics> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let group_gauge = |name: &str, help: &str| {
            let g = must(IntGaugeVec::new(Opts::new(name, help), &["group"]));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let requests =
            must(IntCounterVec::new(Opts::new("idgraph_requests_total", "gRPC requests by method and status code"), &["method", "code"]));
        must(registry.register(Box::new(requests.clone())));
        let buckets = vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let request_seconds = must(HistogramVec::new(
            HistogramOpts::new("idgraph_request_duration_seconds", "time from a gRPC request to its response headers").buckets(buckets),
            &["method"],
        ));
        must(registry.register(Box::new(request_seconds.clone())));
        let linearizable_reads = must(IntCounterVec::new(
            Opts::new(
                "idgraph_linearizable_reads_total",
                "linearizable reads served by this node's leaders, by how leadership was confirmed",
            ),
            &["via"],
        ));
        must(registry.register(Box::new(linearizable_reads.clone())));
        for via in ["lease", "round"] {
            linearizable_reads.with_label_values(&[via]);
        }
        let peer_calls = must(IntCounterVec::new(
            Opts::new("idgraph_peer_calls_total", "calls received from other nodes over their exchanges, by kind"),
            &["kind"],
        ));
        must(registry.register(Box::new(peer_calls.clone())));
        for kind in ["append", "forward"] {
            peer_calls.with_label_values(&[kind]);
        }
        Arc::new(NodeMetrics {
            events: counter("idgraph_events_total", "identity events resolved (duplicates included)"),
            merges: counter("idgraph_merges_total", "profiles merged into others by events"),
            conflicts: counter("idgraph_conflicts_total", "identifiers an event could not attach because of a rule"),
            new_profiles: counter("idgraph_new_profiles_total", "profiles created by events"),
            txn_retries: counter("idgraph_txn_retries_total", "cross-shard transaction attempts that had to be run again"),
            txn_aborts: counter("idgraph_txn_aborts_total", "cross-shard transactions given up after conflicting too often"),
            events_forgotten: counter(
                "idgraph_events_forgotten_total",
                "event dedup records forgotten by this node's shard leaders once past their retention",
            ),
            backup_held_steps: counter(
                "idgraph_backup_held_steps_total",
                "cross-shard commit, apply and forget steps that waited for a backup's fence",
            ),
            linearizable_reads,
            peer_calls,
            peer_frames: counter("idgraph_peer_frames_total", "frames received from other nodes over their exchanges"),
            hubs: gauge("idgraph_hubs", "identifiers flagged as hubs on the shards this node leads"),
            raft_role: group_gauge("idgraph_raft_role", "this replica's Raft role: 0 follower, 1 candidate, 2 leader, 3 learner"),
            raft_term: group_gauge("idgraph_raft_term", "this replica's Raft term"),
            raft_last_log_index: group_gauge("idgraph_raft_last_log_index", "index of this replica's last log entry"),
            raft_applied_index: group_gauge("idgraph_raft_applied_index", "index of the last entry this replica applied"),
            raft_snapshot_index: group_gauge("idgraph_raft_snapshot_index", "index of this replica's last snapshot"),
            snapshot_bytes: group_gauge("idgraph_snapshot_bytes", "size of this replica's kept snapshot image"),
            pending_write_bytes: group_gauge(
                "idgraph_pending_write_bytes",
                "memory held by this replica's applied writes not yet in the graph store (they wait while a snapshot build reads the shard)",
            ),
            log_bytes: gauge("idgraph_log_bytes", "size of the node's Raft log files"),
            storage_bytes: gauge("idgraph_storage_bytes", "size of the node's graph store on disk"),
            ready: gauge("idgraph_ready", "1 when the node serves its shards (the health service says SERVING)"),
            requests,
            request_seconds,
            registry,
        })
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn observe(&self, method: &str, code: &str, seconds: f64) {
        self.requests.with_label_values(&[method, code]).inc();
        self.request_seconds.with_label_values(&[method]).observe(seconds);
    }

    /// The histogram of one method (tests).
    pub fn request_histogram(&self, method: &str) -> Histogram {
        self.request_seconds.with_label_values(&[method])
    }
}

/// `SCREAMING_SNAKE` name of a gRPC status code, as in the gRPC spec.
pub fn code_name(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    for (i, c) in debug.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A tower layer that counts every gRPC request and times it to its
/// response headers (the whole call for a unary method; the opening of a
/// stream).
#[derive(Clone)]
pub struct RequestMetricsLayer(pub Arc<NodeMetrics>);

impl<S> tower::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> RequestMetrics<S> {
        RequestMetrics { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct RequestMetrics<S> {
    inner: S,
    metrics: Arc<NodeMetrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RequestMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let method = METHODS.iter().find(|m| **m == method).copied().unwrap_or("other");
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            // An error returned by a handler travels in the headers
            // (trailers-only response); a success's status in the trailers.
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unavailable,
            };
            metrics.observe(method, &code_name(code), started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_follow_the_grpc_spec() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
    }

    #[test]
    fn every_listed_name_is_registered_and_nothing_else() {
        let m = NodeMetrics::new();
        // Vectors show up once they have a labelled child.
        m.observe("Identify", "OK", 0.001);
        m.raft_role.with_label_values(&["meta"]).set(2);
        for v in
            [&m.raft_term, &m.raft_last_log_index, &m.raft_applied_index, &m.raft_snapshot_index, &m.snapshot_bytes, &m.pending_write_bytes]
        {
            v.with_label_values(&["meta"]).set(1);
        }
        let mut exposed: Vec<String> = m.registry.gather().iter().map(|f| f.name().to_string()).collect();
        exposed.sort();
        let mut listed: Vec<String> = include_str!("../../deploy/metrics.txt")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        listed.sort();
        assert_eq!(exposed, listed);
    }
}
