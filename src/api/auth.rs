//! The credentials check of every gRPC call: the API key in `authorization: Bearer <key>`
//! metadata, the scope the method needs ([`SCOPES`], one table), and the key's rate limit.
//!
//! It is a tower layer inside the RPC metrics layer, so a refused call is counted with its
//! status like any other, and answered trailers-only before the handler or the decoding of
//! its message: an unauthenticated caller costs a header lookup and a hash. The caller a
//! key names goes into the request's extensions, where TrackStream reads it to charge each
//! message of its stream to the key's rate limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tonic::Status;

use super::error::ApiError;
use crate::metrics::Metrics;
use crate::security::keys::{Caller, Keys, Refusal, Scope};

/// Nudge's own gRPC service, whose methods [`SCOPES`] covers.
pub const SERVICE: &str = "nudge.v1.NudgeService";

/// The Open Inference Protocol's service, whose methods [`INFERENCE_SCOPES`] covers.
pub const INFERENCE_SERVICE: &str = "inference.GRPCInferenceService";

/// The scope each method of [`SERVICE`] needs. A method missing here is refused to every
/// key (fail closed), and a test checks this table against the service descriptor.
pub const SCOPES: &[(&str, Scope)] = &[
    ("Track", Scope::Track),
    ("TrackStream", Scope::Track),
    ("Identify", Scope::Track),
    ("Score", Scope::Score),
    ("GetProfile", Scope::Read),
    ("ListModels", Scope::Read),
    ("ExplainTriggers", Scope::Read),
    ("GetExperimentReport", Scope::Read),
    ("SubscribeTriggers", Scope::Read),
    ("DeleteUser", Scope::Admin),
    ("ReloadModels", Scope::Admin),
    ("ReloadRules", Scope::Admin),
    ("ListDeadLetters", Scope::Admin),
];

/// The scope each method of [`INFERENCE_SERVICE`] needs, but for [`INFERENCE_PROBES`]:
/// what a model client does is scoring. Fail closed and held to the descriptor likewise.
pub const INFERENCE_SCOPES: &[(&str, Scope)] = &[
    ("ServerMetadata", Scope::Score),
    ("ModelReady", Scope::Score),
    ("ModelMetadata", Scope::Score),
    ("ModelInfer", Scope::Score),
];

/// The Open Inference Protocol's liveness and readiness probes: open or closed with health
/// checks (`auth.open_health`), as the probes of KServe and Triton deployments expect.
pub const INFERENCE_PROBES: &[&str] = &["ServerLive", "ServerReady"];

/// What a call at a gRPC path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: health and reflection, when `auth` leaves them open.
    Open,
    /// Any known key: health and reflection when closed, and services Nudge does not
    /// define (which then answer UNIMPLEMENTED to a known caller only).
    AnyKey,
    Needs(Scope),
    /// A method of Nudge's service with no scope decision: refused to everyone.
    Undecided,
}

/// The credentials settings and the keys in force.
pub struct Auth {
    pub keys: Arc<Keys>,
    pub open_health: bool,
    pub open_reflection: bool,
    metrics: Arc<Metrics>,
}

impl Auth {
    pub fn new(
        keys: Arc<Keys>,
        open_health: bool,
        open_reflection: bool,
        metrics: Arc<Metrics>,
    ) -> Auth {
        Auth {
            keys,
            open_health,
            open_reflection,
            metrics,
        }
    }

    pub fn access(&self, path: &str) -> Access {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", ""));
        match service {
            SERVICE => SCOPES
                .iter()
                .find(|(m, _)| *m == method)
                .map_or(Access::Undecided, |&(_, scope)| Access::Needs(scope)),
            INFERENCE_SERVICE if INFERENCE_PROBES.contains(&method) => {
                if self.open_health {
                    Access::Open
                } else {
                    Access::AnyKey
                }
            }
            INFERENCE_SERVICE => INFERENCE_SCOPES
                .iter()
                .find(|(m, _)| *m == method)
                .map_or(Access::Undecided, |&(_, scope)| Access::Needs(scope)),
            "grpc.health.v1.Health" if self.open_health => Access::Open,
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection"
                if self.open_reflection =>
            {
                Access::Open
            }
            _ => Access::AnyKey,
        }
    }

    /// Checks one call: the caller it may go ahead as (none for an open path), or the
    /// status it is refused with, counted by key name and reason.
    pub fn check(
        &self,
        path: &str,
        authorization: Option<&[u8]>,
    ) -> Result<Option<Arc<Caller>>, ApiError> {
        let access = self.access(path);
        if access == Access::Open {
            return Ok(None);
        }
        let method = path.rsplit('/').next().unwrap_or_default();
        let caller = match self.keys.current().check(authorization) {
            Ok(caller) => caller,
            Err(refusal) => {
                self.refused("", refusal.as_str());
                return Err(ApiError::Unauthenticated(
                    match refusal {
                        Refusal::Missing => {
                            "this call needs an API key: send `authorization: Bearer <key>` metadata"
                        }
                        Refusal::Malformed => "expected `Bearer <key>`",
                        Refusal::Unknown => "the API key is not known (revoked or mistyped)",
                    }
                    .to_owned(),
                ));
            }
        };
        match access {
            Access::Needs(scope) if !caller.may(scope) => {
                self.refused(&caller.name, "scope");
                return Err(ApiError::PermissionDenied(format!(
                    "the key {:?} lacks the {:?} scope that {method} needs",
                    caller.name,
                    scope.as_str()
                )));
            }
            Access::Undecided => {
                self.refused(&caller.name, "scope");
                return Err(ApiError::PermissionDenied(format!(
                    "no scope is defined for {method}; it is refused to every key"
                )));
            }
            _ => {}
        }
        admit(&self.metrics, &caller)?;
        self.metrics
            .auth_accepted
            .with_label_values(&[caller.name.as_str()])
            .inc();
        Ok(Some(caller))
    }

    fn refused(&self, key: &str, reason: &str) {
        self.metrics
            .auth_refused
            .with_label_values(&[key, reason])
            .inc();
    }
}

/// Takes one request from `caller`'s rate limit, or refuses it RESOURCE_EXHAUSTED with
/// when to retry.
pub fn admit(metrics: &Metrics, caller: &Caller) -> Result<(), ApiError> {
    let Err(wait) = caller.admit() else {
        return Ok(());
    };
    metrics
        .auth_refused
        .with_label_values(&[caller.name.as_str(), "rate_limited"])
        .inc();
    Err(ApiError::RateLimited {
        key: caller.name.clone(),
        retry_after: wait.max(Duration::from_millis(1)),
    })
}

/// The tower layer of [`Auth`]; `None` lets every call through (`auth.anonymous`).
#[derive(Clone)]
pub struct AuthLayer {
    auth: Option<Arc<Auth>>,
}

impl AuthLayer {
    pub fn new(auth: Option<Arc<Auth>>) -> AuthLayer {
        AuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Option<Arc<Auth>>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
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

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The service that was polled ready handles this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if let Some(auth) = &self.auth {
            let authorization = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            match auth.check(request.uri().path(), authorization) {
                Ok(Some(caller)) => {
                    request.extensions_mut().insert(caller);
                }
                Ok(None) => {}
                Err(refused) => {
                    let response = Status::from(refused).into_http::<ResBody>();
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        Box::pin(inner.call(request))
    }
}
