//! The idgraph.v1 API over a real socket, against a node with real storage.

mod common;

use common::*;
use futures::StreamExt;
use idgraph_proto::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

#[tokio::test]
async fn identify_links_profiles_and_get_profile_resolves_by_any_identifier() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let mut g = graph(&node).await;
    let a = g.identify(event("e1", &[("anonymous_id", "anon-1")])).await.unwrap().into_inner();
    let b = g.identify(event("e2", &[("email", "Bo@Shop.com")])).await.unwrap().into_inner();
    assert!(a.created && b.created);
    let m = g.identify(event("e3", &[("email", "bo@shop.com "), ("anonymous_id", "anon-1")])).await.unwrap().into_inner();
    assert!(m.merged);
    assert_eq!(m.profile_id, a.profile_id);
    assert_eq!(m.merged_profile_ids, vec![b.profile_id.clone()]);

    let p = g.get_profile(by_id("email", "BO@shop.com")).await.unwrap().into_inner();
    assert_eq!(p.profile_id, a.profile_id);
    assert_eq!(p.identifiers.len(), 2);
    assert_eq!(p.merge_ids, vec![m.merge_id.clone()]);
    let via_old = g.get_profile(by_profile(&b.profile_id)).await.unwrap().into_inner();
    assert_eq!(via_old.profile_id, a.profile_id);
    assert_eq!(via_old.resolved_from, b.profile_id);

    let rec = g.get_merge_record(pb::GetMergeRecordRequest { merge_id: m.merge_id.clone() }).await.unwrap().into_inner();
    assert_eq!(rec.cause, "event");
    assert_eq!(rec.cause_detail, "e3");
    assert_eq!(rec.absorbed[0].identifiers, vec![id("email", "bo@shop.com")]);

    let dup = g.identify(event("e3", &[("email", "bo@shop.com")])).await.unwrap().into_inner();
    assert!(dup.duplicate);
    node.shutdown().await.unwrap();
}

