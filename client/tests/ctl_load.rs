//! `idgraphctl load` and `idgraphctl get` against a real node: a few
//! thousand generated events with known ground truth give the profiles the
//! built-in rules promise.

use idgraph_client::idgraph_proto::v1 as pb;
use idgraph_client::{Client, EventLine, IdentifierLine};
use idgraph_node::config::NodeConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Deterministic pseudo-random numbers (splitmix64) so a failure replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn ev(id: String, ts: i64, ids: &[(&str, String)]) -> EventLine {
    EventLine {
        event_id: id,
        timestamp_ms: ts,
        identifiers: ids.iter().map(|(k, v)| IdentifierLine { kind: k.to_string(), value: v.clone() }).collect(),
        traits: Default::default(),
        source: "generator".into(),
    }
}

struct World {
    events: Vec<EventLine>,
    /// Person -> the normalised identifiers that must end up in their profile.
    truth: BTreeMap<usize, BTreeSet<(String, String)>>,
    tablets: Vec<String>,
    redeliveries: usize,
}

/// Persons with a user id, one or two e-mails (case and space variants), a
/// phone in several formats, devices and anonymous ids; junk values; shared
/// family tablets; re-deliveries.
fn world(persons: usize, seed: u64) -> World {
    let mut r = Rng(seed);
    let mut events = Vec::new();
    let mut truth: BTreeMap<usize, BTreeSet<(String, String)>> = BTreeMap::new();
    let mut n = 0usize;
    let next_id = |n: &mut usize| {
        *n += 1;
        format!("evt-{n:06}")
    };
    for p in 0..persons {
        let t = truth.entry(p).or_default();
        let user = format!("user-{p}");
        let email = format!("person{p}@shop.com");
        let email2 = format!("p{p}.alt@mail.net");
        let phone_digits = format!("212555{:04}", p);
        let anon: Vec<String> = (0..2).map(|i| format!("anon-{p}-{i}")).collect();
        let devices: Vec<String> = (0..1 + r.below(2)).map(|i| format!("dev-{p}-{i}")).collect();
        t.insert(("user_id".into(), user.clone()));
        t.insert(("email".into(), email.clone()));
        for a in &anon {
            t.insert(("anonymous_id".into(), a.clone()));
        }
        for d in &devices {
            t.insert(("device_id".into(), d.clone()));
        }
        let ts = 1_700_000_000_000 + p as i64;
        // Anonymous browsing on each device.
        for (i, d) in devices.iter().enumerate() {
            let a = &anon[i % anon.len()];
            events.push(ev(next_id(&mut n), ts, &[("anonymous_id", a.clone()), ("device_id", d.to_uppercase())]));
        }
        // Newsletter sign-up with a junk placeholder user id.
        events.push(ev(next_id(&mut n), ts + 1, &[("email", format!("  {}", email.to_uppercase())), ("user_id", "undefined".into())]));
        // Login links user id, e-mail and an anonymous id.
        events.push(ev(next_id(&mut n), ts + 2, &[("user_id", user.clone()), ("email", email.clone()), ("anonymous_id", anon[0].clone())]));
        events.push(ev(
            next_id(&mut n),
            ts + 3,
            &[("user_id", user.clone()), ("anonymous_id", anon[1].clone()), ("device_id", "00000000-0000-0000-0000-000000000000".into())],
        ));
        // Half of them also give a phone (different formats) and a second e-mail.
        if p % 2 == 0 {
            let formatted = format!("({}) {}-{}", &phone_digits[..3], &phone_digits[3..6], &phone_digits[6..]);
            events.push(ev(next_id(&mut n), ts + 4, &[("user_id", user.clone()), ("phone", formatted)]));
            events.push(ev(
                next_id(&mut n),
                ts + 5,
                &[("phone", format!("+1 {phone_digits}")), ("email", email2.clone()), ("email", "test@test.com".into())],
            ));
            t.insert(("phone".into(), format!("1{phone_digits}")));
            t.insert(("email".into(), email2.clone()));
        }
    }
    // Families of six share a tablet.
    let mut tablets = Vec::new();
    for f in 0..persons / 100 {
        let tablet = format!("family-tablet-{f}");
        for m in 0..6 {
            let p = f * 100 + m;
            events.push(ev(
                next_id(&mut n),
                1_800_000_000_000 + m as i64,
                &[("user_id", format!("user-{p}")), ("device_id", tablet.clone())],
            ));
        }
        tablets.push(tablet);
    }
    // Shuffle, then re-deliver some events (the same event ids).
    for i in (1..events.len()).rev() {
        let j = r.below(i as u64 + 1) as usize;
        events.swap(i, j);
    }
    let redeliveries = events.len() / 20;
    for i in 0..redeliveries {
        let e = events[(i * 7) % events.len()].clone();
        events.push(e);
    }
    World { events, truth, tablets, redeliveries }
}

fn ctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idgraphctl")).arg("--endpoint").arg(endpoint).args(args).output().expect("run idgraphctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_generated_events_gives_the_promised_profiles() {
    load_and_check(None).await;
}

