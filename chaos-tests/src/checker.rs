//! Checkers over a run's history and the cluster's final state, read after
//! every fault was healed.
//!
//! 1. **No lost writes**: every identifier of an acknowledged event or
//!    merge resolves to a live profile, and (in groups without unmerges)
//!    the identifiers an acknowledged write joined are still together.
//! 2. **Graph invariants**: a profile found by an identifier lists it; no
//!    identifier is listed by two live profiles; no profile holds more
//!    identifiers of a type than the rules allow; a merged-away profile id
//!    resolves to the live profile that absorbed it.
//! 3. **Replicas converge**: every replica of a shard, once all have
//!    applied the same log, reports the same state digest.
//! 4. **Linearizability**: per group, the history of links and reads has a
//!    linearization in the pure-union model ([`crate::linearizability`]).
//! 5. **Processes**: no node exited unless the harness killed it or an armed
//!    crash point stopped it.

use crate::cluster::{admin, Cluster};
use crate::linearizability::{check_graph, GraphInput, GraphOutput, Operation, Verdict};
use crate::workload::{to_pb, Group, Id, Op, OpKind, Outcome};
use idgraph_core::checks::{self, Listing};
use idgraph_core::model::Identifier;
use idgraph_proto::v1 as pb;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// Failures listed in a report, at most.
const MAX_LISTED: usize = 20;

/// One checker's verdict.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub passed: bool,
    /// What was checked (identifiers, profiles, shards, groups).
    pub checked: u64,
    /// How many failed, and the first of them.
    pub failed: u64,
    pub failures: Vec<String>,
    /// Numbers behind the verdict.
    pub notes: BTreeMap<String, serde_json::Value>,
}

impl CheckResult {
    pub(crate) fn new(name: &'static str) -> CheckResult {
        CheckResult { name, passed: true, checked: 0, failed: 0, failures: Vec::new(), notes: BTreeMap::new() }
    }

    pub(crate) fn fail(&mut self, what: String) {
        self.passed = false;
        self.failed += 1;
        if self.failures.len() < MAX_LISTED {
            self.failures.push(what);
        }
    }

    fn note(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.notes.insert(key.into(), value.into());
    }
}

/// Waits until every node answers and every shard has a leader and no
/// prepared transaction part (the sweep settles abandoned ones).
pub async fn settle(cluster: &Cluster, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        match settled_now(cluster).await {
            Ok(()) => return Ok(started.elapsed()),
            Err(why) => last = why,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("not settled after {} s: {last}", within.as_secs()))
}

async fn settled_now(cluster: &Cluster) -> Result<(), String> {
    let mut leaders = BTreeSet::new();
    let mut shards = 0;
    let mut meta_led = false;
    for n in &cluster.nodes {
        let mut a = admin(n).await.map_err(|e| format!("node {}: {e}", n.id))?;
        let status = a.get_cluster(pb::GetClusterRequest {}).await.map_err(|e| format!("node {}: {}", n.id, e.message()))?.into_inner();
        // Each node holds some shards' replicas (all of them while the
        // cluster has no more nodes than the replication factor).
        shards = shards.max(status.shard_count as usize);
        meta_led |= status.metadata.as_ref().is_some_and(|m| m.state == "Leader");
        if let Some(moving) = status.placement.iter().find(|p| !p.moving.is_empty()) {
            return Err(format!("node {}: a replica of group {} is still moving ({})", n.id, moving.group, moving.moving));
        }
        for s in status.shards {
            if s.prepared_txns > 0 {
                return Err(format!("node {} shard {} has {} prepared transaction parts", n.id, s.shard, s.prepared_txns));
            }
            if s.state == "Leader" {
                leaders.insert(s.shard);
            }
        }
    }
    if leaders.len() < shards {
        return Err(format!("{} of {shards} shards have a leader", leaders.len()));
    }
    if !meta_led {
        return Err("the metadata group has no leader".into());
    }
    Ok(())
}

/// The final state the checkers judge: every identifier read again and
/// again until two passes in a row agree. A transaction runs on after its
/// client gave up (an unknown outcome), so writes can still land when the
/// cluster looks settled; one pass reads identifiers seconds apart, and a
/// profile read before such a write and another read after it would look
/// like a join undone.
pub async fn stable_profiles(channel: Channel, ids: &BTreeSet<Id>, within: Duration) -> Result<BTreeMap<Id, Option<pb::Profile>>, String> {
    until_stable(|| final_profiles(channel.clone(), ids), within, Duration::from_millis(500)).await
}