/// A re-delivery is a duplicate while the event's dedup record is kept; the
/// record goes once its retention has passed, and the event then applies
/// again, to the same profile, leaving a record of its own.
#[tokio::test]
async fn a_redelivery_past_the_retention_applies_again_and_one_within_it_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let config = idgraph_node::config::NodeConfig { event_retention_secs: 1, ..config(dir.path()) };
    let node = idgraph_node::server::start(&config).await.unwrap();
    let mut g = graph(&node).await;
    let ann = || event("e1", &[("email", "ann@shop.com"), ("anonymous_id", "anon-9")]);
    let first = g.identify(ann()).await.unwrap().into_inner();
    assert!(first.created && !first.duplicate);
    assert!(g.identify(ann()).await.unwrap().into_inner().duplicate, "within the retention");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let again = loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let r = g.identify(ann()).await.unwrap().into_inner();
        if !r.duplicate {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "the dedup record was never forgotten");
    };
    assert_eq!(again.profile_id, first.profile_id);
    assert!(!again.created && !again.merged);
    assert!(g.identify(ann()).await.unwrap().into_inner().duplicate, "the new delivery's record is kept");
    let p = g.get_profile(by_id("email", "ann@shop.com")).await.unwrap().into_inner();
    assert_eq!(p.identifiers.len(), 2, "nothing joined twice");
    // Peers ask before they propose the command: this build names it.
    let mut peer = pb::raft_transport_client::RaftTransportClient::new(channel(&node).await);
    let answer = peer.features(pb::RaftMessage { shard: 0, payload: Vec::new() }).await.unwrap().into_inner();
    let features: Vec<String> = rmp_serde::from_slice(&answer.payload).unwrap();
    assert_eq!(features, ["forget-events"]);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn merge_unmerge_and_delete_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let mut g = graph(&node).await;
    let u1 = g.identify(event("e1", &[("user_id", "u1"), ("email", "one@shop.com")])).await.unwrap().into_inner();
    let u2 = g.identify(event("e2", &[("user_id", "u2")])).await.unwrap().into_inner();
    let refs = |a: &str, b: &str| {
        vec![
            pb::ProfileRef { key: Some(pb::profile_ref::Key::ProfileId(a.into())) },
            pb::ProfileRef { key: Some(pb::profile_ref::Key::ProfileId(b.into())) },
        ]
    };

    let err = g
        .merge(pb::MergeRequest { profiles: refs(&u1.profile_id, &u2.profile_id), force: false, reason: "ticket 7".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("user_id limit"), "{}", err.message());
    let pf = err.get_details_precondition_failure().expect("precondition details");
    assert_eq!(pf.violations[0].subject, "user_id");

    let m = g
        .merge(pb::MergeRequest { profiles: refs(&u2.profile_id, &u1.profile_id), force: true, reason: "ticket 7".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.profile_id, u1.profile_id);
    assert_eq!(m.forced_limits.len(), 1);
    let un = g
        .unmerge(pb::UnmergeRequest { target: Some(pb::unmerge_request::Target::MergeId(m.merge_id.clone())), reason: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(un.new_profile_ids, vec![u2.profile_id.clone()]);
    assert_eq!(g.get_profile(by_id("user_id", "u2")).await.unwrap().into_inner().profile_id, u2.profile_id);

    let split = pb::SplitIdentifiers { profile_id: u1.profile_id.clone(), identifiers: vec![id("email", "one@shop.com")] };
    let s = g
        .unmerge(pb::UnmergeRequest { target: Some(pb::unmerge_request::Target::Split(split)), reason: "false merge".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.identifiers_moved, 1);
    assert_eq!(g.get_profile(by_id("email", "one@shop.com")).await.unwrap().into_inner().profile_id, s.new_profile_ids[0]);

    let d = g
        .delete_profile(pb::DeleteProfileRequest { key: Some(pb::delete_profile_request::Key::Identifier(id("user_id", "u1"))) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.profile_id, u1.profile_id);
    assert_eq!(g.get_profile(by_profile(&u1.profile_id)).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(g.get_profile(by_id("user_id", "u1")).await.unwrap_err().code(), Code::NotFound);
    let again = g.identify(event("e9", &[("user_id", "u1")])).await.unwrap().into_inner();
    assert!(again.created, "an erased identifier can be used again");
    node.shutdown().await.unwrap();
}

/// Each bad request gets the named status and field, and changes nothing.
#[tokio::test]
async fn bad_input_gets_precise_statuses_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let mut g = graph(&node).await;
    let mut admin = admin(&node).await;
    let big = "v".repeat(1025);
    let many: Vec<(String, String)> = (0..65).map(|i| ("anonymous_id".into(), format!("a{i}"))).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let cases: Vec<(pb::IdentifyRequest, Code, &str)> = vec![
        (event("", &[("email", "a@b.co")]), Code::InvalidArgument, "event_id"),
        (event("e", &[]), Code::InvalidArgument, "identifiers"),
        (event("e", &[("shoe_size", "42")]), Code::InvalidArgument, "identifiers[0].type"),
        (event("e", &[("email", "a@b.co"), ("user_id", &big)]), Code::InvalidArgument, "identifiers[1].value"),
        (event("e", &many), Code::InvalidArgument, "identifiers"),
        (
            event("e", &[("user_id", "undefined"), ("device_id", "00000000-0000-0000-0000-000000000000")]),
            Code::InvalidArgument,
            "identifiers",
        ),
        (pb::IdentifyRequest { timestamp_ms: -1, ..event("e", &[("email", "a@b.co")]) }, Code::InvalidArgument, "timestamp_ms"),
    ];
    for (req, code, field) in cases {
        let s = g.identify(req).await.expect_err(field);
        assert_eq!(s.code(), code, "{field}: {}", s.message());
        assert!(s.message().starts_with(&format!("{field}:")), "{field}: {}", s.message());
        let br = s.get_details_bad_request().expect("field violation details");
        assert_eq!(br.field_violations[0].field, field);
    }
    // Over the message size limit (4 MiB by default).
    let huge = pb::IdentifyRequest {
        traits: Some(prost_types::Struct {
            fields: [("blob".to_string(), prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("x".repeat(5 << 20))) })]
                .into(),
        }),
        ..event("e-huge", &[("email", "a@b.co")])
    };
    let s = g.identify(huge).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());

    let s = g.get_profile(pb::GetProfileRequest { key: None, ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().starts_with("key:"), "{}", s.message());
    let s = g.get_profile(by_id("email", "nobody@shop.com")).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert!(!s.message().contains("nobody@shop.com"), "statuses do not echo identity values");
    let s = g.unmerge(pb::UnmergeRequest { target: None, reason: String::new() }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = g.get_merge_record(pb::GetMergeRecordRequest { merge_id: "m_missing".into() }).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    let stats = admin.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.profiles, stats.identifiers, stats.events), (0, 0, 0), "bad input changed nothing");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn identify_stream_answers_in_order_with_per_event_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let mut g = graph(&node).await;
    let mut reqs = Vec::new();
    for i in 0..500 {
        // Person i: an e-mail and a device; every 10th event is re-delivered,
        // every 50th is bad.
        reqs.push(event(&format!("e{i}"), &[("email", &format!("p{}@shop.com", i / 2)), ("device_id", &format!("dev-{i}"))]));
        if i % 10 == 0 {
            reqs.push(event(&format!("e{i}"), &[("email", &format!("p{}@shop.com", i / 2))]));
        }
        if i % 50 == 0 {
            reqs.push(event(&format!("bad{i}"), &[("planet", "mars")]));
        }
    }
    let expected = reqs.clone();
    let out: Vec<pb::IdentifyResponse> =
        g.identify_stream(futures::stream::iter(reqs)).await.unwrap().into_inner().map(|r| r.unwrap()).collect().await;
    assert_eq!(out.len(), expected.len());
    for (req, resp) in expected.iter().zip(&out) {
        if req.event_id.starts_with("bad") {
            let e = resp.error.as_ref().expect("bad events carry an error");
            assert_eq!(e.code, Code::InvalidArgument as i32);
            assert!(e.message.contains("identifiers[0].type"));
        } else {
            assert!(resp.error.is_none(), "{:?}", resp.error);
            assert!(!resp.profile_id.is_empty());
        }
    }
    let dups = out.iter().filter(|r| r.duplicate).count();
    assert_eq!(dups, 50);
    let p = g.get_profile(by_id("email", "p7@shop.com")).await.unwrap().into_inner();
    assert_eq!(p.identifiers.len(), 3, "two devices and the e-mail: {:?}", p.identifiers);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection_serve_off_the_shelf_tools() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let ch = channel(&node).await;
    let mut health = HealthClient::new(ch.clone());
    // SERVING once the node serves its shards (elected leaders), soon after
    // it starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for service in ["", "idgraph.v1.IdentityGraph", "idgraph.v1.Admin"] {
        loop {
            let r = health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
            if r.status == ServingStatus::Serving as i32 {
                break;
            }
            assert_eq!(r.status, ServingStatus::NotServing as i32, "{service:?}");
            assert!(std::time::Instant::now() < deadline, "{service:?} not SERVING within 20 s");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut resp = refl.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
    let first = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else { panic!("unexpected reflection answer") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["idgraph.v1.IdentityGraph", "idgraph.v1.Admin", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn hubs_are_listed_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let mut g = graph(&node).await;
    g.identify(event("owner", &[("user_id", "parent"), ("device_id", "family-tablet")])).await.unwrap();
    for i in 0..5 {
        let r = g
            .identify(event(&format!("kid{i}"), &[("user_id", &format!("kid{i}")), ("device_id", "family-tablet")]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.conflicts.len(), 1);
    }
    let hubs = admin(&node).await.list_hubs(pb::ListHubsRequest { limit: 0 }).await.unwrap().into_inner().hubs;
    assert_eq!(hubs.len(), 1);
    assert_eq!(hubs[0].identifier, Some(id("device_id", "family-tablet")));
    assert!(hubs[0].reason.contains("user_id limit of 5 different profiles"), "{}", hubs[0].reason);
    assert_eq!(hubs[0].colliding_profiles, 5);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_write_queue_is_refused_at_once_and_refused_events_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = idgraph_node::config::NodeConfig { max_waiting_writes: 1, ..config(dir.path()) };
    let node = idgraph_node::server::start(&config).await.expect("node starts");
    let client = graph(&node).await;
    // Far more concurrent events than two proposals in flight and one waiting write.
    let calls = (0..200).map(|i| {
        let mut c = client.clone();
        async move { (i, c.identify(event(&format!("burst-{i}"), &[("user_id", &format!("u{i}"))])).await) }
    });
    let answers = futures::future::join_all(calls).await;
    let (mut taken, mut refused) = (Vec::new(), Vec::new());
    for (i, answer) in answers {
        match answer {
            Ok(_) => taken.push(i),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("overloaded") && s.message().contains("retry"), "{}", s.message());
                refused.push(i);
            }
        }
    }
    assert!(!refused.is_empty(), "200 concurrent events with room for one waiting write: none refused");
    assert!(!taken.is_empty());
    let mut c = client.clone();
    for i in &taken {
        c.get_profile(by_id("user_id", &format!("u{i}"))).await.expect("an acknowledged event is there");
    }
    for i in &refused {
        let s = c.get_profile(by_id("user_id", &format!("u{i}"))).await.expect_err("a refused event changed nothing");
        assert_eq!(s.code(), Code::NotFound);
    }
    // Once the burst is over, the same events are taken.
    for i in &refused {
        c.identify(event(&format!("burst-{i}"), &[("user_id", &format!("u{i}"))])).await.expect("taken after the burst");
    }
    node.shutdown().await.unwrap();
}
