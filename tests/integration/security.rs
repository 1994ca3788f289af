//! TLS, API keys, scopes, rate limits and secrets, from outside: certificates made here
//! (rcgen), real TLS over loopback sockets, tonic's and reqwest's own TLS clients, and
//! the real binary for what its output must never show.

use std::path::Path;
use std::time::{Duration, Instant};

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use nudge::api::auth::{INFERENCE_PROBES, INFERENCE_SCOPES, INFERENCE_SERVICE, SCOPES, SERVICE};
use nudge::config::Config;
use nudge::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use nudge::pb::inference::{ServerLiveRequest, ServerReadyRequest};
use nudge::pb::nudge_service_client::NudgeServiceClient;
use nudge::pb::{self, EventType};
use nudge::security::keys::{self, Scope};

use crate::support::*;

/// A certificate authority made for one test.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `localhost` and 127.0.0.1, for a server or a client: (cert, key).
    fn leaf(&self, client: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            if client { "a client" } else { "localhost" },
        );
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes a server certificate signed by `ca` where `config.server.tls` reads it. The key
/// is written first: a reload between the two writes sees a certificate that does not
/// match its key and is refused, so what serves is always a matching pair.
fn install_server_certificate(dir: &Path, ca: &Ca) {
    let (cert, key) = ca.leaf(false);
    write_replacing(&dir.join("server.key"), &key);
    write_replacing(&dir.join("server.crt"), &cert);
}

