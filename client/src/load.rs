//! Bulk loading: a file of identity events sent to a cluster through
//! `IdentifyStream`, as `idgraphctl load` does.
//!
//! # How a load goes
//!
//! - The file is read twice, line by line: once to check every line (a bad
//!   line stops the load before anything is sent, and names the line) and
//!   to count the events, then again to send them. Memory holds the events
//!   in flight, not the file, so a load may be larger than memory.
//! - Each event goes to the node leading its home shard ([`Cluster`]), over
//!   one `IdentifyStream` per node ("lane"), with at most
//!   [`LoadOptions::window`] events of a lane unanswered; a lane's answers
//!   come in the order its events were sent.
//! - A lane whose node is lost (the stream broke, or was silent for
//!   [`LANE_TIMEOUT`] with events unanswered) is closed and its node left
//!   out of the routes; its unanswered events are sent again, wherever the
//!   routes then point, each after a pause of its own that doubles with
//!   each send (100 ms to 2 s). So is an event answered UNAVAILABLE (its
//!   shard had no leader for a moment), RESOURCE_EXHAUSTED (the node was
//!   over its queue bounds or its disk full) or ABORTED (concurrent
//!   requests kept changing the same profiles). An event id is applied once: an
//!   event that had been applied before its answer was lost is answered
//!   `duplicate` the next time, which is why the summary counts the sends
//!   beyond the first (`resent`) beside the duplicates.
//! - An event still unanswered after [`LoadOptions::attempts`] sends counts
//!   as failed, with its line and the last error; its outcome is unknown
//!   (it may have been applied). Any other error an event is answered with
//!   (a bad identifier, a limit) counts as failed at once: sending it again
//!   would not change the answer. A stream the node ends because of a
//!   message (a line over its message size limit, or one it cannot decode)
//!   fails its oldest unanswered event, the one the node refused, and
//!   sends the rest again at once; one that ends with UNAUTHENTICATED or
//!   PERMISSION_DENIED stops the load; any other end counts as the node
//!   lost.

use crate::{ClientError, Cluster};
use futures::StreamExt;
use idgraph_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a lane with events in flight may go without an answer before
/// it is taken for lost.
pub const LANE_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest pause before events are sent again.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// One identity event as a JSON line (the format of `idgraphctl load`):
/// `{"event_id":"e1","timestamp_ms":1700000000000,"identifiers":[{"type":"email","value":"ann@shop.com"}],"traits":{"plan":"pro"},"source":"web"}`
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventLine {
    pub event_id: String,
    #[serde(default)]
    pub timestamp_ms: i64,
    pub identifiers: Vec<IdentifierLine>,
    #[serde(default)]
    pub traits: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub source: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentifierLine {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl EventLine {
    pub fn to_request(&self) -> pb::IdentifyRequest {
        pb::IdentifyRequest {
            event_id: self.event_id.clone(),
            timestamp_ms: self.timestamp_ms,
            identifiers: self.identifiers.iter().map(|i| pb::Identifier { r#type: i.kind.clone(), value: i.value.clone() }).collect(),
            traits: (!self.traits.is_empty()).then(|| idgraph_proto::json::to_struct(&self.traits)),
            source: self.source.clone(),
        }
    }
}

/// The events of JSON-lines input, with their line numbers, read as they
/// are asked for. Blank lines and `#` comments are skipped; a malformed
/// line is an error naming it.
pub struct EventLines<R> {
    lines: std::io::Lines<R>,
    line: usize,
}

impl<R: BufRead> EventLines<R> {
    pub fn new(input: R) -> EventLines<R> {
        EventLines { lines: input.lines(), line: 0 }
    }
}

impl EventLines<std::io::BufReader<std::fs::File>> {
    /// The events of the file at `path`.
    pub fn open(path: &std::path::Path) -> Result<Self, ClientError> {
        let file =
            std::fs::File::open(path).map_err(|e| ClientError::Io(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))))?;
        Ok(EventLines::new(std::io::BufReader::new(file)))
    }
}

impl<R: BufRead> Iterator for EventLines<R> {
    type Item = Result<(usize, EventLine), ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let text = match self.lines.next()? {
                Ok(text) => text,
                Err(e) => return Some(Err(ClientError::Io(e))),
            };
            self.line += 1;
            let t = text.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let parsed = serde_json::from_str(t).map_err(|e| ClientError::BadLine { line: self.line, reason: e.to_string() });
            return Some(parsed.map(|ev| (self.line, ev)));
        }
    }
}

