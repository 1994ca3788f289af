//! Bad input gets INVALID_ARGUMENT (or RESOURCE_EXHAUSTED for size) naming the field; in a
//! batch the good events are still applied; nothing is stored from a bad event; every
//! refusal is counted by reason.

use std::collections::HashMap;

use nudge::pb::{self, score_request::Subject, EventStatus, EventType};
use nudge::time::{DAY_MS, HOUR_MS};
use tonic::Code;

use crate::support::*;

/// (case, the bad event, the field named, the reason)
fn bad_events() -> Vec<(&'static str, pb::Event, &'static str, &'static str)> {
    let at = T0;
    let mut unknown_type = event("b1", "u", EventType::PageView, at);
    unknown_type.r#type = 99;
    let mut no_ids = event("b2", "", EventType::PageView, at);
    no_ids.anonymous_id.clear();
    let future = event("b3", "u", EventType::PageView, at.plus_ms(25 * HOUR_MS));
    let mut nan_price = product_view("b4", "u", at, "p", "c", None);
    props(&mut nan_price).price = Some(f64::NAN);
    let mut inf_dwell = product_view("b5", "u", at, "p", "c", None);
    props(&mut inf_dwell).dwell_seconds = Some(f64::INFINITY);
    let mut no_time = event("b6", "u", EventType::PageView, at);
    no_time.event_time = None;
    let mut no_product = event("b7", "u", EventType::AddToCart, at);
    props(&mut no_product).product_id = None;
    let mut no_type = event("b8", "u", EventType::PageView, at);
    no_type.r#type = 0;
    vec![
        (
            "unknown type",
            unknown_type,
            "events[0].type",
            "unknown_event_type",
        ),
        ("no ids", no_ids, "events[1].user_id", "missing"),
        ("future", future, "events[2].event_time", "in_future"),
        ("NaN", nan_price, "events[3].properties.price", "not_finite"),
        (
            "infinity",
            inf_dwell,
            "events[4].properties.dwell_seconds",
            "not_finite",
        ),
        ("no time", no_time, "events[5].event_time", "missing"),
        (
            "no product",
            no_product,
            "events[6].properties.product_id",
            "missing",
        ),
        ("no type", no_type, "events[7].type", "missing"),
    ]
}

