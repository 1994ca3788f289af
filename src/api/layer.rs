//! One tower layer around every gRPC call: counts calls by RPC and status code and times
//! them to their status (a stream's trailers, so a stream is counted with how it ended);
//! answers an oversize request with RESOURCE_EXHAUSTED as the gRPC spec asks (tonic itself
//! answers OUT_OF_RANGE); answers a call still running at its `grpc-timeout` with
//! DEADLINE_EXCEEDED (tonic's own timer answers CANCELLED), and counts a call its caller
//! gave up on; and turns a panic in a handler, or in a response stream it returned, into
//! INTERNAL for that call alone (counted in `nudge_panics_total{where="rpc"}`) instead of
//! a dropped connection.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use http_body::{Body, Frame};
use tonic::codegen::http::{self, HeaderValue};
use tonic::codegen::Bytes;
use tonic::Code;

use crate::event::Reason;
use crate::metrics::Metrics;

/// The RPCs of `nudge.v1.NudgeService`, the metric label for each. A test holds this list
/// to the service descriptor, so a new RPC cannot be counted as `unknown`.
const RPCS: &[&str] = &[
    "Track",
    "TrackStream",
    "Identify",
    "DeleteUser",
    "Score",
    "GetProfile",
    "ListModels",
    "ReloadModels",
    "SubscribeTriggers",
    "ExplainTriggers",
    "GetExperimentReport",
    "ReloadRules",
    "ListDeadLetters",
];

/// The RPCs of `inference.GRPCInferenceService` (the Open Inference Protocol), the metric
/// label for each; held to its descriptor likewise. No name is one of [`RPCS`].
const INFERENCE_RPCS: &[&str] = &[
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
];

#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
    max_message_bytes: usize,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>, max_message_bytes: usize) -> MetricsLayer {
        MetricsLayer {
            metrics,
            max_message_bytes,
        }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    layer: MetricsLayer,
}

/// The bounded metric label for a request path.
fn rpc_label(path: &str) -> &'static str {
    let known = |rpcs: &[&'static str], method: &str| {
        rpcs.iter()
            .find(|r| **r == method)
            .copied()
            .unwrap_or("unknown")
    };
    if let Some(method) = path.strip_prefix("/nudge.v1.NudgeService/") {
        return known(RPCS, method);
    }
    if let Some(method) = path.strip_prefix("/inference.GRPCInferenceService/") {
        return known(INFERENCE_RPCS, method);
    }
    if path.starts_with("/grpc.health.v1.Health/") {
        return "health";
    }
    if path.starts_with("/grpc.reflection.") {
        return "reflection";
    }
    "unknown"
}