/// Checks every event of `events` and counts them, keeping none.
pub fn count_events<R: BufRead>(events: EventLines<R>) -> Result<u64, ClientError> {
    let mut count = 0;
    for event in events {
        event?;
        count += 1;
    }
    Ok(count)
}

/// What a bulk load did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LoadSummary {
    pub events: u64,
    pub profiles_created: u64,
    pub merges: u64,
    pub conflicts: u64,
    pub duplicates: u64,
    pub ignored_identifiers: u64,
    pub failed: u64,
    /// Sends beyond each event's first: after its node was lost, or after
    /// an answer of UNAVAILABLE, RESOURCE_EXHAUSTED or ABORTED (an event
    /// applied before its answer was lost is answered `duplicate` the next
    /// time, so these may add to `duplicates`).
    pub resent: u64,
    /// The first few per-event errors, with their line numbers.
    pub errors: Vec<String>,
    pub seconds: f64,
    pub events_per_second: f64,
}

impl LoadSummary {
    fn count(&mut self, line: usize, r: &pb::IdentifyResponse) {
        self.events += 1;
        if let Some(e) = &r.error {
            self.fail(line, format!("{} ({})", e.message, tonic::Code::from(e.code)));
            return;
        }
        self.profiles_created += r.created as u64;
        self.merges += r.merged as u64;
        self.conflicts += r.conflicts.len() as u64;
        self.duplicates += r.duplicate as u64;
        self.ignored_identifiers += r.ignored.len() as u64;
    }

    /// One event that failed, counted, and listed among the first errors.
    fn fail(&mut self, line: usize, why: String) {
        self.failed += 1;
        if self.errors.len() < 20 {
            self.errors.push(format!("line {line}: {why}"));
        }
    }
}

/// How a load sends.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Events of one node's stream sent and not yet answered, at most.
    pub window: usize,
    /// Sends of one event, at most (see [`LoadSummary::resent`] for what
    /// sends an event again).
    pub attempts: u32,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions { window: 256, attempts: 8 }
    }
}

/// Events to send (again): those whose pause is not over, by the end of
/// their pause, and those due, oldest first, waiting for room in their
/// lane.
#[derive(Default)]
struct Waiting {
    /// By the end of their pause, then a sequence number (ties).
    paused: std::collections::BTreeMap<(Instant, u64), Pending>,
    due: VecDeque<Pending>,
    seq: u64,
}

impl Waiting {
    fn len(&self) -> usize {
        self.paused.len() + self.due.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `event`, due at once or after `pause`.
    fn push(&mut self, event: Pending, pause: Duration) {
        if pause.is_zero() {
            self.due.push_back(event);
        } else {
            self.seq += 1;
            self.paused.insert((Instant::now() + pause, self.seq), event);
        }
    }

    /// Moves the events whose pause is over to the due ones.
    fn wake(&mut self, now: Instant) {
        while let Some(entry) = self.paused.first_entry().filter(|e| e.key().0 <= now) {
            self.due.push_back(entry.remove());
        }
    }

    /// When the next pause ends, if one is running.
    fn next_wake(&self) -> Option<Instant> {
        self.paused.first_key_value().map(|((until, _), _)| *until)
    }
}

/// Due events examined in one pass, at most: a pass after an answer has
/// about one free place to fill, so the rest of a backlog waits its turn.
const MAX_SCAN: usize = 64;

/// An event sent, or to be sent again.
struct Pending {
    line: usize,
    request: pb::IdentifyRequest,
    /// Its home shard (None: no route can be computed).
    home: Option<u32>,
    /// Sends so far.
    sends: u32,
}

/// One node's `IdentifyStream`.
struct Lane {
    /// The node it goes to (None: an endpoint given, no route known).
    node: Option<u64>,
    /// Where its events go; None once it takes no more.
    requests: Option<mpsc::Sender<pb::IdentifyRequest>>,
    /// Sent and not answered, oldest first.
    in_flight: VecDeque<Pending>,
    last_answer: Instant,
}

/// What a lane's reader saw.
enum LaneEvent {
    Answer(u64, pb::IdentifyResponse),
    /// The stream ended: cleanly (None) or with an error.
    Ended(u64, Option<tonic::Status>),
}

/// The lanes of a load, by lane id, and which takes each node's events.
struct Lanes {
    lanes: HashMap<u64, Lane>,
    /// The lane taking events for each node (None: no route known).
    open: HashMap<Option<u64>, u64>,
    next: u64,
    window: usize,
    seen: mpsc::UnboundedSender<LaneEvent>,
}

impl Lanes {
    /// Sends `p` over the lane of `node` (opened if none is), or gives it
    /// back if that lane's window is full.
    fn send(&mut self, cluster: &Cluster, node: Option<u64>, mut p: Pending) -> Option<Pending> {
        let id = match self.open.get(&node) {
            Some(id) => *id,
            None => {
                self.next += 1;
                let client = cluster.node_client(node);
                self.lanes.insert(self.next, open_lane(self.next, node, client, self.window, self.seen.clone()));
                self.open.insert(node, self.next);
                self.next
            }
        };
        let Some(lane) = self.lanes.get_mut(&id) else { return Some(p) };
        if lane.in_flight.len() >= self.window {
            return Some(p);
        }
        if let Some(tx) = &lane.requests {
            match tx.try_send(p.request.clone()) {
                // A closed stream loses the event: its reader reports the
                // end, and the event is sent again then.
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(_)) => return Some(p),
            }
        }
        if lane.in_flight.is_empty() {
            lane.last_answer = Instant::now();
        }
        p.sends += 1;
        lane.in_flight.push_back(p);
        None
    }