/// The same world on eight shards: nearly every event commits across
/// shards, and the profiles must come out the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_generated_events_across_eight_shards_gives_the_promised_profiles() {
    load_and_check(Some(8)).await;
}

async fn load_and_check(shards: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.path().join("data"), shards, ..NodeConfig::default() };
    let node = idgraph_node::server::start(&config).await.unwrap();
    let endpoint = format!("http://{}", node.addr());

    let w = world(600, 7);
    let file = dir.path().join("events.jsonl");
    let text: String = w.events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect();
    std::fs::write(&file, text).unwrap();

    let out = ctl(&endpoint, &["load", file.to_str().unwrap(), "--output", "json"]);
    assert!(out.status.success(), "load failed: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["events"], w.events.len() as u64);
    assert_eq!(summary["failed"], 0);
    assert_eq!(summary["duplicates"], w.redeliveries as u64);
    assert!(summary["conflicts"].as_u64().unwrap() >= (w.tablets.len() * 5) as u64);
    assert!(w.events.len() > 3000, "a few thousand events: {}", w.events.len());

    // Every person is exactly one profile holding exactly their identifiers
    // (the shared tablet aside), with one user id.
    let mut client = Client::connect(&endpoint).await.unwrap();
    for (p, want) in &w.truth {
        let key = pb::get_profile_request::Key::Identifier(pb::Identifier { r#type: "user_id".into(), value: format!("user-{p}") });
        let prof = client.graph().get_profile(pb::GetProfileRequest { key: Some(key), ..Default::default() }).await.unwrap().into_inner();
        let got: BTreeSet<(String, String)> = prof
            .identifiers
            .iter()
            .filter(|i| !i.value.starts_with("family-tablet"))
            .map(|i| (i.r#type.clone(), i.value.clone()))
            .collect();
        assert_eq!(&got, want, "person {p}");
    }
    // Each shared tablet stays in one profile and is listed as a hub.
    let hubs = client.admin().list_hubs(pb::ListHubsRequest { limit: 0 }).await.unwrap().into_inner().hubs;
    let listed: BTreeSet<String> = hubs.iter().filter_map(|h| h.identifier.as_ref()).map(|i| i.value.clone()).collect();
    assert_eq!(listed, w.tablets.iter().cloned().collect::<BTreeSet<_>>());

    // The CLI's own look-up agrees, by any identifier, in both formats.
    let out = ctl(&endpoint, &["get", "--id", "phone=+1 (212) 555-0042", "--output", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p42: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<String> = p42["identifiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("{}={}", i["type"].as_str().unwrap(), i["value"].as_str().unwrap()))
        .collect();
    assert!(ids.contains(&"user_id=user-42".to_string()), "{ids:?}");
    let out = ctl(&endpoint, &["get", "--id", "email=Person42@Shop.com"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("user_id=user-42") && table.contains(p42["profile_id"].as_str().unwrap()), "{table}");

    // Not found is an error exit with the status named.
    let out = ctl(&endpoint, &["get", "--id", "email=nobody@shop.com"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));

    // A restart keeps everything.
    node.shutdown().await.unwrap();
    let node = idgraph_node::server::start(&config).await.unwrap();
    let out = ctl(&format!("http://{}", node.addr()), &["stats", "--output", "json"]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["events"], (w.events.len() - w.redeliveries) as u64);
    assert_eq!(stats["profiles"], w.truth.len() as u64);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_identify_merge_unmerge_delete() {
    operator_commands(None).await;
}

/// The operator commands again on eight shards, where they run as
/// cross-shard transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_identify_merge_unmerge_delete_across_eight_shards() {
    operator_commands(Some(8)).await;
}

async fn operator_commands(shards: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.path().to_path_buf(), shards, ..NodeConfig::default() };
    let node = idgraph_node::server::start(&config).await.unwrap();
    let ep = format!("http://{}", node.addr());
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let a = json(ctl(&ep, &["identify", "--id", "user_id=u1", "--trait", "plan=\"pro\"", "-o", "json"]));
    let b = json(ctl(&ep, &["identify", "--id", "email=b@shop.com", "-o", "json"]));
    let out = ctl(&ep, &["merge", "--id", "user_id=u1", "--id", "email=b@shop.com", "--reason", "support", "-o", "json"]);
    let m = json(out);
    assert_eq!(m["profile_id"], a["profile_id"]);
    let rec = json(ctl(&ep, &["merge-record", "show", m["merge_id"].as_str().unwrap(), "-o", "json"]));
    assert_eq!(rec["cause"], "operator");
    assert_eq!(rec["cause_detail"], "support");
    let u = json(ctl(&ep, &["unmerge", "--merge-id", m["merge_id"].as_str().unwrap(), "-o", "json"]));
    assert_eq!(u["new_profile_ids"][0], b["profile_id"]);
    let d = json(ctl(&ep, &["delete", "--id", "email=b@shop.com", "-o", "json"]));
    assert_eq!(d["profile_id"], b["profile_id"]);
    let rules = ctl(&ep, &["rules", "show"]);
    assert!(String::from_utf8_lossy(&rules.stdout).contains("[types.user_id]"));
    node.shutdown().await.unwrap();
}
