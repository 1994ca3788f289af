//! Shedding before decoding: under overload, a unary `Track` is refused from its headers,
//! before its body is read and decoded.
//!
//! Admission by time ([`crate::engine`]) refuses most calls of an overload, and at three
//! times the sustained rate that is most calls: a refusal must cost next to nothing, or
//! refusing takes the CPU the accepted calls need. The handler's own check
//! ([`Engine::refuse_if_saturated`], before validating) comes after tonic has decoded the
//! whole request — for a 100-event Track, a hundred messages of strings — so this layer
//! asks the same question first, for the one method whose bodies are large and many. What
//! it refuses is answered as the handler would (RESOURCE_EXHAUSTED with a retry hint,
//! counted as shed) and never reaches the handler; what it lets through is checked again
//! there against the shard its events go to.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::Status;

use super::error::ApiError;
use crate::engine::Engine;

/// The methods shed here: unary, and large.
const SHED_BEFORE_DECODING: &[&str] = &["/nudge.v1.NudgeService/Track"];

#[derive(Clone)]
pub struct ShedLayer {
    engine: Arc<Engine>,
}

impl ShedLayer {
    pub fn new(engine: Arc<Engine>) -> ShedLayer {
        ShedLayer { engine }
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = ShedService<S>;

    fn layer(&self, inner: S) -> ShedService<S> {
        ShedService {
            inner,
            engine: self.engine.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ShedService<S> {
    inner: S,
    engine: Arc<Engine>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for ShedService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The service that was polled ready handles this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if SHED_BEFORE_DECODING.contains(&request.uri().path()) {
            if let Err(overloaded) = self.engine.refuse_if_saturated() {
                // The body is dropped unread: hyper resets the stream once the answer is
                // out, which gRPC clients take as the end of a call already answered.
                let response = Status::from(ApiError::from(overloaded)).into_http::<ResBody>();
                return Box::pin(async move { Ok(response) });
            }
        }
        Box::pin(inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::{Layer as _, Service as _, ServiceExt as _};

    use super::*;
    use crate::engine::tests::{metrics_of, queue_on_every_shard, start};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_track_is_refused_from_its_headers_only_while_every_shard_is_saturated() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _store) = start(dir.path(), 2);
        let reached = Arc::new(AtomicUsize::new(0));
        let handler = tower::service_fn({
            let reached = reached.clone();
            move |_: http::Request<()>| {
                reached.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, std::convert::Infallible>(http::Response::new(String::new())) }
            }
        });
        let mut service = ShedLayer::new(engine.clone()).layer(handler);
        let mut call = async |path: &'static str| {
            let request = http::Request::post(path).body(()).unwrap();
            let response = service.ready().await.unwrap().call(request).await.unwrap();
            response
                .headers()
                .get("grpc-status")
                .map(|s| s.to_str().unwrap().to_owned())
        };
        let track = "/nudge.v1.NudgeService/Track";
        assert_eq!(call(track).await, None, "idle: the handler answers");
        assert_eq!(reached.load(Ordering::Relaxed), 1);

        queue_on_every_shard(&engine, 3);
        // RESOURCE_EXHAUSTED, and the handler (which would decode the body) never ran.
        assert_eq!(call(track).await.as_deref(), Some("8"));
        assert_eq!(reached.load(Ordering::Relaxed), 1);
        let shed = metrics_of(&engine)
            .shed
            .with_label_values(&["overloaded"])
            .get();
        assert_eq!(shed, 1, "counted as the handler's refusal is");
        // Other methods go on to their handlers, which decide for themselves.
        for other in [
            "/nudge.v1.NudgeService/TrackStream",
            "/nudge.v1.NudgeService/Score",
        ] {
            assert_eq!(call(other).await, None, "{other}");
        }
        assert_eq!(reached.load(Ordering::Relaxed), 3);

        queue_on_every_shard(&engine, 0);
        assert_eq!(
            call(track).await,
            None,
            "drained: the handler answers again"
        );
        assert_eq!(reached.load(Ordering::Relaxed), 4);
        engine.shutdown().await;
    }
}