    /// Takes no more events: every stream ends once answered.
    fn close_all(&mut self) {
        self.open.clear();
        self.lanes.values_mut().for_each(|l| l.requests = None);
    }

    /// Removes lane `id`.
    fn remove(&mut self, id: u64) -> Option<Lane> {
        self.open.retain(|_, l| *l != id);
        self.lanes.remove(&id)
    }
}

/// Sends `events` to `cluster` (see the module doc) and tallies the
/// answers; `progress` is called with the number of events answered so
/// far. An error reading `events` stops the load with that error, and so
/// does a node refusing the credentials (events already sent stay sent).
pub async fn load(
    cluster: &Cluster,
    events: impl Iterator<Item = Result<(usize, EventLine), ClientError>>,
    options: &LoadOptions,
    mut progress: impl FnMut(u64),
) -> Result<LoadSummary, ClientError> {
    let started = Instant::now();
    let window = options.window.max(1);
    let mut events = events.fuse();
    let mut summary = LoadSummary::default();
    let (seen, mut answers) = mpsc::unbounded_channel();
    let mut lanes = Lanes { lanes: HashMap::new(), open: HashMap::new(), next: 0, window, seen };
    // Events to send (again); new events are read while fewer than a
    // window's worth wait.
    let mut waiting = Waiting::default();
    let mut input_done = false;
    let mut answered = 0u64;
    // Counts an event's outcome, once: its answer, or why it failed.
    let mut done = |summary: &mut LoadSummary, outcome: Result<&pb::IdentifyResponse, String>, line: usize| {
        match outcome {
            Ok(r) => summary.count(line, r),
            Err(why) => {
                summary.events += 1;
                summary.fail(line, why);
            }
        }
        answered += 1;
        progress(answered);
    };
    loop {
        // Due events go to their lanes while the lanes have room (a few at
        // a time, skipping the nodes found full); new events are read only
        // while none waits for room.
        let now = Instant::now();
        waiting.wake(now);
        let mut full = std::collections::HashSet::new();
        for _ in 0..waiting.due.len().min(MAX_SCAN) {
            let Some(p) = waiting.due.pop_front() else { break };
            let node = cluster.shard_node(p.home);
            if full.contains(&node) {
                waiting.due.push_back(p);
            } else if let Some(p) = lanes.send(cluster, node, p) {
                full.insert(node);
                waiting.due.push_back(p);
            }
        }
        let mut blocked = !waiting.due.is_empty();
        while !input_done && !blocked && waiting.len() < window {
            match events.next() {
                Some(Ok((line, e))) => {
                    let request = e.to_request();
                    let home = cluster.event_home(&request.identifiers);
                    let p = Pending { line, request, home, sends: 0 };
                    if let Some(p) = lanes.send(cluster, cluster.shard_node(home), p) {
                        waiting.due.push_back(p);
                        blocked = true;
                    }
                }
                Some(Err(e)) => return Err(e),
                None => input_done = true,
            }
        }
        if input_done && waiting.is_empty() {
            lanes.close_all();
            if lanes.lanes.values().all(|l| l.in_flight.is_empty()) {
                break;
            }
        }
        // Wait for an answer, a lane's time-out, or the end of a pause
        // (events whose pause is over wait for room: for an answer).
        let wake =
            lanes.lanes.values().filter(|l| !l.in_flight.is_empty()).map(|l| l.last_answer + LANE_TIMEOUT).chain(waiting.next_wake()).min();
        let event = match wake {
            Some(at) => tokio::time::timeout_at(at.into(), answers.recv()).await.ok(),
            None => Some(answers.recv().await),
        };
        let mut ended = Vec::new();
        match event {
            Some(Some(LaneEvent::Answer(id, r))) => {
                // Answers of a lane given up for lost are not counted: its
                // events were sent again.
                let Some(lane) = lanes.lanes.get_mut(&id) else { continue };
                let Some(p) = lane.in_flight.pop_front() else { continue };
                lane.last_answer = Instant::now();
                let retry = r.error.as_ref().is_some_and(|e| {
                    matches!(tonic::Code::from(e.code), tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::Aborted)
                });
                if retry && p.sends < options.attempts {
                    summary.resent += 1;
                    let wait = pause(p.sends);
                    waiting.push(p, wait);
                } else {
                    done(&mut summary, Ok(&r), p.line);
                }
            }
            Some(Some(LaneEvent::Ended(id, status))) => ended.push((id, status)),
            // Cannot happen: this function holds a sender of the channel.
            Some(None) => {}
            None => {
                // Woken by the clock: lanes silent for too long are lost.
                let now = Instant::now();
                ended.extend(
                    lanes
                        .lanes
                        .iter()
                        .filter(|(_, l)| !l.in_flight.is_empty() && now >= l.last_answer + LANE_TIMEOUT)
                        .map(|(id, _)| (*id, Some(tonic::Status::unavailable("no answer for 15 s")))),
                );
            }
        }
        let mut refresh = false;
        for (id, status) in ended {
            let Some(lane) = lanes.remove(id) else { continue };
            if lane.in_flight.is_empty() {
                continue;
            }
            if let Some(s) = status.as_ref().filter(|s| matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)) {
                return Err(ClientError::Rpc(s.clone()));
            }
            let why = status
                .as_ref()
                .map_or_else(|| "the stream ended with events unanswered".to_string(), |s| format!("{}: {}", s.code(), s.message()));
            let mut unanswered = lane.in_flight;
            // A stream the node ended because of a message (one over its
            // size limit, or one it could not decode) was refused at its
            // oldest unanswered event: that one fails, the rest go again.
            // Any other end is taken for a lost node.
            let refused = status.as_ref().is_some_and(refused_a_message);
            let node_lost = !refused;
            if node_lost {
                if let Some(node) = lane.node {
                    cluster.lost(node);
                }
                refresh = true;
            } else if let Some(p) = unanswered.pop_front() {
                done(&mut summary, Err(why.clone()), p.line);
            }
            for mut p in unanswered {
                if !node_lost {
                    // The node read none of these: their send is not
                    // charged.
                    p.sends = p.sends.saturating_sub(1);
                    waiting.push(p, Duration::ZERO);
                } else if p.sends >= options.attempts {
                    done(&mut summary, Err(format!("not answered after {} sends, outcome unknown: {why}", p.sends)), p.line);
                } else {
                    summary.resent += 1;
                    let wait = pause(p.sends);
                    waiting.push(p, wait);
                }
            }
        }
        if refresh {
            cluster.refresh().await;
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    summary.events_per_second = if summary.seconds > 0.0 { summary.events as f64 / summary.seconds } else { 0.0 };
    Ok(summary)
}

/// Whether a stream ended because the node refused one of its messages:
/// over its size limit (RESOURCE_EXHAUSTED saying so; tonic's own
/// OUT_OF_RANGE from older nodes) or not decodable (INVALID_ARGUMENT).
fn refused_a_message(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::OutOfRange | tonic::Code::InvalidArgument => true,
        tonic::Code::ResourceExhausted => s.message().contains("message length too large"),
        _ => false,
    }
}