/// Replaces a file by a rename, as secrets agents (Kubernetes, Vault) do.
fn write_replacing(path: &Path, text: &str) {
    let temp = path.with_extension("new");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

fn tls_config(dir: &Path, server_ca: &Ca, client_ca: Option<&Ca>) -> Config {
    install_server_certificate(dir, server_ca);
    let mut config = test_config();
    config.server.tls.cert_file = Some(dir.join("server.crt"));
    config.server.tls.key_file = Some(dir.join("server.key"));
    if let Some(ca) = client_ca {
        std::fs::write(dir.join("clients-ca.crt"), ca.pem()).unwrap();
        config.server.tls.client_ca_file = Some(dir.join("clients-ca.crt"));
    }
    config
}

/// A TLS channel to `addr` trusting `ca`, with a client certificate when given.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Ca,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// Whether a health check over a channel made this way succeeds: errors in connecting
/// and in the call both count as refused, since TLS 1.3 reports a refused client
/// certificate only at the first read.
async fn serves(channel: Result<Channel, tonic::transport::Error>) -> Result<(), String> {
    let channel = channel.map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_plaintext_a_wrong_ca_and_a_missing_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let stranger = Ca::new("someone else's CA");
    let server = TestServer::start_with(tls_config(dir.path(), &server_ca, Some(&client_ca))).await;
    let addr = server.grpc_addr;
    let client_cert = client_ca.leaf(true);

    let good = serves(tls_channel(addr, &server_ca, Some(&client_cert)).await).await;
    assert_eq!(good, Ok(()), "the right CA and client certificate");
    // The same channel carries the API.
    let channel = tls_channel(addr, &server_ca, Some(&client_cert))
        .await
        .unwrap();
    let answer = NudgeServiceClient::new(channel)
        .track(pb::TrackRequest {
            events: vec![event("e1", "u1", EventType::PageView, T0)],
        })
        .await
        .expect("Track over mutual TLS");
    assert_eq!(answer.into_inner().results.len(), 1);

    let plaintext = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    assert!(serves(plaintext).await.is_err(), "a plaintext client");
    let wrong_ca = serves(tls_channel(addr, &stranger, Some(&client_cert)).await).await;
    assert!(wrong_ca.is_err(), "a client that trusts another CA");
    let no_cert = serves(tls_channel(addr, &server_ca, None).await).await;
    assert!(no_cert.is_err(), "no client certificate under mutual TLS");
    let foreign_cert = stranger.leaf(true);
    let foreign = serves(tls_channel(addr, &server_ca, Some(&foreign_cert)).await).await;
    assert!(foreign.is_err(), "a client certificate from an unknown CA");

    // The metrics listener speaks the same TLS, to an HTTP/1.1 client.
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", client_cert.0, client_cert.1).as_bytes())
            .unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(server_ca.pem().as_bytes()).unwrap())
        .identity(identity)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/metrics", server.metrics_addr.port());
    let text = https.get(&url).send().await.unwrap().text().await.unwrap();
    let refused = |reason: &str| {
        metric_value(
            &text,
            &format!("nudge_tls_handshake_failures_total{{listener=\"grpc\",reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    // The plaintext client, the wrong CA's client (which refuses the server) and the two
    // refused client certificates.
    assert!(refused("refused") >= 3.0, "{text}");
    let plain = reqwest::get(format!("http://{}/metrics", server.metrics_addr)).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::new("first CA");
    let second = Ca::new("second CA");
    let server = TestServer::start_with(tls_config(dir.path(), &first, None)).await;
    let addr = server.grpc_addr;
    serves(tls_channel(addr, &first, None).await).await.unwrap();
    let open = tls_channel(addr, &first, None).await.unwrap();

    install_server_certificate(dir.path(), &second);
    let deadline = Instant::now() + Duration::from_secs(30);
    while serves(tls_channel(addr, &second, None).await)
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        serves(tls_channel(addr, &first, None).await).await.is_err(),
        "new connections get the new certificate"
    );
    // A connection made before the rotation keeps working.
    serves(Ok(open)).await.unwrap();

    // A broken certificate is refused, counted, and the one in force stays.
    let before =
        metric_value(&metrics_over_tls(&server, &second).await, RELOADS_REFUSED).unwrap_or(0.0);
    write_replacing(&dir.path().join("server.crt"), "not a certificate");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = metric_value(&metrics_over_tls(&server, &second).await, RELOADS_REFUSED);
        if refused.unwrap_or(0.0) > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broken certificate was never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serves(tls_channel(addr, &second, None).await)
        .await
        .unwrap();
    server.stop().await.unwrap();
}

const RELOADS_REFUSED: &str = "nudge_credential_reloads_total{file=\"tls\",outcome=\"refused\"}";

async fn metrics_over_tls(server: &TestServer, ca: &Ca) -> String {
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/metrics", server.metrics_addr.port());
    https.get(&url).send().await.unwrap().text().await.unwrap()
}

/// A keys file with one key per scope and one with every scope; returns the keys.
fn keys_file(path: &Path, extra: &[(&str, &[Scope], f64, u32)]) -> Vec<(String, String)> {
    let mut made = Vec::new();
    for scope in Scope::ALL {
        let key = keys::add(path, scope.as_str(), &[scope], 0.0, 0).unwrap();
        made.push((scope.as_str().to_owned(), key));
    }
    made.push((
        "all".into(),
        keys::add(path, "all", &Scope::ALL, 0.0, 0).unwrap(),
    ));
    for (name, scopes, rate, burst) in extra {
        made.push((
            name.to_string(),
            keys::add(path, name, scopes, *rate, *burst).unwrap(),
        ));
    }
    made
}

fn keyed_config(keys: &Path) -> Config {
    let mut config = test_config();
    config.auth.keys_file = Some(keys.to_owned());
    config
}

/// Calls `method` (of its service) with an empty message and `key`: the status, or
/// OK. An accepted server stream that sends nothing yet is OK after `patience`.
async fn call_as(
    channel: Channel,
    method: &prost_reflect::MethodDescriptor,
    key: Option<&str>,
    patience: Option<Duration>,
) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = PathAndQuery::try_from(format!(
        "/{}/{}",
        method.parent_service().full_name(),
        method.name()
    ))
    .unwrap();
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(Vec::new());
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    let answer = async {
        match (method.is_client_streaming(), method.is_server_streaming()) {
            (false, false) => grpc.unary(request, path, RawCodec).await.map(|_| ()),
            (false, true) => {
                let mut stream = grpc.server_streaming(request, path, RawCodec).await?;
                stream.get_mut().message().await.map(|_| ())
            }
            (true, _) => {
                let (metadata, extensions, body) = request.into_parts();
                let messages = futures_util::stream::iter([body]);
                let request = tonic::Request::from_parts(metadata, extensions, messages);
                let mut acks = grpc.streaming(request, path, RawCodec).await?.into_inner();
                acks.message().await.map(|_| ())
            }
        }
    };
    let answer = match patience {
        Some(patience) => match tokio::time::timeout(patience, answer).await {
            Ok(answer) => answer,
            Err(_) => Ok(()),
        },
        None => answer.await,
    };
    match answer {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Every method a key's scope decides: Nudge's service's and the Open Inference
/// Protocol's but for its probes (open or closed with health checks).
fn methods() -> Vec<prost_reflect::MethodDescriptor> {
    let pool = prost_reflect::DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
    let nudge = pool.get_service_by_name(SERVICE).unwrap();
    let inference = pool.get_service_by_name(INFERENCE_SERVICE).unwrap();
    nudge
        .methods()
        .chain(
            inference
                .methods()
                .filter(|m| !INFERENCE_PROBES.contains(&m.name())),
        )
        .collect()
}

/// The scope the code gives a method of [`methods`].
fn scope_in_code(method: &prost_reflect::MethodDescriptor) -> Option<Scope> {
    let table = if method.parent_service().full_name() == SERVICE {
        SCOPES
    } else {
        INFERENCE_SCOPES
    };
    table
        .iter()
        .find(|(m, _)| *m == method.name())
        .map(|&(_, s)| s)
}

/// The README's method → scope table (the Security section): what is documented.
fn documented_scopes() -> Vec<(String, Scope)> {
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    let table = readme
        .split("| method | scope |")
        .nth(1)
        .expect("the README's scope table");
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let method = cells[0].strip_prefix('`')?.strip_suffix('`')?;
            let scope = Scope::parse(cells[1].trim_matches('`')).unwrap();
            Some((method.to_owned(), scope))
        })
        .collect()
}

#[test]
fn every_rpc_of_the_services_has_a_documented_scope_decision() {
    let documented = documented_scopes();
    let methods = methods();
    for method in &methods {
        let name = method.name();
        let doc = documented.iter().find(|(m, _)| m == name);
        assert!(
            doc.is_some(),
            "{name} has no row in the README's scope table"
        );
        let code = scope_in_code(method);
        assert!(code.is_some(), "{name} has no entry in api::auth's tables");
        assert_eq!(
            doc.unwrap().1,
            code.unwrap(),
            "{name}: README and code disagree"
        );
    }
    assert_eq!(
        SCOPES.len() + INFERENCE_SCOPES.len(),
        methods.len(),
        "a scope table names a method the services lack"
    );
    let rpcs = documented.iter().filter(|(m, _)| !m.contains(' ')).count();
    assert_eq!(
        rpcs,
        methods.len(),
        "the README names a method the services lack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_under_each_scope_is_allowed_or_denied_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let made = keys_file(&path, &[]);
    let server = TestServer::start_with(keyed_config(&path)).await;
    let channel = server.channel().await;
    let documented = documented_scopes();
    for method in methods() {
        let needs = documented
            .iter()
            .find(|(m, _)| m == method.name())
            .unwrap()
            .1;
        let code = call_as(channel.clone(), &method, None, None).await;
        assert_eq!(
            code,
            Code::Unauthenticated,
            "{} without a key",
            method.name()
        );
        let code = call_as(channel.clone(), &method, Some("nudge_not-a-key"), None).await;
        assert_eq!(
            code,
            Code::Unauthenticated,
            "{} with an unknown key",
            method.name()
        );
        for (name, key) in &made {
            let allowed = name == "all" || name == needs.as_str();
            let patience = allowed.then_some(Duration::from_millis(300));
            let code = call_as(channel.clone(), &method, Some(key), patience).await;
            if allowed {
                assert!(
                    !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
                    "{} with the {name} key: {code:?}",
                    method.name()
                );
            } else {
                assert_eq!(
                    code,
                    Code::PermissionDenied,
                    "{} with the {name} key",
                    method.name()
                );
            }
        }
    }
    // Health, the inference probes and reflection are open by default.
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health needs no key");
    let mut probes = GrpcInferenceServiceClient::new(channel.clone());
    let live = probes.server_live(ServerLiveRequest {}).await;
    assert!(live.expect("ServerLive needs no key").into_inner().live);
    let ready = probes.server_ready(ServerReadyRequest {}).await;
    assert!(ready.expect("ServerReady needs no key").into_inner().ready);

    // A refusal names the key and the scope; the counts name keys, never carry them.
    let denied = NudgeServiceClient::new(channel.clone())
        .delete_user(with_key(
            pb::DeleteUserRequest {
                person: person("u1"),
            },
            &made[0].1,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("\"track\"")
            && denied.message().contains("\"admin\" scope")
            && denied.message().contains("DeleteUser"),
        "{}",
        denied.message()
    );
    let text = server.metrics().await;
    let methods = methods().len() as f64;
    let series = |key: &str, reason: &str| {
        metric_value(
            &text,
            &format!("nudge_auth_refused_total{{key=\"{key}\",reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(series("", "missing"), methods, "{text}");
    assert_eq!(series("", "unknown"), methods, "{text}");
    let denied_to_read = SCOPES
        .iter()
        .chain(INFERENCE_SCOPES)
        .filter(|(_, s)| *s != Scope::Read)
        .count() as f64;
    assert_eq!(series("read", "scope"), denied_to_read, "{text}");
    for (_, key) in &made {
        assert!(!text.contains(key.as_str()), "a key in the metrics");
    }
    server.stop().await.unwrap();
}

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_health_and_metrics_need_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let made = keys_file(&path, &[]);
    let key = |name: &str| made.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let mut config = keyed_config(&path);
    config.auth.open_health = false;
    config.auth.metrics_require_key = true;
    let server = TestServer::start_with(config).await;
    let mut health = HealthClient::new(server.channel().await);
    let refused = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    health
        .check(with_key(HealthCheckRequest::default(), &key("score")))
        .await
        .expect("any known key may check health");
    // The inference probes are closed with health, open to any known key.
    let mut probes = GrpcInferenceServiceClient::new(server.channel().await);
    let refused = probes
        .server_ready(ServerReadyRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = probes.server_live(ServerLiveRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    probes
        .server_live(with_key(ServerLiveRequest {}, &key("track")))
        .await
        .expect("any known key may probe");

    let url = format!("http://{}/metrics", server.metrics_addr);
    let http = reqwest::Client::new();
    let status = |request: reqwest::RequestBuilder| async move {
        request.send().await.unwrap().status().as_u16()
    };
    assert_eq!(status(http.get(&url)).await, 401);
    assert_eq!(status(http.get(&url).bearer_auth(key("read"))).await, 401);
    assert_eq!(
        status(http.get(&url).bearer_auth(key("metrics"))).await,
        200
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_over_its_rate_is_throttled_while_another_keeps_full_speed() {
    use tonic_types::StatusExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let (rate, burst) = (5.0, 5);
    let made = keys_file(
        &path,
        &[
            ("noisy", &[Scope::Read], rate, burst),
            ("streamer", &[Scope::Track], 0.001, 3),
        ],
    );
    let key = |name: &str| made.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let server = TestServer::start_with(keyed_config(&path)).await;
    let calls = 100;
    let hammer = |key: String, channel: Channel| async move {
        let mut client = NudgeServiceClient::new(channel);
        let started = Instant::now();
        let mut answers = Vec::new();
        for _ in 0..calls {
            answers.push(
                client
                    .list_models(with_key(pb::ListModelsRequest::default(), &key))
                    .await,
            );
        }
        (answers, started.elapsed())
    };
    let (noisy, quiet) = tokio::join!(
        hammer(key("noisy"), server.channel().await),
        hammer(key("read"), server.channel().await),
    );
    let (answers, elapsed) = noisy;
    let served = answers.iter().filter(|a| a.is_ok()).count();
    let allowed = burst as f64 + rate * elapsed.as_secs_f64() + 1.0;
    assert!(served >= burst as usize, "served {served}");
    assert!(
        served as f64 <= allowed,
        "served {served} in {elapsed:?}, allowed {allowed}"
    );
    let throttled: Vec<&tonic::Status> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert_eq!(throttled.len(), calls - served);
    for status in &throttled {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let retry = status.get_details_retry_info().expect("RetryInfo");
        let delay = retry.retry_delay.unwrap();
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_secs_f64(1.0 / rate),
            "{delay:?}"
        );
        assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
    }
    let (answers, _) = quiet;
    assert!(
        answers.iter().all(|a| a.is_ok()),
        "the other key kept full speed"
    );

    // Each message of a TrackStream is a request: three fit the streamer's burst.
    let mut client = NudgeServiceClient::new(server.channel().await);
    let messages: Vec<pb::TrackStreamRequest> = (0..6u64)
        .map(|i| pb::TrackStreamRequest {
            sequence: i,
            events: vec![event(&format!("s{i}"), "u1", EventType::PageView, T0)],
        })
        .collect();
    let mut acks = client
        .track_stream(with_key(
            futures_util::stream::iter(messages),
            &key("streamer"),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut acked = Vec::new();
    let ended = loop {
        match acks.message().await {
            Ok(Some(ack)) => acked.push(ack.sequence),
            Ok(None) => panic!("the stream ended without its refusal after {acked:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(acked, [0, 1, 2]);
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");

    let text = server.metrics().await;
    let limited = metric_value(
        &text,
        "nudge_auth_refused_total{key=\"noisy\",reason=\"rate_limited\"}",
    );
    assert_eq!(limited, Some(throttled.len() as f64), "{text}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_added_and_revoked_take_effect_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let first = keys::add(&path, "first", &[Scope::Read], 0.0, 0).unwrap();
    let server = TestServer::start_with(keyed_config(&path)).await;
    let channel = server.channel().await;
    let list = |key: String| {
        let channel = channel.clone();
        async move {
            NudgeServiceClient::new(channel)
                .list_models(with_key(pb::ListModelsRequest::default(), &key))
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    assert_eq!(list(first.clone()).await, Ok(()));

    // `nudge keys add`, as an operator runs it, prints the new key once.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["keys", "add", "second", "--scopes", "read,score", "--file"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(second.starts_with("nudge_"), "{second}");
    until(
        || list(second.clone()),
        |r| r.is_ok(),
        "the added key to work",
    )
    .await;

    // Revoking is deleting the entry.
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: String = text
        .split("\n[[key]]")
        .filter(|block| !block.contains("name = \"first\""))
        .collect::<Vec<_>>()
        .join("\n[[key]]");
    write_replacing(&path, &kept);
    until(
        || list(first.clone()),
        |r| *r == Err(Code::Unauthenticated),
        "the revoked key to be refused",
    )
    .await;
    assert_eq!(list(second.clone()).await, Ok(()));

    // A broken keys file is refused; the keys in force stay.
    write_replacing(&path, "[[key]]\nname = ");
    let metrics = server.metrics_addr;
    until(
        || async move {
            let text = reqwest::get(format!("http://{metrics}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metric_value(
                &text,
                "nudge_credential_reloads_total{file=\"keys\",outcome=\"refused\"}",
            )
        },
        |refused| refused.is_some_and(|n| n >= 1.0),
        "the broken keys file to be refused",
    )
    .await;
    assert_eq!(list(second).await, Ok(()));
    server.stop().await.unwrap();
}

/// Calls `probe` until `done` says its answer is the awaited one (30 s at most): for a
/// change the server makes in the background, observed from outside.
async fn until<T, F, Fut>(probe: F, done: impl Fn(&T) -> bool, what: &str)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = probe().await;
        if done(&answer) {
            return;
        }
        assert!(Instant::now() < deadline, "waited 30 s for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_urls_aimed_inside_are_refused_without_the_allow() {
    let base = test_config();
    for url in [
        "http://127.0.0.1:9000/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9000/hook",
        "http://[::ffff:127.0.0.1]:9000/hook",
    ] {
        let mut config = base.clone();
        config.triggers.webhooks = vec![hook(url, false)];
        let problems = config.validate().unwrap_err().to_string();
        assert!(
            problems.contains("allow_internal_addresses"),
            "{url}: {problems}"
        );
        config.triggers.webhooks = vec![hook(url, true)];
        config.validate().expect(url);
    }
}

fn hook(url: &str, allow: bool) -> nudge::config::WebhookConfig {
    nudge::config::WebhookConfig {
        name: "crm".into(),
        url: url.into(),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        secret_file: None,
        rules: vec![],
        concurrency: 1,
        rate_per_second: 10.0,
        max_attempts: 3,
        initial_backoff_ms: 10,
        max_backoff_ms: 100,
        timeout_ms: 1000,
        allow_internal_addresses: allow,
        format: Default::default(),
        cloudevents_source: "/nudge".into(),
    }
}

/// The binary's whole output, from check-config to a served and refused call, never
/// shows an API key, a webhook secret, the pseudonymization key or the TLS private key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let keys_path = dir.path().join("keys.toml");
    let api_key = keys::add(&keys_path, "svc", &[Scope::Track, Scope::Read], 0.0, 0).unwrap();
    let pseudonym_key = "pseudonymization-key-0123456789abcdef";
    std::fs::write(dir.path().join("identity.key"), pseudonym_key).unwrap();
    let webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let ca = Ca::new("test CA");
    install_server_certificate(dir.path(), &ca);
    let tls_key = std::fs::read_to_string(dir.path().join("server.key")).unwrap();
    let tls_key_body: Vec<&str> = tls_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let config = dir.path().join("nudge.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server.tls]
cert_file = "{dir}/server.crt"
key_file = "{dir}/server.key"
[auth]
keys_file = "{dir}/keys.toml"
[identity]
pseudonymize_key_file = "{dir}/identity.key"
[[triggers.webhooks]]
name = "crm"
url = "https://crm.example/hooks"
secret = "{webhook_secret}"
"#,
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let mut output = String::new();
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["check-config", config.to_str().unwrap()])
        .current_dir(repo_path(""))
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    output += &String::from_utf8_lossy(&checked.stdout);
    output += &String::from_utf8_lossy(&checked.stderr);
    assert!(
        output.contains("keys.toml") && output.contains("<redacted>"),
        "{output}"
    );

    let data = tempfile::tempdir().unwrap();
    let nudge = spawn_nudge_with(data.path(), &config, &[("RUST_LOG", "debug".to_owned())]).await;
    let channel = tls_channel(nudge.grpc_addr, &ca, None).await.unwrap();
    let mut client = NudgeServiceClient::new(channel);
    client
        .track(with_key(
            pb::TrackRequest {
                events: vec![event("e1", "user-1", EventType::PageView, T0)],
            },
            &api_key,
        ))
        .await
        .expect("a served call");
    let wrong = format!("{api_key}x");
    let refused = client
        .track(with_key(pb::TrackRequest::default(), &wrong))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(!refused.message().contains(&wrong));
    nudge.signal("TERM");
    let (status, log) = nudge.exit().await;
    assert!(status.success(), "{log}");
    output += &log;

    for (what, secret) in [
        ("the API key", api_key.as_str()),
        ("the wrong key", wrong.as_str()),
        ("the webhook secret", webhook_secret),
        (
            "the webhook secret's key",
            &webhook_secret["whsec_".len()..],
        ),
        ("the pseudonymization key", pseudonym_key),
    ]
    .into_iter()
    .chain(tls_key_body.iter().map(|l| ("the TLS private key", *l)))
    {
        assert!(
            !output.contains(secret),
            "{what} is in the output:\n{output}"
        );
    }
    assert!(output.contains("serving"), "the log was read: {output}");
}
