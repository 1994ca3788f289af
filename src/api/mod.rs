//! The gRPC edge: the `NudgeService` implementation. Every handler is the same three
//! steps: validate (proto → domain in [`convert`], refusals counted), call the engine or a
//! part, convert the answer back (every response is built in [`convert`]). Every failure
//! goes through the one table in [`error`]; per-RPC metrics come from one tower layer
//! ([`layer`]). No protocol type goes past this module.

pub mod auth;
pub mod convert;
pub mod error;
pub mod inference;
pub mod kafka;
pub mod layer;
pub mod segment;
pub mod shed;
mod track;

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::delivery::outbox::Outbox;
use crate::delivery::stream;
use crate::engine::{Admit, Engine};
use crate::event::{check_len, check_names, quoted, FieldError, PersonKey, Reason, MAX_NAME_BYTES};
use crate::features::FeatureSpec;
use crate::identity::Pseudonymizer;
use crate::metrics::Metrics;
use crate::model::reload::Reloader;
use crate::model::{score_rows, Model, ModelRegistry};
use crate::pb;
use crate::time::Clock;
pub use error::ApiError;

/// Request limits the API enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_batch_events: usize,
    pub max_score_rows: usize,
    /// The largest request message tonic decodes (`server.max_message_bytes`).
    pub max_message_bytes: usize,
    /// Events older than this are refused.
    pub retention_ms: i64,
}

/// Score requests of at most this many feature rows are scored on the async worker that
/// decoded them; larger ones go to the blocking pool.
///
/// Handing rows to the blocking pool costs a `spawn_blocking` round trip: measured on the
/// 2-core AMD EPYC this was written on (`cargo bench --bench grpc` prints the figures),
/// 20–34 µs of latency from an idle worker and 23–48 µs of CPU. Scoring inline saves that,
/// but holds the worker, and every request queued behind it, for the scoring time: with
/// the shipped models on the native scorer, a row costs about 8–12 µs for both models
/// (through LightGBM's C API it was 20 µs, when this bound was 2). The bound is where the
/// two are about equal; re-measure and move it when the engine changes.
pub const INLINE_SCORE_ROWS: usize = 4;

/// Dead letters answered when the request does not say how many.
const DEFAULT_DEAD_LETTERS: usize = 100;

/// The `nudge.v1.NudgeService` implementation.
#[derive(Clone)]
pub struct NudgeApi {
    pub engine: Arc<Engine>,
    pub models: Arc<ModelRegistry>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub pseudonymizer: Pseudonymizer,
    pub reloader: Arc<Reloader>,
    pub outbox: Arc<Outbox>,
    /// The configured webhook endpoints' names (whose dead letters can be listed).
    pub endpoints: Arc<[String]>,
    /// Turns true when the server shuts down: long streams end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// Creates the zero series of `nudge_invalid_input_total` for the RPCs that take events
/// and rows, so dashboards and alerts see them before the first refusal.
pub fn preset_metrics(metrics: &Metrics) {
    for reason in Reason::ALL {
        for rpc in ["Track", "TrackStream", "Score", "ModelInfer"] {
            metrics
                .invalid_input
                .with_label_values(&[rpc, reason.as_str()]);
        }
    }
}

impl NudgeApi {
    /// The person a request names, pseudonymized.
    fn person(&self, rpc: &str, pb: Option<pb::PersonRef>) -> Result<PersonKey, ApiError> {
        convert::person(pb, "person", &self.pseudonymizer).map_err(|e| self.refuse(rpc, e))
    }

    fn count_refusal(&self, rpc: &str, e: &FieldError) {
        self.metrics
            .invalid_input
            .with_label_values(&[rpc, e.reason.as_str()])
            .inc();
    }

    /// Counts a refused input and turns it into the error to answer with.
    fn refuse(&self, rpc: &str, e: FieldError) -> ApiError {
        self.count_refusal(rpc, &e);
        ApiError::Invalid(e)
    }

    fn check_count(
        &self,
        rpc: &str,
        field: &str,
        count: usize,
        max: usize,
    ) -> Result<(), ApiError> {
        if count == 0 {
            return Err(self.refuse(
                rpc,
                FieldError::new(field, Reason::Missing, "at least one is required"),
            ));
        }
        if count > max {
            return Err(self.refuse(
                rpc,
                FieldError::new(
                    field,
                    Reason::TooMany,
                    format!("has {count} entries; at most {max} are allowed per request"),
                ),
            ));
        }
        Ok(())
    }

    /// The models a request names (all when none), or INVALID_ARGUMENT for an unknown name.
    fn select_models(&self, rpc: &str, names: &[String]) -> Result<Vec<Arc<Model>>, ApiError> {
        check_names("models", names).map_err(|e| self.refuse(rpc, e))?;
        let set = self.models.current();
        if set.is_empty() {
            return Err(ApiError::NoModels);
        }
        set.select(names).map_err(|unknown| {
            let at = names.iter().position(|n| n == unknown).unwrap_or(0);
            let served: Vec<&str> = set.iter().map(|m| m.name()).collect();
            self.refuse(
                rpc,
                FieldError::new(
                    format!("models[{at}]"),
                    Reason::UnknownModel,
                    format!("{unknown:?} is not served; served models: {served:?}"),
                ),
            )
        })
    }