/// The pause before events sent `sends` times are sent again: 100 ms,
/// doubling, at most [`MAX_PAUSE`].
fn pause(sends: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(sends.saturating_sub(1).min(8))).min(MAX_PAUSE)
}

/// Opens a stream to `client` and a task that reports its answers and its
/// end as lane `id`'s.
fn open_lane(id: u64, node: Option<u64>, mut client: crate::Client, window: usize, seen: mpsc::UnboundedSender<LaneEvent>) -> Lane {
    let (tx, rx) = mpsc::channel(window);
    tokio::spawn(async move {
        let answers = client.graph().identify_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        let mut answers = match answers {
            Ok(a) => a.into_inner(),
            Err(s) => {
                let _ = seen.send(LaneEvent::Ended(id, Some(s)));
                return;
            }
        };
        loop {
            match answers.next().await {
                Some(Ok(r)) => {
                    if seen.send(LaneEvent::Answer(id, r)).is_err() {
                        return;
                    }
                }
                Some(Err(s)) => {
                    let _ = seen.send(LaneEvent::Ended(id, Some(s)));
                    return;
                }
                None => {
                    let _ = seen.send(LaneEvent::Ended(id, None));
                    return;
                }
            }
        }
    });
    Lane { node, requests: Some(tx), in_flight: VecDeque::new(), last_answer: Instant::now() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_parse_and_bad_lines_are_named() {
        let text = "# comment\n{\"event_id\":\"e1\",\"identifiers\":[{\"type\":\"email\",\"value\":\"a@b.co\"}],\"traits\":{\"n\":1}}\n\n{\"event_id\":\"e2\"}\n";
        let err = count_events(EventLines::new(text.as_bytes())).unwrap_err().to_string();
        assert!(err.starts_with("line 4:"), "{err}");
        let ok: Vec<_> = EventLines::new(text.replace("{\"event_id\":\"e2\"}", "").as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].0, 2);
        let req = ok[0].1.to_request();
        assert_eq!(req.identifiers[0].value, "a@b.co");
        assert!(req.traits.unwrap().fields.contains_key("n"));
        assert_eq!(count_events(EventLines::new(text.replace("{\"event_id\":\"e2\"}", "").as_bytes())).unwrap(), 1);
    }

    #[test]
    fn a_stream_refused_for_a_message_is_told_from_a_lost_node() {
        assert!(refused_a_message(&tonic::Status::resource_exhausted("Error, decoded message length too large: found 70000 bytes")));
        assert!(refused_a_message(&tonic::Status::out_of_range("Error, decoded message length too large")));
        assert!(refused_a_message(&tonic::Status::invalid_argument("failed to decode")));
        assert!(!refused_a_message(&tonic::Status::resource_exhausted("shard 3 has 2048 writes waiting")));
        assert!(!refused_a_message(&tonic::Status::unknown("h2 protocol error: error reading a body from connection")));
        assert!(!refused_a_message(&tonic::Status::unavailable("connection refused")));
    }

    #[test]
    fn waiting_events_come_due_in_the_order_their_pauses_end() {
        let event = |line| Pending { line, request: pb::IdentifyRequest::default(), home: None, sends: 1 };
        let due = |w: &Waiting| w.due.iter().map(|p| p.line).collect::<Vec<_>>();
        let mut w = Waiting::default();
        w.push(event(1), Duration::from_secs(60));
        w.push(event(2), Duration::ZERO);
        w.push(event(3), Duration::from_secs(30));
        assert_eq!((w.len(), due(&w)), (3, vec![2]));
        let first_end = w.next_wake().expect("two pauses run");
        w.wake(Instant::now());
        assert_eq!(due(&w), [2], "no pause is over yet");
        w.wake(first_end);
        assert_eq!(due(&w), [2, 3]);
        w.wake(first_end + Duration::from_secs(30));
        assert_eq!(due(&w), [2, 3, 1]);
        assert_eq!(w.next_wake(), None);
    }

    #[test]
    fn pauses_double_up_to_two_seconds() {
        assert_eq!(pause(1), Duration::from_millis(100));
        assert_eq!(pause(2), Duration::from_millis(200));
        assert_eq!(pause(4), Duration::from_millis(800));
        assert_eq!(pause(6), MAX_PAUSE);
        assert_eq!(pause(u32::MAX), MAX_PAUSE);
    }
}
