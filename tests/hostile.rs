//! Hostile input, derived from the service descriptor: every string field and every list
//! of every request message of `nudge.v1.NudgeService`, one at a time, gets a value far
//! over any bound (a 70,000-byte string — over fjall's 65,535-byte key limit — or 10,000
//! entries) inside an otherwise valid request. Each must be refused with INVALID_ARGUMENT
//! (or, inside a Track batch, the event rejected) naming the field, and nothing may panic
//! anywhere in the process, caught or not.
//!
//! Its own test binary, because it installs a process-wide panic hook: any panic on any
//! thread (a tonic worker, a shard, the blocking pool) fails the test.

#[allow(dead_code)] // the integration binary uses the rest of it
#[path = "integration/support.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value,
};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::Code;

use nudge::pb::{self, EventType};
use support::{event, person, product_view, props, RawCodec, TestServer, T0};

/// Longer than every bound Nudge has and than any store key can be.
const LONG: usize = 70_000;
/// More entries than any list or map of a request may hold.
const MANY: usize = 10_000;

/// Every panic anywhere in this process, with where it happened.
fn record_panics() -> Arc<Mutex<Vec<String>>> {
    let panics = Arc::new(Mutex::new(Vec::new()));
    let seen = panics.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current().name().unwrap_or("?").to_owned();
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("thread {thread}: {info}"));
        previous(info);
    }));
    panics
}

/// A valid request for each RPC, which the test then spoils one field at a time.
fn templates() -> HashMap<&'static str, Vec<u8>> {
    let mut view = product_view("e1", "user-1", T0, "sku-1", "shoes", Some(30.0));
    let p = props(&mut view);
    p.page = Some("/p/sku-1".into());
    p.search_query = Some("red shoes".into());
    p.order_id = Some("o-1".into());
    p.campaign_id = Some("c-1".into());
    view.anonymous_id = "anon-1".into();
    view.attributes = HashMap::from([("source".to_owned(), "web".to_owned())]);
    let rows = pb::FeatureRows {
        rows: vec![pb::FeatureRow {
            values: HashMap::from([("cart_value".to_owned(), 1.0)]),
        }],
        columns: Vec::new(),
        values: Vec::new(),
    };
    HashMap::from([
        (
            "Track",
            pb::TrackRequest {
                events: vec![view.clone()],
            }
            .encode_to_vec(),
        ),
        (
            "TrackStream",
            pb::TrackStreamRequest {
                sequence: 1,
                events: vec![view],
            }
            .encode_to_vec(),
        ),
        (
            "Identify",
            pb::IdentifyRequest {
                anonymous_id: "anon-1".into(),
                user_id: "user-1".into(),
            }
            .encode_to_vec(),
        ),
        (
            "DeleteUser",
            pb::DeleteUserRequest {
                person: person("user-1"),
            }
            .encode_to_vec(),
        ),
        (
            "Score",
            pb::ScoreRequest {
                subject: Some(pb::score_request::Subject::FeatureRows(rows)),
                models: vec!["purchase".into()],
            }
            .encode_to_vec(),
        ),
        (
            "GetProfile",
            pb::GetProfileRequest {
                person: person("user-1"),
                as_of: None,
            }
            .encode_to_vec(),
        ),
        ("ListModels", Vec::new()),
        ("ReloadModels", Vec::new()),
        (
            "SubscribeTriggers",
            pb::SubscribeTriggersRequest {
                cursor: 0,
                rules: vec!["cart_abandoned".into()],
            }
            .encode_to_vec(),
        ),
        (
            "ExplainTriggers",
            pb::ExplainTriggersRequest {
                person: person("user-1"),
            }
            .encode_to_vec(),
        ),
        (
            "GetExperimentReport",
            pb::GetExperimentReportRequest {
                rule: "cart_abandoned".into(),
            }
            .encode_to_vec(),
        ),
        ("ReloadRules", Vec::new()),
        (
            "ListDeadLetters",
            pb::ListDeadLettersRequest {
                endpoint: "crm".into(),
                limit: 10,
            }
            .encode_to_vec(),
        ),
    ])
}

/// One way to spoil a request: a path of fields to one string, list or map.
#[derive(Clone)]
struct Target {
    path: Vec<FieldDescriptor>,
    /// An over-long string (in a singular field, as a list's first entry or as a map key),
    /// or too many entries.
    spoil: Spoil,
}