#[tokio::test]
async fn each_bad_event_is_reported_on_its_own_and_the_good_ones_apply() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let cases = bad_events();
    let mut events: Vec<pb::Event> = cases.iter().map(|(_, e, _, _)| e.clone()).collect();
    let good_at = events.len();
    events.push(product_view("g1", "good", T0, "p1", "shoes", Some(10.0)));
    let response = track(&mut client, events).await;

    for (i, (case, _, field, reason)) in cases.iter().enumerate() {
        let r = &response.results[i];
        assert_eq!(r.status, EventStatus::Rejected as i32, "{case}");
        let error = r.error.as_ref().unwrap();
        assert_eq!(
            (error.field.as_str(), error.reason.as_str()),
            (*field, *reason),
            "{case}"
        );
        assert!(!error.message.is_empty(), "{case}");
        assert!(r.scores.is_empty(), "{case}");
    }
    let good = &response.results[good_at];
    assert_eq!(good.status, EventStatus::Accepted as i32);
    assert_eq!(good.event_id, "g1");
    assert_eq!(good.scores.len(), 2);

    // The good event is in the profile; the person of the bad events has none.
    let f = features(&mut client, "good").await;
    assert_feature(&f, "session_product_views", 1.0);
    let missing = client
        .get_profile(pb::GetProfileRequest {
            person: person("u"),
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let metrics = server.metrics().await;
    for (series, count) in [
        (
            "nudge_invalid_input_total{reason=\"missing\",rpc=\"Track\"}",
            4.0,
        ),
        (
            "nudge_invalid_input_total{reason=\"not_finite\",rpc=\"Track\"}",
            2.0,
        ),
        (
            "nudge_invalid_input_total{reason=\"in_future\",rpc=\"Track\"}",
            1.0,
        ),
        (
            "nudge_invalid_input_total{reason=\"unknown_event_type\",rpc=\"Track\"}",
            1.0,
        ),
        (
            "nudge_events_total{outcome=\"rejected\",source=\"grpc\",type=\"unknown\"}",
            2.0,
        ),
        (
            "nudge_events_total{outcome=\"accepted\",source=\"grpc\",type=\"product_view\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric_value(&metrics, series), Some(count), "{series}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn request_level_limits() {
    let mut config = test_config();
    config.server.max_batch_events = 10;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;

    let status = |r: Result<tonic::Response<pb::TrackResponse>, tonic::Status>| r.unwrap_err();
    let too_many: Vec<pb::Event> = (0..11)
        .map(|i| event(&format!("e{i}"), "u", EventType::PageView, T0))
        .collect();
    let err = status(client.track(pb::TrackRequest { events: too_many }).await);
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("events:"), "{}", err.message());
    assert!(err.message().contains("at most 10"), "{}", err.message());

    let err = status(client.track(pb::TrackRequest { events: vec![] }).await);
    assert_eq!(err.code(), Code::InvalidArgument);

    // An oversize message: RESOURCE_EXHAUSTED, and the server keeps serving.
    let mut huge = event("big", "u", EventType::PageView, T0);
    huge.attributes = HashMap::from([("blob".to_owned(), "x".repeat(5 << 20))]);
    let err = status(
        client
            .track(pb::TrackRequest {
                events: vec![huge.clone()],
            })
            .await,
    );
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("max_message_bytes"),
        "{}",
        err.message()
    );
    // The same message on a TrackStream: the same status for the same cause.
    let message = pb::TrackStreamRequest {
        sequence: 1,
        events: vec![huge],
    };
    let mut acks = client
        .track_stream(futures_util::stream::iter([message]))
        .await
        .expect("the stream opens")
        .into_inner();
    let err = acks.message().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("max_message_bytes"),
        "{}",
        err.message()
    );
    track(
        &mut client,
        vec![event("after", "u", EventType::PageView, T0)],
    )
    .await;
    let metrics = server.metrics().await;
    for rpc in ["Track", "TrackStream"] {
        let series =
            format!("nudge_invalid_input_total{{reason=\"message_too_large\",rpc=\"{rpc}\"}}");
        assert_eq!(metric_value(&metrics, &series), Some(1.0), "{series}");
    }

    // Too many attributes on one event is that event's problem, not the batch's.
    let mut wide = event("wide", "u2", EventType::PageView, T0);
    wide.attributes = (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let r = track(&mut client, vec![wide]).await;
    assert_eq!(
        r.results[0].error.as_ref().unwrap().field,
        "events[0].attributes"
    );

    // An event just inside the skew allowance is fine; a day and a second is not.
    let edge = event("edge", "u", EventType::PageView, T0.plus_ms(DAY_MS));
    let r = track(&mut client, vec![edge]).await;
    assert_eq!(r.results[0].status, EventStatus::Accepted as i32);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_score_requests_name_the_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let rows = |values: Vec<(&str, f64)>| pb::ScoreRequest {
        subject: Some(Subject::FeatureRows(pb::FeatureRows {
            rows: vec![pb::FeatureRow {
                values: values.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            }],
            ..Default::default()
        })),
        models: vec![],
    };
    let cases: Vec<(pb::ScoreRequest, Code, &str)> = vec![
        (
            rows(vec![("no_such_feature", 1.0)]),
            Code::InvalidArgument,
            "feature_rows.rows[0].values[\"no_such_feature\"]",
        ),
        (
            rows(vec![("cart_value", f64::NAN)]),
            Code::InvalidArgument,
            "feature_rows.rows[0].values[\"cart_value\"]",
        ),
        (
            rows(vec![("cart_value", f64::NEG_INFINITY)]),
            Code::InvalidArgument,
            "is -inf",
        ),
        (
            pb::ScoreRequest {
                subject: None,
                models: vec![],
            },
            Code::InvalidArgument,
            "subject",
        ),
        (
            pb::ScoreRequest {
                models: vec!["purchase".into(), "nope".into()],
                ..rows(vec![])
            },
            Code::InvalidArgument,
            "models[1]",
        ),
        (
            pb::ScoreRequest {
                subject: Some(Subject::Person(pb::PersonRef::default())),
                models: vec![],
            },
            Code::InvalidArgument,
            "person.user_id",
        ),
    ];
    for (request, code, needle) in cases {
        let err = client.score(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().contains(needle),
            "{needle:?} not in {:?}",
            err.message()
        );
    }
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_invalid_input_total{reason=\"unknown_feature\",rpc=\"Score\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_invalid_input_total{reason=\"not_finite\",rpc=\"Score\"}"
        ),
        Some(2.0)
    );
    server.stop().await.unwrap();
}

/// Every way a Score request's rows can be malformed in the packed form (`columns` +
/// `values`), or by mixing the two forms, is INVALID_ARGUMENT naming the field, and is
/// counted under its reason.
#[tokio::test]
async fn bad_packed_rows_name_the_field_and_reason() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let max = test_config().server.max_score_rows;
    let request =
        |rows: Vec<pb::FeatureRow>, columns: &[&str], values: Vec<f64>| pb::ScoreRequest {
            subject: Some(Subject::FeatureRows(pb::FeatureRows {
                rows,
                columns: columns.iter().map(|c| c.to_string()).collect(),
                values,
            })),
            models: vec![],
        };
    let map_row = || pb::FeatureRow {
        values: [("cart_value".to_owned(), 1.0)].into(),
    };
    let two = ["cart_value", "sessions_7d"];
    // (case, request, the field named, the reason)
    let cases: Vec<(&str, pb::ScoreRequest, &str, &str)> = vec![
        (
            "rows and columns",
            request(vec![map_row()], &two, vec![]),
            "feature_rows",
            "conflicting",
        ),
        (
            "rows and values",
            request(vec![map_row()], &[], vec![1.0]),
            "feature_rows",
            "conflicting",
        ),
        (
            "no rows in either form",
            request(vec![], &[], vec![]),
            "feature_rows.rows",
            "missing",
        ),
        (
            "values without columns",
            request(vec![], &[], vec![1.0, 2.0]),
            "feature_rows.columns",
            "missing",
        ),
        (
            "columns without values",
            request(vec![], &two, vec![]),
            "feature_rows.values",
            "missing",
        ),
        (
            "unknown column",
            request(vec![], &["cart_value", "no_such_feature"], vec![1.0, 2.0]),
            "feature_rows.columns[1]",
            "unknown_feature",
        ),
        (
            "repeated column",
            request(
                vec![],
                &["cart_value", "sessions_7d", "cart_value"],
                vec![1.0, 2.0, 3.0],
            ),
            "feature_rows.columns[2]",
            "duplicate",
        ),
        (
            "values not a whole number of rows",
            request(vec![], &two, vec![1.0, 2.0, 3.0]),
            "feature_rows.values",
            "shape_mismatch",
        ),
        (
            "too many rows",
            request(vec![], &two, vec![1.0; 2 * (max + 1)]),
            "feature_rows.values",
            "too_many",
        ),
        (
            "infinite value",
            request(vec![], &two, vec![1.0, 2.0, 3.0, f64::INFINITY]),
            "feature_rows.values[3]",
            "not_finite",
        ),
    ];
    for (case, request, field, reason) in cases {
        let series = format!("nudge_invalid_input_total{{reason=\"{reason}\",rpc=\"Score\"}}");
        let before = metric_value(&server.metrics().await, &series)
            .unwrap_or_else(|| panic!("{series} is not preset"));
        let err = client.score(request).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{case}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{case}: {field:?} is not the field of {:?}",
            err.message()
        );
        let after = metric_value(&server.metrics().await, &series).unwrap_or(0.0);
        assert_eq!(after - before, 1.0, "{case}: counted under {reason}");
    }

    // A column's field path is its index, so the message names the column.
    let err = client
        .score(request(vec![], &["no_such_feature"], vec![1.0]))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .starts_with("feature_rows.columns[0]: \"no_such_feature\" is not a feature"),
        "{}",
        err.message()
    );

    // Exactly the limit is fine, and NaN is a missing value, not a refusal.
    let at_limit = client
        .score(request(vec![], &two, vec![f64::NAN; 2 * max]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(at_limit.rows.len(), max);
    server.stop().await.unwrap();
}

/// Finite but huge amounts are refused with `out_of_range` naming the field, before they
/// reach a profile: `price = 1e308` would make the cart's value infinite.
#[tokio::test]
async fn huge_amounts_are_out_of_range() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let u = "big-spender";
    let mut huge_price = event("e3", u, EventType::AddToCart, T0.plus_ms(3_000));
    let p = props(&mut huge_price);
    p.product_id = Some("p".into());
    p.price = Some(1e308);
    p.quantity = Some(10);
    let mut huge_order = event("e4", u, EventType::Purchase, T0.plus_ms(4_000));
    props(&mut huge_order).order_value = Some(1.7e308);
    let mut fine_add = event("e2", u, EventType::AddToCart, T0.plus_ms(2_000));
    let p = props(&mut fine_add);
    p.product_id = Some("q".into());
    p.price = Some(25.0);
    p.quantity = Some(2);
    let events = vec![
        event("e0", u, EventType::PageView, T0),
        product_view("e1", u, T0.plus_ms(1_000), "q", "c", Some(5.0)),
        fine_add,
        huge_price,
        huge_order,
    ];
    let response = track(&mut client, events).await;
    let statuses: Vec<i32> = response.results.iter().map(|r| r.status).collect();
    let (accepted, rejected) = (EventStatus::Accepted as i32, EventStatus::Rejected as i32);
    assert_eq!(statuses, [accepted, accepted, accepted, rejected, rejected]);
    for (at, field) in [
        (3, "events[3].properties.price"),
        (4, "events[4].properties.order_value"),
    ] {
        let error = response.results[at].error.as_ref().unwrap();
        assert_eq!(
            (error.field.as_str(), error.reason.as_str()),
            (field, "out_of_range")
        );
        assert!(error.message.contains("at most"), "{}", error.message);
    }

    let f = features(&mut client, u).await;
    assert_feature(&f, "cart_value", 50.0);
    assert_feature(&f, "revenue_90d", 0.0);
    assert!(f.values().all(|v| !v.is_infinite()), "{f:?}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_invalid_input_total{reason=\"out_of_range\",rpc=\"Track\"}"
        ),
        Some(2.0)
    );
    server.stop().await.unwrap();
}

