//! Workloads: how the generated events and look-ups are driven against a
//! peer by N concurrent clients, and what is measured (throughput and an
//! HDR histogram of latencies).

use crate::peers::{to_request, Idgraph, Peer};
use crate::world::{Event, RawId, World};
use hdrhistogram::Histogram;
use idgraph_proto::v1 as pb;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Every event of the world, once (redeliveries included).
    Ingest,
    /// Look-ups of identifiers of the loaded world (loaded first, untimed).
    Lookup,
    /// 80 % look-ups of loaded identifiers, 20 % new events.
    Mixed,
    /// Anonymous browsing and sign-ups loaded first (untimed); timed: the
    /// logins and orders, nearly each of which joins existing profiles that
    /// live on different shards.
    MergeHeavy,
    /// PostgreSQL only: every event loaded at once, then stitched by label
    /// propagation in SQL (the warehouse way); the time is load plus stitch.
    Batch,
}

/// Measured figures of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measured {
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub ops_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// The latency distribution: (quantile, µs) at [`CDF_QUANTILES`].
    pub cdf: Vec<(f64, u64)>,
}

/// Quantiles at which the latency distribution is reported (for plots).
pub const CDF_QUANTILES: [f64; 15] = [0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0];

struct Recorder {
    hist: Mutex<Histogram<u64>>,
    errors: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
            errors: AtomicUsize::new(0),
            first_error: Mutex::new(None),
        }
    }

    fn record<T>(&self, started: Instant, r: &Result<T, String>) {
        match r {
            Ok(_) => {
                if let Ok(mut h) = self.hist.lock() {
                    let _ = h.record((started.elapsed().as_micros() as u64).max(1));
                }
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut f) = self.first_error.lock() {
                    f.get_or_insert_with(|| e.clone());
                }
            }
        }
    }

    fn finish(&self, elapsed: Duration) -> Measured {
        let h = self.hist.lock().map(|h| h.clone()).unwrap_or_else(|_| Histogram::new(3).expect("histogram"));
        let ops = h.len();
        Measured {
            ops,
            errors: self.errors.load(Ordering::Relaxed) as u64,
            first_error: self.first_error.lock().ok().and_then(|f| f.clone()),
            seconds: elapsed.as_secs_f64(),
            ops_per_s: ops as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            cdf: CDF_QUANTILES.iter().map(|q| (*q, h.value_at_quantile(*q))).collect(),
        }
    }
}

/// Runs `client(c, recorder)` for each of `clients` callers at once and
/// measures them together, from before the first starts to after the last
/// ends.
async fn drive<F, Fut>(clients: usize, client: F) -> Measured
where
    F: Fn(usize, Arc<Recorder>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rec = Arc::new(Recorder::new());
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients).map(|c| tokio::spawn(client(c, rec.clone()))).collect();
    for t in tasks {
        let _ = t.await;
    }
    rec.finish(started.elapsed())
}

/// Splits a world's events for a workload: (loaded first, untimed; timed).
pub fn split(world: &World, workload: Workload) -> (Vec<Event>, Vec<Event>) {
    let events = world.events.clone();
    match workload {
        Workload::Ingest | Workload::Batch => (Vec::new(), events),
        Workload::Lookup => (events, Vec::new()),
        Workload::Mixed => {
            let half = events.len() / 2;
            let (a, b) = events.split_at(half);
            (a.to_vec(), b.to_vec())
        }
        Workload::MergeHeavy => events.into_iter().partition(|e| !e.ids.iter().any(|i| i.kind == "user_id")),
    }
}

/// Sends `events` with `clients` concurrent callers, one event per call.
pub async fn ingest_unary<P: Peer>(peer: Arc<P>, events: Arc<Vec<Event>>, clients: usize) -> Measured {
    let next = Arc::new(AtomicUsize::new(0));
    drive(clients, |c, rec| {
        let (peer, events, next) = (peer.clone(), events.clone(), next.clone());
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(e) = events.get(i) else { break };
                let t = Instant::now();
                let r = peer.ingest(c, e).await;
                rec.record(t, &r);
            }
        }
    })
    .await
}