/// Reads with `read` until two passes in a row are equal (with `pause`
/// between passes), for at most `within`.
async fn until_stable<T: PartialEq, F, Fut>(mut read: F, within: Duration, pause: Duration) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let mut last = read().await?;
    let mut passes = 1;
    loop {
        tokio::time::sleep(pause).await;
        let now = read().await?;
        passes += 1;
        if now == last {
            return Ok(now);
        }
        if started.elapsed() > within {
            return Err(format!("the final reads kept changing for {} s ({passes} passes): writes never stopped", within.as_secs()));
        }
        last = now;
    }
}

/// The final linearizable read of each identifier through one node,
/// retried while the outcome is unknown. None: NOT_FOUND.
pub async fn final_profiles(channel: Channel, ids: &BTreeSet<Id>) -> Result<BTreeMap<Id, Option<pb::Profile>>, String> {
    let graph = pb::identity_graph_client::IdentityGraphClient::new(channel);
    let mut out = BTreeMap::new();
    for id in ids {
        let req = pb::GetProfileRequest { key: Some(pb::get_profile_request::Key::Identifier(to_pb(id))), consistency: 0 };
        match get_profile(&graph, req).await {
            Ok(p) => out.insert(id.clone(), Some(p.into_inner())),
            Err(s) if s.code() == Code::NotFound => out.insert(id.clone(), None),
            Err(s) => return Err(format!("final read of an identifier failed: {}", s.message())),
        };
    }
    Ok(out)
}

/// `GetProfile`, retried while its outcome is unknown.
async fn get_profile(
    graph: &pb::identity_graph_client::IdentityGraphClient<Channel>,
    req: pb::GetProfileRequest,
) -> Result<tonic::Response<pb::Profile>, tonic::Status> {
    retry(|| {
        let mut g = graph.clone();
        let req = req.clone();
        async move { g.get_profile(req).await }
    })
    .await
}

/// Retries a call for up to 30 s while its outcome is unknown.
async fn retry<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let started = Instant::now();
    loop {
        match call().await {
            Err(s)
                if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Aborted)
                    && started.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return other,
        }
    }
}

