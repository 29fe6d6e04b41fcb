//! `idgraphctl rules` and `idgraphctl canary` against a real node with four
//! shards: store and compare versions, bad input refused with the field
//! named, a rollout started, shown, aborted and rolled back, its report
//! written as Markdown and HTML.

mod common;

use common::{ok, refused};
use idgraph_node::config::NodeConfig;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idgraphctl")).arg("--endpoint").arg(endpoint).args(args).output().expect("idgraphctl runs")
}

const PLAN: &str = r#"
objective = "block one more placeholder"
candidate = "v2"
interval_secs = 1
steps = [{ shards = 1, bake_secs = 30 }, { percent = 100, bake_secs = 30 }]
kpis = [{ name = "merge_rate", direction = "lower_is_better", threshold = 0.5, floor = 0.05, critical = true }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_rules_and_canary_commands() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        NodeConfig { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.path().join("data"), shards: Some(4), ..NodeConfig::default() };
    let node = idgraph_node::server::start(&config).await.unwrap();
    let ep = format!("http://{}", node.addr());
    // The node's rules become the cluster's first version.
    let deadline = Instant::now() + Duration::from_secs(20);
    let builtin = idgraph_core::rules::RuleSet::builtin();
    while !ok(ctl(&ep, &["rules", "list"])).contains(builtin.version()) {
        assert!(Instant::now() < deadline, "the first version was not stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let v2 = builtin.source().replacen(&format!("version = \"{}\"", builtin.version()), "version = \"v2\"", 1).replacen(
        "\"guest\",",
        "\"guest\", \"placeholder-ctl\",",
        1,
    );
    let file = dir.path().join("v2.toml");
    std::fs::write(&file, &v2).unwrap();
    assert!(ok(ctl(&ep, &["rules", "put", file.to_str().unwrap()])).contains("stored rule set version v2"));
    let listed: serde_json::Value = serde_json::from_str(&ok(ctl(&ep, &["rules", "list", "-o", "json"]))).unwrap();
    assert_eq!(listed["rule_sets"].as_array().unwrap().len(), 2);
    assert_eq!(listed["active_version"], builtin.version());
    let diff = ok(ctl(&ep, &["rules", "diff", builtin.version(), "v2"]));
    assert!(diff.lines().any(|l| l.starts_with('+') && l.contains("placeholder-ctl")), "{diff}");
    assert!(ok(ctl(&ep, &["rules", "show", "v2"])).contains("placeholder-ctl"));
    // A bad rule set: the field is named and nothing is stored.
    std::fs::write(&file, v2.replace("version = \"v2\"", "version = \"v3\"").replace("limit = 1\n", "limit = 0\n")).unwrap();
    let err = refused(ctl(&ep, &["rules", "put", file.to_str().unwrap()]));
    assert!(err.contains("InvalidArgument") && err.contains("toml.types.user_id.limit"), "{err}");
    assert!(!ok(ctl(&ep, &["rules", "list"])).contains("v3"));

    // A bad plan, then a good one.
    let plan = dir.path().join("plan.toml");
    std::fs::write(&plan, PLAN.replace("percent = 100", "percent = 70")).unwrap();
    let err = refused(ctl(&ep, &["canary", "start", plan.to_str().unwrap()]));
    assert!(err.contains("InvalidArgument") && err.contains("steps[1].percent"), "{err}");
    std::fs::write(&plan, PLAN).unwrap();
    let started: serde_json::Value =
        serde_json::from_str(&ok(ctl(&ep, &["canary", "start", plan.to_str().unwrap(), "-o", "json"]))).unwrap();
    let id = started["id"].as_str().unwrap().to_string();
    assert_eq!(started["phase"], "baking");
    let status = ok(ctl(&ep, &["canary", "status"]));
    assert!(status.contains(&id) && status.contains("merge_rate") && status.contains("shards 0-0 run v2"), "{status}");
    let listed = ok(ctl(&ep, &["rules", "list", "-o", "json"]));
    assert!(listed.contains("\"canary_shards\": [\n        0\n      ]"), "{listed}");
    let err = refused(ctl(&ep, &["canary", "start", plan.to_str().unwrap()]));
    assert!(err.contains("FailedPrecondition") && err.contains(&id), "{err}");

    ok(ctl(&ep, &["canary", "abort", "--reason", "changed our mind"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let history: serde_json::Value = serde_json::from_str(&ok(ctl(&ep, &["canary", "history", "-o", "json"]))).unwrap();
        if history["rollouts"][0]["phase"] == "rolled back" {
            break;
        }
        assert!(Instant::now() < deadline, "the rollback did not finish: {history}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(refused(ctl(&ep, &["canary", "status"])).contains("NotFound"));
    assert!(refused(ctl(&ep, &["canary", "promote"])).contains("FailedPrecondition"));

    let reports = dir.path().join("reports");
    ok(ctl(&ep, &["canary", "report", &id, "--dir", reports.to_str().unwrap()]));
    let md = std::fs::read_to_string(reports.join(format!("canary-{id}.md"))).unwrap();
    assert!(md.contains("block one more placeholder") && md.contains("changed our mind"), "{md}");
    let html = std::fs::read_to_string(reports.join(format!("canary-{id}.html"))).unwrap();
    assert!(html.contains("<svg") && !html.contains("<script"));
    node.shutdown().await.unwrap();
}
