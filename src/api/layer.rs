//! One tower layer around every gRPC call: counts requests by RPC and status code, times
//! them, answers an oversize request with RESOURCE_EXHAUSTED as the gRPC spec asks
//! (tonic itself answers OUT_OF_RANGE), and turns a panic in a handler into INTERNAL for
//! that call alone (counted in `nudge_panics_total{where="rpc"}`) instead of a dropped
//! connection.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::FutureExt as _;
use tonic::codegen::http::{self, HeaderValue};
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
    if let Some(method) = path.strip_prefix("/nudge.v1.NudgeService/") {
        return RPCS
            .iter()
            .find(|r| **r == method)
            .copied()
            .unwrap_or("unknown");
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
    ResBody: Default,
{
    type Response = S::Response;
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
        let rpc = rpc_label(request.uri().path());
        let started = Instant::now();
        Box::pin(async move {
            let answered = AssertUnwindSafe(inner.call(request)).catch_unwind().await;
            let mut response = match answered {
                Ok(response) => response?,
                Err(_) => {
                    // The panic hook has logged the message and where.
                    tracing::error!(rpc, "a handler panicked; answering INTERNAL");
                    layer.metrics.panics.with_label_values(&["rpc"]).inc();
                    panicked()
                }
            };
            // Errors of unary calls come back as trailers-only responses, with the status in
            // the headers; a response without one is OK so far.
            let headers = response.headers_mut();
            let mut code = headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(Code::Ok, Code::from_i32);
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
                    .with_label_values(&[rpc, reason.as_str()])
                    .inc();
                headers.insert("grpc-status", HeaderValue::from(code as i32));
                headers.insert(
                    "grpc-message",
                    HeaderValue::from_str(&percent_encode(&message))
                        .expect("percent-encoded text is a valid header value"),
                );
            }
            layer
                .metrics
                .grpc_requests
                .with_label_values(&[rpc, code_label(code)])
                .inc();
            layer
                .metrics
                .grpc_duration
                .with_label_values(&[rpc])
                .observe(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// The answer to a call whose handler panicked: INTERNAL, trailers-only.
fn panicked<B: Default>() -> http::Response<B> {
    let mut response = http::Response::new(B::default());
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(Code::Internal as i32));
    headers.insert(
        "grpc-message",
        HeaderValue::from_static("the request failed inside the server (a defect, logged)"),
    );
    response
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
    fn every_rpc_of_the_service_descriptor_has_its_own_label() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("the compiled descriptor set decodes");
        let service = set
            .file
            .iter()
            .filter(|f| f.package() == "nudge.v1")
            .flat_map(|f| &f.service)
            .find(|s| s.name() == "NudgeService")
            .expect("nudge.v1.NudgeService is in the descriptor");
        let mut methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        methods.sort_unstable();
        let mut labelled = RPCS.to_vec();
        labelled.sort_unstable();
        assert_eq!(
            labelled, methods,
            "RPCS must list exactly the service's methods"
        );
        for method in methods {
            assert_eq!(
                rpc_label(&format!("/nudge.v1.NudgeService/{method}")),
                method
            );
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_internal_and_is_counted() {
        use tower::{Layer as _, Service as _, ServiceExt as _};
        let metrics = Arc::new(Metrics::new());
        let handler = tower::service_fn(|request: http::Request<()>| async move {
            if request.uri().path().ends_with("/Score") {
                panic!("a handler panics (test)");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
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