fn profile_ids(p: &pb::Profile) -> BTreeSet<Id> {
    p.identifiers.iter().map(|i| crate::workload::id_string(&i.r#type, &i.value)).collect()
}

/// Checker 1: acknowledged writes are all there.
pub fn lost_writes(history: &[Op], groups: &HashMap<u64, Group>, finals: &BTreeMap<Id, Option<pb::Profile>>) -> CheckResult {
    let mut r = CheckResult::new("no-lost-writes");
    let mut acked_writes = 0u64;
    for op in history.iter().filter(|o| o.outcome == Outcome::Ok) {
        let Some(ids) = op.linked() else { continue };
        acked_writes += 1;
        let union_only = groups.get(&op.group).is_some_and(|g| !g.unmerges);
        let mut first: Option<(&Id, BTreeSet<Id>)> = None;
        for id in ids {
            r.checked += 1;
            match finals.get(id) {
                Some(Some(p)) => {
                    let members = profile_ids(p);
                    if union_only {
                        if let Some((a, pa)) = &first {
                            if *pa != members {
                                r.fail(format!(
                                    "{} acknowledged at {} us joined {a} and {id}, now in different profiles",
                                    describe(op),
                                    op.return_us
                                ));
                            }
                        } else {
                            first = Some((id, members));
                        }
                    }
                }
                _ => r.fail(format!("{} acknowledged at {} us: {id} not found", describe(op), op.return_us)),
            }
        }
    }
    r.note("acknowledged_writes", acked_writes);
    r
}

fn describe(op: &Op) -> String {
    match &op.kind {
        OpKind::Identify { event_id, .. } => format!("event {event_id}"),
        OpKind::Merge { .. } => format!("merge by client {}", op.client),
        OpKind::Unmerge { .. } => format!("unmerge by client {}", op.client),
        OpKind::Read { .. } => format!("read by client {}", op.client),
    }
}

/// Checker 2: graph invariants over the final profiles.
pub async fn invariants(channel: Channel, finals: &BTreeMap<Id, Option<pb::Profile>>, limits: &BTreeMap<String, usize>) -> CheckResult {
    let mut r = CheckResult::new("graph-invariants");
    let mut profiles: BTreeMap<String, &pb::Profile> = BTreeMap::new();
    for (id, p) in finals {
        let Some(p) = p else { continue };
        r.checked += 1;
        if !profile_ids(p).contains(id) {
            r.fail(format!("{id} resolves to profile {}, which does not list it", p.profile_id));
        }
        profiles.insert(p.profile_id.clone(), p);
    }
    // Invariants 1 to 4 of `idgraph_core::checks`, over the profiles read:
    // an identifier's owner is known where the run read that identifier.
    let listed: Vec<Listing> = profiles
        .values()
        .map(|p| (p.profile_id.clone(), p.identifiers.iter().map(|i| Identifier::new(&i.r#type, &i.value)).collect()))
        .collect();
    let owner_of =
        |i: &Identifier| finals.get(&crate::workload::id_string(&i.kind, &i.value)).map(|p| p.as_ref().map(|p| p.profile_id.clone()));
    for failure in checks::listings(&listed, owner_of, |kind| limits.get(kind).copied(), None) {
        r.fail(failure);
    }
    // Lineage: a merged-away profile id resolves to the live profile that
    // lists it in merged_from.
    let graph = pb::identity_graph_client::IdentityGraphClient::new(channel);
    let mut lineage = 0u64;
    for p in profiles.values() {
        for old in &p.merged_from {
            lineage += 1;
            let req = pb::GetProfileRequest { key: Some(pb::get_profile_request::Key::ProfileId(old.clone())), consistency: 0 };
            match get_profile(&graph, req).await {
                Ok(found) if found.get_ref().profile_id == p.profile_id => {}
                Ok(found) => r.fail(format!("merged-away {old} resolves to {}, not to {}", found.get_ref().profile_id, p.profile_id)),
                Err(s) => r.fail(format!("merged-away {old} of {} does not resolve: {}", p.profile_id, s.message())),
            }
        }
    }
    r.note("live_profiles", profiles.len() as u64);
    r.note("merged_away_ids_checked", lineage);
    r
}

/// Per-type limits of the rule set a node runs.
pub async fn limits(channel: Channel) -> Result<BTreeMap<String, usize>, String> {
    let a = pb::admin_client::AdminClient::new(channel);
    let info = retry(|| {
        let mut a = a.clone();
        async move { a.get_rule_set(pb::GetRuleSetRequest::default()).await }
    })
    .await
    .map_err(|s| s.message().to_string())?;
    let doc: toml::Table = info.into_inner().toml.parse().map_err(|e| format!("rule set: {e}"))?;
    let mut out = BTreeMap::new();
    if let Some(types) = doc.get("types").and_then(|t| t.as_table()) {
        for (kind, spec) in types {
            if let Some(limit) = spec.get("limit").and_then(|l| l.as_integer()) {
                out.insert(kind.clone(), limit.max(0) as usize);
            }
        }
    }
    Ok(out)
}

/// Checker 3: every replica of a shard reports the same digest once all
/// have applied the same log (waiting up to `within` for that).
pub async fn convergence(cluster: &Cluster, within: Duration) -> CheckResult {
    let mut r = CheckResult::new("replicas-converge");
    let started = Instant::now();
    loop {
        let mut per_shard: BTreeMap<u32, Vec<(u64, pb::ShardDigest)>> = BTreeMap::new();
        let mut unreachable = Vec::new();
        for n in &cluster.nodes {
            let answer = match admin(n).await {
                Ok(mut a) => a.get_digests(pb::GetDigestsRequest {}).await.map_err(|s| s.message().to_string()),
                Err(e) => Err(e.to_string()),
            };
            match answer {
                Ok(d) => {
                    for s in d.into_inner().shards {
                        per_shard.entry(s.shard).or_default().push((n.id, s));
                    }
                }
                Err(e) => unreachable.push(format!("node {}: {e}", n.id)),
            }
        }
        // Each group has as many replicas as the cluster map places (with
        // more nodes than the replication factor, not one on every node).
        let placed = replica_counts(cluster).await;
        let caught_up = unreachable.is_empty()
            && per_shard.iter().all(|(shard, reps)| {
                reps.len() >= placed.get(shard).copied().unwrap_or(cluster.nodes.len())
                    && reps.iter().all(|(_, d)| d.settled && d.applied_index == reps[0].1.applied_index)
            });
        if caught_up || started.elapsed() > within {
            for (shard, reps) in &per_shard {
                r.checked += 1;
                let digests: BTreeSet<(&u64, &str)> = reps.iter().map(|(_, d)| (&d.applied_index, d.digest.as_str())).collect();
                if digests.len() > 1 {
                    let detail: Vec<String> =
                        reps.iter().map(|(id, d)| format!("node {id}: index {} digest {}", d.applied_index, d.digest)).collect();
                    let why = if caught_up { "replicas at the same index differ" } else { "replicas did not converge" };
                    r.fail(format!("shard {shard}: {why}: {}", detail.join(", ")));
                }
            }
            for u in unreachable {
                r.fail(format!("no digests from {u}"));
            }
            r.note("waited_ms", started.elapsed().as_millis() as u64);
            r.note("bytes", per_shard.values().filter_map(|reps| reps.first()).map(|(_, d)| d.bytes).sum::<u64>());
            return r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How many replicas the cluster map places for each group, as the first
/// node that answers reports it (the metadata group under `u32::MAX`, as
/// digests name it); empty when no node answers.
async fn replica_counts(cluster: &Cluster) -> BTreeMap<u32, usize> {
    for n in &cluster.nodes {
        let Ok(mut a) = admin(n).await else { continue };
        let Ok(status) = a.get_cluster(pb::GetClusterRequest {}).await else { continue };
        return status
            .into_inner()
            .placement
            .iter()
            .map(|p| (if p.group == "meta" { u32::MAX } else { p.group.parse().unwrap_or(u32::MAX - 1) }, p.node_ids.len()))
            .collect();
    }
    BTreeMap::new()
}

/// Checker 4: linearizability of each union-only group's history.
pub fn linearizability(history: &[Op], groups: &HashMap<u64, Group>, max_steps: u64) -> CheckResult {
    let mut r = CheckResult::new("linearizable");
    let mut per_group: BTreeMap<u64, Vec<Operation<GraphInput, GraphOutput>>> = BTreeMap::new();
    for op in history {
        if groups.get(&op.group).is_none_or(|g| g.unmerges) {
            continue;
        }
        let (input, output) = match (&op.kind, &op.outcome) {
            (_, Outcome::Failed(_)) => continue,
            (OpKind::Identify { ids, .. } | OpKind::Merge { ids }, Outcome::Ok) => {
                (GraphInput::Link { ids: ids.clone() }, Some(GraphOutput::Linked))
            }
            (OpKind::Identify { ids, .. } | OpKind::Merge { ids }, Outcome::Unknown(_)) => (GraphInput::Link { ids: ids.clone() }, None),
            (OpKind::Read { id, found }, Outcome::Ok) => (GraphInput::Read { id: id.clone() }, Some(GraphOutput::Profile(found.clone()))),
            // A read that failed or timed out observed nothing.
            (OpKind::Read { .. }, Outcome::Unknown(_)) => continue,
            (OpKind::Unmerge { .. }, _) => continue,
        };
        per_group.entry(op.group).or_default().push(Operation {
            client: op.client,
            input,
            call: op.call_us,
            completion: output.map(|o| (op.return_us, o)),
        });
    }
    let (mut ops, mut largest, mut largest_part, mut most_steps) = (0u64, 0usize, 0usize, 0u64);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for (group, history) in &per_group {
        r.checked += 1;
        ops += history.len() as u64;
        let searched = Instant::now();
        let checked = check_graph(history, max_steps);
        slowest = slowest.max(searched.elapsed());
        largest = largest.max(history.len());
        largest_part = largest_part.max(checked.largest_part);
        most_steps = most_steps.max(checked.steps);
        match checked.verdict {
            Verdict::Linearizable => {}
            // Not proven is not a pass.
            Verdict::Unknown => r.fail(format!(
                "group {group} ({} operations in {} independent parts): undecided, the search of a part of {} operations ran out \
                 of its budget of {max_steps} steps (--max-steps)",
                history.len(),
                checked.parts,
                checked.undecided_part.unwrap_or(0),
            )),
            Verdict::NotLinearizable { longest_prefix, unplaceable } => {
                let op = &history[unplaceable.min(history.len() - 1)];
                let answer = match &op.completion {
                    Some((ret, out)) => format!("answered {out:?} at {ret} us"),
                    None => "outcome unknown".into(),
                };
                r.fail(format!(
                    "group {group} ({} operations): after {} placed, none fits; stuck at client {}'s {:?} called at {} us, {answer}",
                    history.len(),
                    longest_prefix.len(),
                    op.client,
                    op.input,
                    op.call
                ))
            }
        }
    }
    r.note("operations", ops);
    r.note("largest_group_operations", largest as u64);
    r.note("largest_part_operations", largest_part as u64);
    r.note("most_steps", most_steps);
    r.note("search_ms", started.elapsed().as_millis() as u64);
    r.note("slowest_group_ms", slowest.as_millis() as u64);
    r
}

/// Checker 5: no node ended on its own except at an armed crash point.
pub fn processes(exits: &[crate::cluster::UnexpectedExit], start_errors: &[String]) -> CheckResult {
    let mut r = CheckResult::new("processes");
    r.checked = exits.len() as u64;
    for e in exits.iter().filter(|e| !e.crash_point) {
        r.fail(format!("node {} exited on its own: {}", e.node + 1, e.status));
    }
    for e in start_errors {
        r.fail(e.clone());
    }
    r.note("crash_point_exits", exits.iter().filter(|e| e.crash_point).count() as u64);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The final state is two equal passes in a row: a pass torn by a late
    /// write is read again, and a state that never settles is an error.
    #[tokio::test]
    async fn final_reads_wait_for_two_equal_passes() {
        let passes = std::sync::Mutex::new(vec![1, 2, 2, 3].into_iter());
        let read = || {
            let next = passes.lock().unwrap().next();
            async move { next.ok_or_else(|| "no more".to_string()) }
        };
        assert_eq!(until_stable(read, Duration::from_secs(5), Duration::ZERO).await, Ok(2));
        let mut n = 0;
        let changing = || {
            n += 1;
            let v = n;
            async move { Ok::<_, String>(v) }
        };
        let err = until_stable(changing, Duration::from_millis(50), Duration::from_millis(1)).await.unwrap_err();
        assert!(err.contains("kept changing"), "{err}");
    }

    fn op(client: usize, kind: OpKind, call_us: u64, return_us: u64, outcome: Outcome) -> Op {
        Op { client, group: 0, node: 0, kind, call_us, return_us, outcome }
    }

    fn identify(client: usize, ids: &[&str], call_us: u64, return_us: u64) -> Op {
        let ids = ids.iter().map(|i| i.to_string()).collect();
        op(client, OpKind::Identify { event_id: format!("ev-{client}-{call_us}"), ids }, call_us, return_us, Outcome::Ok)
    }

    fn read(client: usize, id: &str, found: &[&str], call_us: u64, return_us: u64) -> Op {
        let found = Some(found.iter().map(|i| i.to_string()).collect());
        op(client, OpKind::Read { id: id.into(), found }, call_us, return_us, Outcome::Ok)
    }

    /// Group 0 of seed 1: a union-only group (every fifth group sees unmerges, group 0 does not).
    fn groups() -> HashMap<u64, Group> {
        let group = Group::new(1, 0);
        assert!(!group.unmerges);
        HashMap::from([(0, group)])
    }

    /// Two concurrent links and three reads: deciding it takes more than two steps.
    fn history() -> Vec<Op> {
        vec![
            identify(0, &["email:a", "device_id:b"], 0, 100),
            identify(1, &["device_id:b", "anonymous_id:c"], 0, 100),
            read(2, "email:a", &["email:a", "device_id:b"], 10, 20),
            read(2, "email:a", &["email:a", "device_id:b", "anonymous_id:c"], 30, 40),
            read(3, "anonymous_id:c", &["email:a", "device_id:b", "anonymous_id:c"], 200, 210),
        ]
    }

    #[test]
    fn a_group_the_search_cannot_decide_fails_the_check_and_is_named() {
        let r = linearizability(&history(), &groups(), 2);
        assert!(!r.passed, "{r:?}");
        assert_eq!(r.failed, 1);
        assert!(r.failures[0].contains("group 0 (5 operations") && r.failures[0].contains("budget of 2 steps"), "{:?}", r.failures);
        // With room to search, the same history is decided and passes.
        let r = linearizability(&history(), &groups(), 1_000);
        assert!(r.passed, "{r:?}");
        assert_eq!(r.checked, 1);
    }

    #[test]
    fn a_read_that_goes_back_in_time_fails_the_check() {
        let mut history = history();
        history.push(read(3, "anonymous_id:c", &["anonymous_id:c"], 300, 310));
        let r = linearizability(&history, &groups(), 1_000);
        assert!(!r.passed);
        assert!(r.failures[0].contains("none fits"), "{:?}", r.failures);
    }
}