/// A malformed request is answered with the proto field's name (`Event.type`), not the
/// Rust identifier prost generates for it (`r#type`).
/// An undecodable `type` is answered INVALID_ARGUMENT naming the proto field (not prost's
/// `r#type`), and counted for `rpc`.
async fn assert_undecodable_type(server: &TestServer, err: &tonic::Status, rpc: &str) {
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("Event.type:"), "{}", err.message());
    assert!(!err.message().contains("r#"), "{}", err.message());
    let series = format!("nudge_invalid_input_total{{reason=\"undecodable\",rpc=\"{rpc}\"}}");
    assert_eq!(
        metric_value(&server.metrics().await, &series),
        Some(1.0),
        "{series}"
    );
}

#[tokio::test]
async fn a_malformed_message_names_the_proto_field() {
    let server = TestServer::start().await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    // TrackRequest { events (1, length-delimited): Event { type (4) sent as a
    // length-delimited field where the enum must be a varint } }.
    let event = [0x22, 0x01, b'A'];
    let mut request = vec![0x0a, event.len() as u8];
    request.extend(event);
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(request),
            tonic::codegen::http::uri::PathAndQuery::from_static("/nudge.v1.NudgeService/Track"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_undecodable_type(&server, &err, "Track").await;

    // The same event inside a TrackStream message (events is field 2 there): the status
    // comes in the stream's trailers.
    let mut message = vec![0x12, event.len() as u8];
    message.extend(event);
    grpc.ready().await.unwrap();
    let mut acks = grpc
        .streaming(
            tonic::Request::new(futures_util::stream::iter([message])),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/nudge.v1.NudgeService/TrackStream",
            ),
            RawCodec,
        )
        .await
        .expect("the stream opens")
        .into_inner();
    let err = acks.message().await.unwrap_err();
    assert_undecodable_type(&server, &err, "TrackStream").await;
    server.stop().await.unwrap();
}