/// Sends `events` over `clients` IdentifyStream calls, up to `window`
/// events in flight on each; latency is from an event's send to its answer.
pub async fn ingest_stream(peer: &Idgraph, events: Arc<Vec<Event>>, clients: usize, window: usize) -> Measured {
    let per = events.len().div_ceil(clients.max(1));
    drive(clients, |c, rec| {
        let chunk: Vec<Event> = events.iter().skip(c * per).take(per).cloned().collect();
        let channel = peer.channel_of(c);
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::IdentifyRequest>(window);
            let permits = Arc::new(tokio::sync::Semaphore::new(window));
            let sent_at = Arc::new(Mutex::new(std::collections::VecDeque::new()));
            let mut g = pb::identity_graph_client::IdentityGraphClient::new(channel);
            let sender = {
                let (permits, sent_at) = (permits.clone(), sent_at.clone());
                tokio::spawn(async move {
                    for e in chunk {
                        let Ok(p) = permits.clone().acquire_owned().await else { break };
                        p.forget();
                        if let Ok(mut q) = sent_at.lock() {
                            q.push_back(Instant::now());
                        }
                        if tx.send(to_request(&e)).await.is_err() {
                            break;
                        }
                    }
                })
            };
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            match g.identify_stream(stream).await {
                Ok(resp) => {
                    let mut answers = resp.into_inner();
                    loop {
                        match answers.message().await {
                            Ok(Some(a)) => {
                                let t = sent_at.lock().ok().and_then(|mut q| q.pop_front()).unwrap_or_else(Instant::now);
                                let r = match a.error {
                                    Some(e) => Err(format!("event error {}: {}", e.code, e.message)),
                                    None => Ok(()),
                                };
                                rec.record(t, &r);
                                permits.add_permits(1);
                            }
                            Ok(None) => break,
                            Err(s) => {
                                rec.record(Instant::now(), &Err::<(), _>(format!("stream: {s}")));
                                break;
                            }
                        }
                    }
                }
                Err(s) => rec.record(Instant::now(), &Err::<(), _>(format!("stream: {s}"))),
            }
            let _ = sender.await;
        }
    })
    .await
}

/// `count` look-ups of identifiers drawn from `ids`, by `clients` callers:
/// each as soon as the previous answer came (closed loop), or, with a
/// `rate`, at evenly spaced moments (open loop).
pub async fn lookups<P: Peer>(peer: Arc<P>, ids: Arc<Vec<RawId>>, clients: usize, count: usize, rate: Option<f64>, seed: u64) -> Measured {
    if ids.is_empty() {
        return drive(0, |_, _| async {}).await;
    }
    // With a rate, a pacer thread releases one look-up every `1 / rate`
    // seconds (a thread's sleep is precise to tens of microseconds, where
    // tokio's timer wakes on millisecond ticks and would release the
    // clients in bursts); an idle client takes it, and it is timed from
    // the moment it was due, so a backlog counts (no coordinated omission).
    let due = rate.filter(|r| *r > 0.0).map(|r| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        let period = std::time::Duration::from_secs_f64(1.0 / r);
        std::thread::spawn(move || {
            let mut at = Instant::now();
            for _ in 0..count {
                if let Some(wait) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if tx.send(at).is_err() {
                    return;
                }
                at += period;
            }
        });
        Arc::new(tokio::sync::Mutex::new(rx))
    });
    let done = Arc::new(AtomicUsize::new(0));
    drive(clients, |c, rec| {
        let (peer, ids, done, due) = (peer.clone(), ids.clone(), done.clone(), due.clone());
        async move {
            let mut rng = fastrand::Rng::with_seed(seed ^ c as u64);
            loop {
                let t = match &due {
                    Some(due) => match due.lock().await.recv().await {
                        Some(at) => at,
                        None => break,
                    },
                    None if done.fetch_add(1, Ordering::Relaxed) < count => Instant::now(),
                    None => break,
                };
                let r = peer.lookup(c, &ids[rng.usize(0..ids.len())]).await;
                rec.record(t, &r);
            }
        }
    })
    .await
}

/// 80 % look-ups of `known` identifiers and 20 % of the `fresh` events.
pub async fn mixed<P: Peer>(peer: Arc<P>, known: Arc<Vec<RawId>>, fresh: Arc<Vec<Event>>, clients: usize, seed: u64) -> Measured {
    let next = Arc::new(AtomicUsize::new(0));
    drive(clients, |c, rec| {
        let (peer, known, fresh, next) = (peer.clone(), known.clone(), fresh.clone(), next.clone());
        async move {
            let mut rng = fastrand::Rng::with_seed(seed ^ (c as u64) << 8);
            loop {
                let t = Instant::now();
                if rng.u8(0..5) == 0 {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(e) = fresh.get(i) else { break };
                    let r = peer.ingest(c, e).await;
                    rec.record(t, &r);
                } else if !known.is_empty() {
                    let r = peer.lookup(c, &known[rng.usize(0..known.len())]).await;
                    rec.record(t, &r);
                }
            }
        }
    })
    .await
}