#[derive(Clone, Copy, Debug)]
enum Spoil {
    Long,
    Many,
}

impl Target {
    fn name(&self) -> String {
        let path: Vec<&str> = self.path.iter().map(|f| f.name()).collect();
        format!("{} ({:?})", path.join("."), self.spoil)
    }

    fn leaf(&self) -> &FieldDescriptor {
        self.path.last().expect("a target has a field")
    }
}

/// Every string, list and map reachable from `message`, through nested messages.
fn targets(message: &MessageDescriptor, prefix: &[FieldDescriptor], out: &mut Vec<Target>) {
    for field in message.fields() {
        let mut path = prefix.to_vec();
        path.push(field.clone());
        if field.is_list() || field.is_map() {
            out.push(Target {
                path: path.clone(),
                spoil: Spoil::Many,
            });
        }
        if field.is_map() {
            let Kind::Message(entry) = field.kind() else {
                unreachable!("a map field is a list of entry messages")
            };
            if entry.map_entry_key_field().kind() == Kind::String {
                out.push(Target {
                    path,
                    spoil: Spoil::Long,
                });
            }
            continue;
        }
        match field.kind() {
            Kind::String => out.push(Target {
                path,
                spoil: Spoil::Long,
            }),
            // Nudge's request messages do not nest deeply; the bound keeps a recursive
            // message type (none today) from looping.
            Kind::Message(nested) if prefix.len() < 4 => targets(&nested, &path, out),
            _ => {}
        }
    }
}

/// A value for a list or map entry of `field`'s kind, made the `i`th distinct one.
fn entry(field: &FieldDescriptor, i: usize, like: Option<&Value>) -> Value {
    if let Some(like) = like {
        if let Value::String(s) = like {
            return Value::String(format!("{s}-{i}"));
        }
        return like.clone();
    }
    match field.kind() {
        Kind::String => Value::String(format!("x{i}")),
        Kind::Double => Value::F64(i as f64),
        Kind::Message(m) => Value::Message(DynamicMessage::new(m)),
        other => panic!("no entry value for a list of {other:?}; extend the test"),
    }
}

/// A value for a new entry of the map `field`.
fn map_value(field: &FieldDescriptor) -> Value {
    let Kind::Message(entry_type) = field.kind() else {
        unreachable!("a map field is a list of entry messages")
    };
    entry(&entry_type.map_entry_value_field(), 0, None)
}

/// Sets the target in `message` (the rest of the message stays as the template has it).
fn spoil(message: &mut DynamicMessage, path: &[FieldDescriptor], how: Spoil) {
    let field = &path[0];
    let mut value = message.get_field(field).into_owned();
    if path.len() == 1 {
        let long = || "a".repeat(LONG);
        match (&mut value, how) {
            (Value::String(s), Spoil::Long) => *s = long(),
            (Value::List(list), Spoil::Long) => match list.first_mut() {
                Some(first) => *first = Value::String(long()),
                None => list.push(Value::String(long())),
            },
            (Value::List(list), Spoil::Many) => {
                let like = list.first().cloned();
                *list = (0..MANY).map(|i| entry(field, i, like.as_ref())).collect();
            }
            (Value::Map(map), Spoil::Long) => {
                let v = map
                    .values()
                    .next()
                    .cloned()
                    .unwrap_or_else(|| map_value(field));
                map.insert(MapKey::String(long()), v);
            }
            (Value::Map(map), Spoil::Many) => {
                let v = map
                    .values()
                    .next()
                    .cloned()
                    .unwrap_or_else(|| map_value(field));
                for i in 0..MANY {
                    map.insert(MapKey::String(format!("k{i}")), v.clone());
                }
            }
            (v, how) => panic!("cannot spoil {v:?} with {how:?}"),
        }
    } else {
        match &mut value {
            Value::Message(nested) => spoil(nested, &path[1..], how),
            Value::List(list) => {
                if list.is_empty() {
                    list.push(entry(field, 0, None));
                }
                let Value::Message(first) = &mut list[0] else {
                    unreachable!("a path goes on only through messages")
                };
                spoil(first, &path[1..], how);
            }
            other => unreachable!("a path goes on only through messages, not {other:?}"),
        }
    }
    // Setting a field of a oneof clears its siblings, as a caller's request would.
    message.set_field(field, value);
}