/// The canonical name of a gRPC status code, as the `code` label.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for MetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Default + Unpin + Send + 'static,
{
    type Response = http::Response<Observed<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The service that was polled ready handles this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let deadline = deadline(request.headers());
        let mut tally = Tally {
            metrics: layer.metrics.clone(),
            rpc: rpc_label(request.uri().path()),
            started: Instant::now(),
            deadline,
            done: false,
        };
        // tonic's server wraps this layer in its own grpc-timeout timer, which drops the
        // call at the deadline and answers CANCELLED ("Timeout expired"), where the gRPC
        // spec asks for DEADLINE_EXCEEDED. This timer is made first, so it is due no later
        // than tonic's, and tonic polls the call before its own timer: the caller gets
        // DEADLINE_EXCEEDED from here, counted.
        let expiry = deadline.map(|d| tokio::time::sleep_until(d.into()));
        Box::pin(async move {
            let call = AssertUnwindSafe(inner.call(request)).catch_unwind();
            let answered = match expiry {
                Some(expiry) => tokio::select! {
                    biased;
                    answered = call => answered,
                    () = expiry => {
                        tally.record(Code::DeadlineExceeded);
                        return Ok(trailers_only(
                            Code::DeadlineExceeded,
                            "the request's deadline (grpc-timeout) passed before it was answered",
                            tally,
                        ));
                    }
                },
                None => call.await,
            };
            let mut response = match answered {
                Ok(response) => response?,
                Err(_) => {
                    // The panic hook has logged the message and where.
                    tracing::error!(rpc = tally.rpc, "a handler panicked; answering INTERNAL");
                    layer.metrics.panics.with_label_values(&["rpc"]).inc();
                    tally.record(Code::Internal);
                    return Ok(trailers_only(Code::Internal, PANICKED, tally));
                }
            };
            // Errors of unary calls come back as trailers-only responses, with the status in
            // the headers: the call ends here. Otherwise the status comes in the trailers,
            // after the body (a stream's messages), and the body records it.
            let headers = response.headers_mut();
            let Some(mut code) = status_code(headers) else {
                return Ok(response.map(|body| Observed::new(body, tally)));
            };
            let message = headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let refusal = refusal(code, &percent_decode(message), layer.max_message_bytes);
            if let Some((new_code, reason, message)) = refusal {
                code = new_code;
                layer
                    .metrics
                    .invalid_input
                    .with_label_values(&[tally.rpc, reason.as_str()])
                    .inc();
                headers.insert("grpc-status", HeaderValue::from(code as i32));
                headers.insert("grpc-message", message_header(&message));
            }
            tally.record(code);
            Ok(response.map(|body| Observed::new(body, tally)))
        })
    }
}

const PANICKED: &str = "the request failed inside the server (a defect, logged)";

/// When the caller stops waiting: now plus the request's `grpc-timeout` (digits and a
/// unit: H, M, S, m, u or n), if it sent one that parses.
pub(super) fn deadline(headers: &http::HeaderMap) -> Option<Instant> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

/// The `grpc-status` of a header or trailer map, if it has one.
fn status_code(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

fn message_header(message: &str) -> HeaderValue {
    HeaderValue::from_str(&percent_encode(message))
        .expect("percent-encoded text is a valid header value")
}

/// A trailers-only answer (status in the headers, no body) made here, not by the handler.
fn trailers_only<B: Body + Default + Unpin>(
    code: Code,
    message: &str,
    tally: Tally,
) -> http::Response<Observed<B>> {
    let mut response = http::Response::new(Observed::new(B::default(), tally));
    let headers = response.headers_mut();
    *headers = status(code, message);
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    response
}

/// A status as gRPC sends it: `grpc-status` and `grpc-message`, in the headers of a
/// trailers-only answer or in a stream's trailers.
fn status(code: Code, message: &str) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    map.insert("grpc-status", HeaderValue::from(code as i32));
    map.insert("grpc-message", message_header(message));
    map
}

/// One call's count and duration, recorded once: when its status is known, or, for a call
/// dropped unanswered (the caller reset the stream or went away), when it is dropped.
struct Tally {
    metrics: Arc<Metrics>,
    rpc: &'static str,
    started: Instant,
    deadline: Option<Instant>,
    done: bool,
}

impl Tally {
    fn record(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let labels = [self.rpc, code_label(code)];
        self.metrics.grpc_requests.with_label_values(&labels).inc();
        self.metrics
            .grpc_duration
            .with_label_values(&labels)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        // What the caller saw: its own deadline, or its own cancellation.
        let code = match self.deadline {
            Some(deadline) if Instant::now() >= deadline => Code::DeadlineExceeded,
            _ => Code::Cancelled,
        };
        self.record(code);
    }
}

/// A response body that records its call when the status arrives in the trailers, and
/// turns a panic while producing it (a stream's next message) into INTERNAL trailers for
/// that call alone.
pub struct Observed<B> {
    /// None once a panic ended the body: the inner body is not polled again.
    inner: Option<B>,
    tally: Tally,
}