    /// The rows a Score request asks about, scored.
    async fn score_subject(
        &self,
        subject: pb::score_request::Subject,
        models: Vec<Arc<Model>>,
    ) -> Result<pb::ScoreResponse, ApiError> {
        let rows = match subject {
            pb::score_request::Subject::Person(person) => {
                let person = self.person("Score", Some(person))?;
                let scores = self
                    .engine
                    .score(person, models, self.clock.now())
                    .await?
                    .ok_or_else(|| {
                        ApiError::NotFound("person: no events for this person".into())
                    })?;
                let scores = scores.into_iter().collect::<Result<Vec<_>, _>>().map_err(
                    |(model, error)| ApiError::Model {
                        model: model.manifest.name.clone(),
                        error,
                    },
                )?;
                vec![scores]
            }
            pb::score_request::Subject::FeatureRows(rows) => {
                let rows = convert::feature_rows(rows, self.limits.max_score_rows)
                    .map_err(|e| self.refuse("Score", e))?;
                let scored = if rows.len() <= INLINE_SCORE_ROWS {
                    score_rows(&models, &rows, &self.metrics)
                } else {
                    // A large batch is CPU work that would hold up every other request on
                    // this async worker; the blocking pool takes it.
                    let metrics = self.metrics.clone();
                    tokio::task::spawn_blocking(move || score_rows(&models, &rows, &metrics))
                        .await?
                };
                scored.map_err(|(model, error)| ApiError::Model {
                    model: model.manifest.name.clone(),
                    error,
                })?
            }
        };
        Ok(convert::score_response(rows))
    }
}

/// When the caller stops waiting, from the request's `grpc-timeout` (one definition, the
/// RPC layer's).
fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Instant> {
    layer::deadline(metadata.as_ref())
}

type TriggerStream =
    Pin<Box<dyn Stream<Item = Result<pb::SubscribeTriggersResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::nudge_service_server::NudgeService for NudgeApi {
    async fn track(
        &self,
        request: Request<pb::TrackRequest>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        let deadline = deadline(request.metadata());
        let pb::TrackRequest { events } = request.into_inner();
        let results = self
            .track_batch("Track", "grpc", events, Admit::Shed { deadline })
            .await?;
        Ok(Response::new(pb::TrackResponse { results }))
    }

    type TrackStreamStream = track::AckStream;

    async fn track_stream(
        &self,
        request: Request<Streaming<pb::TrackStreamRequest>>,
    ) -> Result<Response<Self::TrackStreamStream>, Status> {
        // The first message was charged to the key's rate limit with the call; each later
        // one is charged as it arrives.
        let caller = request
            .extensions()
            .get::<Arc<crate::security::keys::Caller>>()
            .cloned();
        Ok(Response::new(
            self.track_stream(request.into_inner(), caller),
        ))
    }

    async fn identify(
        &self,
        request: Request<pb::IdentifyRequest>,
    ) -> Result<Response<pb::IdentifyResponse>, Status> {
        let (anonymous, user) = convert::identify(request.into_inner(), &self.pseudonymizer)
            .map_err(|e| self.refuse("Identify", e))?;
        let merged = self
            .engine
            .merge(anonymous, user)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(convert::identify_response(merged)))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let pb::DeleteUserRequest { person } = request.into_inner();
        let person = self.person("DeleteUser", person)?;
        let existed = self.engine.erase(person).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::DeleteUserResponse { existed }))
    }

    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let pb::ScoreRequest { subject, models } = request.into_inner();
        let subject = subject.ok_or_else(|| {
            self.refuse(
                "Score",
                FieldError::new(
                    "subject",
                    Reason::Missing,
                    "set either person or feature_rows",
                ),
            )
        })?;
        let models = self.select_models("Score", &models)?;
        Ok(Response::new(self.score_subject(subject, models).await?))
    }

    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let pb::GetProfileRequest { person, as_of } = request.into_inner();
        let person = self.person("GetProfile", person)?;
        let now = match as_of {
            Some(t) => convert::time("as_of", &t).map_err(|e| self.refuse("GetProfile", e))?,
            None => self.clock.now(),
        };
        let profile = self
            .engine
            .profile(person)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound("person: no events for this person".into()))?;
        let segments = self.models.segments();
        Ok(Response::new(convert::profile_response(
            &profile,
            now,
            segments.as_ref().as_ref(),
        )))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let spec = FeatureSpec::current();
        Ok(Response::new(pb::ListModelsResponse {
            models: convert::model_infos(&self.models.current()),
            feature_spec_version: spec.version.to_owned(),
            feature_spec_hash: spec.hash.clone(),
            errors: convert::load_errors(&self.models.failures()),
        }))
    }

    type SubscribeTriggersStream = TriggerStream;

    async fn subscribe_triggers(
        &self,
        request: Request<pb::SubscribeTriggersRequest>,
    ) -> Result<Response<Self::SubscribeTriggersStream>, Status> {
        let pb::SubscribeTriggersRequest { cursor, rules } = request.into_inner();
        check_names("rules", &rules).map_err(|e| self.refuse("SubscribeTriggers", e))?;
        let triggers = stream::subscribe(
            self.outbox.clone(),
            self.metrics.clone(),
            cursor,
            rules,
            self.stopping.clone(),
        )
        .map_err(|e| {
            if let stream::Subscribe::Cursor(_) = &e {
                self.metrics
                    .invalid_input
                    .with_label_values(&["SubscribeTriggers", Reason::OutOfRange.as_str()])
                    .inc();
            }
            ApiError::from(e)
        })?;
        let messages = tokio_stream::wrappers::ReceiverStream::new(triggers).map(|item| {
            item.map(|(cursor, trigger)| pb::SubscribeTriggersResponse {
                cursor,
                trigger: Some(convert::trigger(trigger)),
            })
            .map_err(|ended| Status::from(ApiError::from(ended)))
        });
        Ok(Response::new(Box::pin(messages)))
    }

    async fn explain_triggers(
        &self,
        request: Request<pb::ExplainTriggersRequest>,
    ) -> Result<Response<pb::ExplainTriggersResponse>, Status> {
        let pb::ExplainTriggersRequest { person } = request.into_inner();
        let person = self.person("ExplainTriggers", person)?;
        let explanation = self.engine.explain(person).await.map_err(ApiError::from)?;
        Ok(Response::new(convert::explain_response(explanation)))
    }

    async fn get_experiment_report(
        &self,
        request: Request<pb::GetExperimentReportRequest>,
    ) -> Result<Response<pb::GetExperimentReportResponse>, Status> {
        let pb::GetExperimentReportRequest { rule } = request.into_inner();
        check_len("rule", &rule, MAX_NAME_BYTES)
            .map_err(|e| self.refuse("GetExperimentReport", e))?;
        let outcomes = self
            .engine
            .experiment_report()
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(convert::experiment_report(outcomes, &rule)))
    }

    async fn reload_rules(
        &self,
        _request: Request<pb::ReloadRulesRequest>,
    ) -> Result<Response<pb::ReloadRulesResponse>, Status> {
        let engine = self.engine.clone();
        let rules = tokio::task::spawn_blocking(move || engine.reload_rules("ReloadRules"))
            .await
            .map_err(ApiError::from)?
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ReloadRulesResponse {
            version: rules.version.clone(),
            rules: rules.rules.iter().map(|r| r.name.clone()).collect(),
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let pb::ListDeadLettersRequest { endpoint, limit } = request.into_inner();
        if endpoint.is_empty() {
            return Err(self
                .refuse(
                    "ListDeadLetters",
                    FieldError::new("endpoint", Reason::Missing, "is required"),
                )
                .into());
        }
        // Bounded before anything quotes or looks up the caller's name.
        check_len("endpoint", &endpoint, MAX_NAME_BYTES)
            .map_err(|e| self.refuse("ListDeadLetters", e))?;
        // A typo must not look like an endpoint with nothing dead.
        if !self.endpoints.contains(&endpoint) {
            return Err(ApiError::NotFound(format!(
                "endpoint: {} is not a configured webhook endpoint; configured: {:?}",
                quoted(&endpoint),
                self.endpoints
            ))
            .into());
        }
        let limit = if limit == 0 {
            DEFAULT_DEAD_LETTERS
        } else {
            limit as usize
        };
        let outbox = self.outbox.clone();
        let letters = tokio::task::spawn_blocking(move || outbox.dead_letters(&endpoint, limit))
            .await
            .map_err(ApiError::from)?
            .map_err(ApiError::from)?;
        Ok(Response::new(convert::dead_letters(letters)))
    }

    async fn reload_models(
        &self,
        _request: Request<pb::ReloadModelsRequest>,
    ) -> Result<Response<pb::ReloadModelsResponse>, Status> {
        let report = self
            .reloader
            .reload("ReloadModels")
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ReloadModelsResponse {
            models: convert::model_infos(&report.set),
            changed: report.changed,
            errors: convert::load_errors(&self.models.failures()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let at = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("grpc-timeout", value.parse().unwrap());
            let before = std::time::Instant::now();
            deadline(&metadata).map(|d| d.duration_since(before))
        };
        let close = |got: Option<std::time::Duration>, want: std::time::Duration| {
            let got = got.expect("parses");
            assert!(
                got >= want && got < want + std::time::Duration::from_millis(50),
                "{got:?}"
            );
        };
        close(at("5S"), std::time::Duration::from_secs(5));
        close(at("250m"), std::time::Duration::from_millis(250));
        close(at("2M"), std::time::Duration::from_secs(120));
        close(at("1H"), std::time::Duration::from_secs(3600));
        close(at("300u"), std::time::Duration::from_micros(300));
        close(at("7n"), std::time::Duration::from_nanos(7));
        assert_eq!(at("5x"), None);
        assert_eq!(at("S"), None);
        assert_eq!(at("-1S"), None);
        assert!(deadline(&tonic::metadata::MetadataMap::new()).is_none());
    }
}