/// What the server answered: a status, or the first response message.
async fn call(
    server: &TestServer,
    method: &prost_reflect::MethodDescriptor,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    let path = PathAndQuery::try_from(format!("/nudge.v1.NudgeService/{}", method.name()))
        .expect("a valid path");
    grpc.ready().await.expect("the channel is ready");
    let request = tonic::Request::new(body);
    match (method.is_client_streaming(), method.is_server_streaming()) {
        (false, false) => grpc
            .unary(request, path, RawCodec)
            .await
            .map(|r| r.into_inner()),
        (false, true) => {
            let mut stream = grpc.server_streaming(request, path, RawCodec).await?;
            // An accepted subscription streams until triggers come: what matters is the
            // answer to the request, which arrives at once when it is refused.
            match tokio::time::timeout(Duration::from_secs(2), stream.get_mut().message()).await {
                Ok(message) => message.map(Option::unwrap_or_default),
                Err(_) => Ok(Vec::new()),
            }
        }
        (true, _) => {
            let messages = futures_util::stream::iter([request.into_inner()]);
            let mut acks = grpc
                .streaming(tonic::Request::new(messages), path, RawCodec)
                .await?
                .into_inner();
            acks.message().await.map(Option::unwrap_or_default)
        }
    }
}

/// The refusal `answer` gives, if it names `target`'s field: INVALID_ARGUMENT, or an
/// event rejected inside a Track answer.
fn refusal(method: &str, answer: &Result<Vec<u8>, tonic::Status>) -> Option<(Code, String)> {
    match answer {
        Err(status) => Some((status.code(), status.message().to_owned())),
        Ok(bytes) => {
            let results = match method {
                "Track" => pb::TrackResponse::decode(bytes.as_slice()).ok()?.results,
                "TrackStream" => {
                    pb::TrackStreamResponse::decode(bytes.as_slice())
                        .ok()?
                        .results
                }
                _ => return None,
            };
            results
                .iter()
                .find_map(|r| r.error.as_ref())
                .map(|e| (Code::InvalidArgument, format!("{}: {}", e.field, e.message)))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_over_long_string_and_list_of_every_request_is_refused_naming_it_without_a_panic() {
    let panics = record_panics();
    let pool = DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).expect("the descriptor decodes");
    let service = pool
        .get_service_by_name("nudge.v1.NudgeService")
        .expect("the service is in the descriptor");
    let templates = templates();
    let server = TestServer::start().await;
    // Someone to find, erase and explain.
    support::track(
        &mut server.client().await,
        vec![event("seed", "user-1", EventType::PageView, T0)],
    )
    .await;

    let mut failures = Vec::new();
    let mut tried = 0;
    for method in service.methods() {
        let template = templates
            .get(method.name())
            .unwrap_or_else(|| panic!("add a valid {} request to templates()", method.name()));
        let input = method.input();
        let mut all = Vec::new();
        targets(&input, &[], &mut all);
        for target in all {
            let mut message =
                DynamicMessage::decode(input.clone(), template.as_slice()).expect("decodes");
            spoil(&mut message, &target.path, target.spoil);
            let answer = call(&server, &method, message.encode_to_vec()).await;
            tried += 1;
            let what = format!("{}: {}", method.name(), target.name());
            match refusal(method.name(), &answer) {
                Some((Code::InvalidArgument, text)) if text.contains(target.leaf().name()) => {}
                Some((code, text)) => {
                    let shown: String = text.chars().take(200).collect();
                    failures.push(format!("{what}: {code:?} {shown}"));
                }
                None => failures.push(format!("{what}: accepted")),
            }
        }
    }
    // The server still serves, and every panic anywhere fails the test.
    support::track(
        &mut server.client().await,
        vec![event("after", "user-2", EventType::PageView, T0)],
    )
    .await;
    server.stop().await.unwrap();
    let panics = panics.lock().unwrap().clone();
    assert!(panics.is_empty(), "panics: {panics:#?}");
    assert!(
        tried > 30,
        "only {tried} spoiled requests: the walk missed fields"
    );
    assert!(
        failures.is_empty(),
        "{} of {tried} spoiled requests were not refused naming the field:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