impl<B> Observed<B> {
    fn new(inner: B, tally: Tally) -> Observed<B> {
        Observed {
            inner: Some(inner),
            tally,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Observed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll_frame(cx)));
        match polled {
            Ok(Poll::Ready(Some(Ok(frame)))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.tally
                        .record(status_code(trailers).unwrap_or(Code::Unknown));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Ok(Poll::Ready(Some(Err(e)))) => {
                // The connection's stream is reset; the caller sees no status of ours.
                this.tally.record(Code::Unknown);
                Poll::Ready(Some(Err(e)))
            }
            Ok(Poll::Ready(None)) => {
                // A gRPC body ends with its trailers; one without is not a status.
                this.tally.record(Code::Unknown);
                Poll::Ready(None)
            }
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => {
                tracing::error!(
                    rpc = this.tally.rpc,
                    "a response stream panicked; ending it with INTERNAL"
                );
                this.tally.metrics.panics.with_label_values(&["rpc"]).inc();
                this.tally.record(Code::Internal);
                this.inner = None;
                Poll::Ready(Some(Ok(Frame::trailers(status(Code::Internal, PANICKED)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Until its status is recorded the body is polled to its end, even where the inner
        // body knows it is empty; after that, the inner body's own hint.
        self.tally.done && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), Body::size_hint)
    }
}

/// What tonic's own refusal of a request message is, from the caller's side: tonic answers
/// an oversize message OUT_OF_RANGE and an undecodable one (bad protobuf, invalid UTF-8 in
/// a string) INTERNAL; both are the caller's input, RESOURCE_EXHAUSTED (as the gRPC spec
/// asks) and INVALID_ARGUMENT. The one definition for unary calls (here, from the
/// response headers) and stream messages (`track.rs`, from the stream's items).
pub(super) fn refusal(
    code: Code,
    message: &str,
    max_message_bytes: usize,
) -> Option<(Code, Reason, String)> {
    match code {
        Code::OutOfRange if message.contains("message length too large") => Some((
            Code::ResourceExhausted,
            Reason::MessageTooLarge,
            format!(
                "the request message is larger than server.max_message_bytes ({max_message_bytes} bytes)"
            ),
        )),
        Code::Internal if message.starts_with("failed to decode") => Some((
            Code::InvalidArgument,
            Reason::Undecodable,
            format!(
                "the request is not a valid protobuf message: {}",
                proto_field_names(message)
            ),
        )),
        _ => None,
    }
}

/// Percent-encodes a grpc-message value as the gRPC spec asks: everything outside printable
/// ASCII, and '%' itself.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// prost's decode errors name fields by their Rust identifiers (`Event.r#type: ...`, for
/// a proto field that is a Rust keyword); the caller knows the proto name, `Event.type`.
pub(super) fn proto_field_names(text: &str) -> String {
    text.replace(".r#", ".")
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_a_closed_set() {
        assert_eq!(rpc_label("/nudge.v1.NudgeService/Track"), "Track");
        assert_eq!(rpc_label("/nudge.v1.NudgeService/Nope"), "unknown");
        assert_eq!(rpc_label("/grpc.health.v1.Health/Check"), "health");
        assert_eq!(rpc_label("/some/user-controlled/path"), "unknown");
    }

    #[test]
    fn every_rpc_of_the_service_descriptors_has_its_own_label() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("the compiled descriptor set decodes");
        for (package, name, rpcs) in [
            ("nudge.v1", "NudgeService", RPCS),
            ("inference", "GRPCInferenceService", INFERENCE_RPCS),
        ] {
            let service = set
                .file
                .iter()
                .filter(|f| f.package() == package)
                .flat_map(|f| &f.service)
                .find(|s| s.name() == name)
                .expect("the service is in the descriptor");
            let mut methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
            methods.sort_unstable();
            let mut labelled = rpcs.to_vec();
            labelled.sort_unstable();
            assert_eq!(
                labelled, methods,
                "the label list must name exactly {name}'s methods"
            );
            for method in methods {
                assert_eq!(rpc_label(&format!("/{package}.{name}/{method}")), method);
            }
        }
        assert!(INFERENCE_RPCS.iter().all(|r| !RPCS.contains(r)));
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_internal_and_is_counted() {
        use tower::{Layer as _, Service as _, ServiceExt as _};
        let metrics = Arc::new(Metrics::new());
        let handler = tower::service_fn(|request: http::Request<()>| async move {
            if request.uri().path().ends_with("/Score") {
                panic!("a handler panics (test)");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let mut service = MetricsLayer::new(metrics.clone(), 1024).layer(handler);
        let call = |path: &'static str| http::Request::builder().uri(path).body(()).unwrap();
        let response = service
            .ready()
            .await
            .unwrap()
            .call(call("/nudge.v1.NudgeService/Score"))
            .await
            .unwrap();
        assert_eq!(response.headers()["grpc-status"], "13");
        assert_eq!(metrics.panics.with_label_values(&["rpc"]).get(), 1);
        let counted = metrics
            .grpc_requests
            .with_label_values(&["Score", "INTERNAL"])
            .get();
        assert_eq!(counted, 1);
        // The service goes on serving.
        let response = service
            .ready()
            .await
            .unwrap()
            .call(call("/nudge.v1.NudgeService/Track"))
            .await
            .unwrap();
        assert!(response.headers().get("grpc-status").is_none());
    }

    /// A stand-in for the service behind the layer, over a real tonic server and socket:
    /// `Score` never answers; `TrackStream` sends one message, then its stream panics.
    #[derive(Clone)]
    struct Scripted;

    impl tonic::server::NamedService for Scripted {
        const NAME: &'static str = "nudge.v1.NudgeService";
    }

    impl tower::Service<http::Request<tonic::body::Body>> for Scripted {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
            let path = request.uri().path().to_owned();
            Box::pin(async move {
                if path.ends_with("/Score") {
                    return std::future::pending().await;
                }
                let mut response =
                    http::Response::new(tonic::body::Body::new(PanicsSecond { sent: false }));
                response
                    .headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok(response)
            })
        }
    }

    /// A response body whose first frame is one (empty) message and whose second poll panics.
    struct PanicsSecond {
        sent: bool,
    }

    impl Body for PanicsSecond {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            assert!(!self.sent, "the stream's next message panics (test)");
            self.sent = true;
            // A gRPC message: uncompressed, zero bytes long (an empty TrackStreamResponse).
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])))))
        }
    }

    async fn scripted_server(
        metrics: Arc<Metrics>,
    ) -> (
        std::net::SocketAddr,
        crate::pb::nudge_service_client::NudgeServiceClient<tonic::transport::Channel>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(MetricsLayer::new(metrics, 1024))
                .add_service(Scripted)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let client =
            crate::pb::nudge_service_client::NudgeServiceClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
        (addr, client)
    }

    /// The metric's value once it reaches `want`, or its value after 10 s.
    async fn counted(metrics: &Metrics, rpc: &str, code: &str, want: u64) -> u64 {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let got = metrics.grpc_requests.with_label_values(&[rpc, code]).get();
            if got >= want || Instant::now() > give_up {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_is_answered_deadline_exceeded_and_counted() {
        let metrics = Arc::new(Metrics::new());
        let (addr, _) = scripted_server(metrics.clone()).await;
        for _ in 0..20 {
            // A raw HTTP/2 client: tonic's would answer the caller itself at the deadline.
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(connection);
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}/nudge.v1.NudgeService/Score"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("grpc-timeout", "20m")
                .body(())
                .unwrap();
            let (response, mut send) = client.send_request(request, false).unwrap();
            // One empty ScoreRequest.
            send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
                .unwrap();
            let response = response.await.unwrap();
            // Without this layer's own timer, tonic's answers CANCELLED (1).
            let status = &response.headers()["grpc-status"];
            assert_eq!(status, &(Code::DeadlineExceeded as i32).to_string());
        }
        let labels = ["Score", "DEADLINE_EXCEEDED"];
        assert_eq!(metrics.grpc_requests.with_label_values(&labels).get(), 20);
        let timed = metrics.grpc_duration.with_label_values(&labels);
        assert_eq!(timed.get_sample_count(), 20);
        assert!(timed.get_sample_sum() >= 20.0 * 0.020);
    }

    #[tokio::test]
    async fn a_call_the_caller_gives_up_on_is_counted_cancelled() {
        let metrics = Arc::new(Metrics::new());
        let (_, mut client) = scripted_server(metrics.clone()).await;
        let call = client.score(crate::pb::ScoreRequest::default());
        // The caller's own timer, no grpc-timeout: the call is reset, never answered.
        let given_up = tokio::time::timeout(Duration::from_millis(50), call).await;
        assert!(given_up.is_err(), "the scripted Score never answers");
        assert_eq!(counted(&metrics, "Score", "CANCELLED", 1).await, 1);
    }

    #[tokio::test]
    async fn a_panic_in_a_response_stream_ends_that_call_with_internal() {
        let metrics = Arc::new(Metrics::new());
        let (_, mut client) = scripted_server(metrics.clone()).await;
        for round in 1..=3 {
            let mut stream = client
                .track_stream(tokio_stream::iter(
                    Vec::<crate::pb::TrackStreamRequest>::new(),
                ))
                .await
                .unwrap()
                .into_inner();
            assert!(
                stream.message().await.unwrap().is_some(),
                "the first message"
            );
            let status = stream.message().await.unwrap_err();
            assert_eq!(status.code(), Code::Internal, "{status:?}");
            assert_eq!(status.message(), PANICKED);
            // Counted before the trailers were sent.
            assert_eq!(metrics.panics.with_label_values(&["rpc"]).get(), round);
            let labels = ["TrackStream", "INTERNAL"];
            assert_eq!(
                metrics.grpc_requests.with_label_values(&labels).get(),
                round
            );
        }
    }

    #[tokio::test]
    async fn a_stream_is_counted_with_the_status_of_its_trailers() {
        use tower::{Layer as _, Service as _, ServiceExt as _};
        let metrics = Arc::new(Metrics::new());
        let handler = tower::service_fn(|_: http::Request<()>| async move {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from(Code::Unavailable as i32));
            let body = tonic::body::Body::new(trailers_body(trailers));
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        });
        let mut service = MetricsLayer::new(metrics.clone(), 1024).layer(handler);
        let request = http::Request::builder()
            .uri("/nudge.v1.NudgeService/SubscribeTriggers")
            .body(())
            .unwrap();
        let response = service.ready().await.unwrap().call(request).await.unwrap();
        let labels = ["SubscribeTriggers", "UNAVAILABLE"];
        // Not yet: the status is in the trailers, still to come.
        assert_eq!(metrics.grpc_requests.with_label_values(&labels).get(), 0);
        let mut body = response.into_body();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            frame.unwrap();
        }
        assert_eq!(metrics.grpc_requests.with_label_values(&labels).get(), 1);
        drop(body);
        assert_eq!(
            metrics
                .grpc_requests
                .with_label_values(&["SubscribeTriggers", "CANCELLED"])
                .get(),
            0,
            "recorded once"
        );
    }

    /// A body of trailers alone.
    fn trailers_body(trailers: http::HeaderMap) -> impl Body<Data = Bytes, Error = tonic::Status> {
        struct Trailers(Option<http::HeaderMap>);
        impl Body for Trailers {
            type Data = Bytes;
            type Error = tonic::Status;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
                Poll::Ready(self.0.take().map(|t| Ok(Frame::trailers(t))))
            }
        }
        Trailers(Some(trailers))
    }

    #[test]
    fn grpc_messages_round_trip_through_percent_encoding() {
        for text in ["plain words", "100% sure", "naïve – ünïcode", "a\nb"] {
            let encoded = percent_encode(text);
            assert!(encoded.bytes().all(|b| (0x20..0x7f).contains(&b)));
            assert_eq!(percent_decode(&encoded), text);
        }
        assert_eq!(percent_encode("50% off"), "50%25 off");
    }
}
