//! The gRPC edge: the `NudgeService` implementation. Requests are converted to domain types
//! here ([`convert`]), errors to statuses in one table ([`error`]), and per-RPC metrics come
//! from one tower layer ([`layer`]). No protocol type goes past this module.

pub mod convert;
pub mod error;
pub mod layer;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Engine, Merge, Outcome, Scores};
use crate::event::PersonKey;
use crate::event::{FieldError, Reason};
use crate::features::{self, FeatureRow, FeatureSpec};
use crate::identity::Pseudonymizer;
use crate::metrics::Metrics;
use crate::model::reload::Reloader;
use crate::model::{LoadFailure, Model, ModelRegistry, ModelSet};
use crate::pb;
use crate::time::Clock;
use crate::trigger::Triggers;
pub use error::ApiError;

/// Batches one TrackStream works on at once; more wait in HTTP/2 flow control.
const STREAM_IN_FLIGHT: usize = 8;

/// Request limits the API enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_batch_events: usize,
    pub max_score_rows: usize,
    /// Events older than this are refused.
    pub retention_ms: i64,
}

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
    pub triggers: Arc<Triggers>,
    /// Turns true when the server shuts down: long streams end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// Triggers a subscriber's stream buffers; a slower subscriber makes the reader wait, it
/// never grows memory.
const SUBSCRIBER_BUFFER: usize = 64;

impl NudgeApi {
    /// The person a request names, pseudonymized.
    fn person(&self, rpc: &str, pb: Option<pb::PersonRef>) -> Result<PersonKey, ApiError> {
        convert::person(pb, "person")
            .map(|p| self.pseudonymizer.person(p))
            .map_err(|e| self.refuse(rpc, e))
    }

    /// Validates, applies and answers a batch of events (Track and TrackStream).
    async fn track_batch(
        &self,
        rpc: &str,
        events: Vec<pb::Event>,
    ) -> Result<Vec<pb::EventResult>, ApiError> {
        let now = self.clock.now();
        self.check_count(rpc, "events", events.len(), self.limits.max_batch_events)?;

        let mut results = Vec::with_capacity(events.len());
        let mut valid = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            let event_id = event.event_id.clone();
            let type_label = convert::event_kind(event.r#type).map_or("unknown", |k| k.as_str());
            let mut result = pb::EventResult {
                event_id,
                status: pb::EventStatus::Accepted.into(),
                error: None,
                scores: Vec::new(),
            };
            match convert::event(event, now, self.limits.retention_ms) {
                Ok(event) => valid.push((i, self.pseudonymizer.event(event))),
                Err(e) => {
                    let e = e.under(&format!("events[{i}]"));
                    self.metrics
                        .events
                        .with_label_values(&[type_label, "rejected"])
                        .inc();
                    self.metrics
                        .invalid_input
                        .with_label_values(&[rpc, e.reason.as_str()])
                        .inc();
                    result.status = pb::EventStatus::Rejected.into();
                    result.error = Some(convert::field_error(&e));
                }
            }
            results.push(result);
        }

        let kinds: Vec<&'static str> = valid.iter().map(|(_, e)| e.kind.as_str()).collect();
        let tracked = self.engine.track(valid, now).await?;
        for ((i, outcome), kind) in tracked.into_iter().zip(kinds) {
            let (status, outcome_label, scores) = match outcome {
                Outcome::Accepted(scores) => (pb::EventStatus::Accepted, "accepted", scores),
                Outcome::Duplicate(scores) => (pb::EventStatus::Duplicate, "duplicate", scores),
            };
            self.metrics
                .events
                .with_label_values(&[kind, outcome_label])
                .inc();
            results[i].status = status.into();
            // The event is applied; a model that failed is logged and counted, and the
            // event still answers with the scores that succeeded.
            results[i].scores = scores
                .into_iter()
                .filter_map(|s| match s {
                    Ok(s) => Some(model_score(&s.model, s.probability)),
                    Err((model, error)) => {
                        tracing::error!(model = %model.manifest.name, %error, "scoring after an event failed");
                        None
                    }
                })
                .collect();
        }
        Ok(results)
    }

    /// Counts a refused input and turns it into the error to answer with.
    fn refuse(&self, rpc: &str, e: FieldError) -> ApiError {
        self.metrics
            .invalid_input
            .with_label_values(&[rpc, e.reason.as_str()])
            .inc();
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

    /// Turns caller-computed rows into FeatureSpec rows; absent features are missing.
    fn feature_rows(&self, rows: Vec<pb::FeatureRow>) -> Result<Vec<FeatureRow>, ApiError> {
        let spec = FeatureSpec::current();
        rows.into_iter()
            .enumerate()
            .map(|(i, pb::FeatureRow { values })| {
                let mut row = FeatureRow::missing();
                for (name, value) in values {
                    let field = || format!("feature_rows.rows[{i}].values[{name:?}]");
                    let Some(at) = spec.index_of(&name) else {
                        return Err(self.refuse(
                            "Score",
                            FieldError::new(
                                field(),
                                Reason::UnknownFeature,
                                format!(
                                    "is not a feature of FeatureSpec version {}; ListModels lists the features",
                                    spec.version
                                ),
                            ),
                        ));
                    };
                    if !value.is_finite() {
                        return Err(self.refuse(
                            "Score",
                            FieldError::new(
                                field(),
                                Reason::NotFinite,
                                format!("is {value}; leave a feature out to mark it missing"),
                            ),
                        ));
                    }
                    row.0[at] = value;
                }
                Ok(row)
            })
            .collect()
    }
}

/// One model's answer, as the API reports it.
fn model_score(model: &Model, probability: f64) -> pb::ModelScore {
    pb::ModelScore {
        model: model.manifest.name.clone(),
        version: model.manifest.version.clone(),
        probability,
    }
}

fn model_scores(scores: Scores) -> Result<Vec<pb::ModelScore>, ApiError> {
    scores
        .into_iter()
        .map(|s| match s {
            Ok(s) => Ok(model_score(&s.model, s.probability)),
            Err((model, error)) => Err(ApiError::Model {
                model: model.manifest.name.clone(),
                error,
            }),
        })
        .collect()
}

#[tonic::async_trait]
impl pb::nudge_service_server::NudgeService for NudgeApi {
    async fn track(
        &self,
        request: Request<pb::TrackRequest>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        let pb::TrackRequest { events } = request.into_inner();
        let results = self.track_batch("Track", events).await?;
        Ok(Response::new(pb::TrackResponse { results }))
    }

    type TrackStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::TrackStreamResponse, Status>> + Send + 'static>>;

    async fn track_stream(
        &self,
        request: Request<Streaming<pb::TrackStreamRequest>>,
    ) -> Result<Response<Self::TrackStreamStream>, Status> {
        let api = self.clone();
        // A few batches in flight per stream, answered in order; a failed batch (overload,
        // store failure) ends the stream with its status, and the caller resends from the
        // first batch it has no acknowledgement for.
        let acks = request
            .into_inner()
            .map(move |message| {
                let api = api.clone();
                async move {
                    let pb::TrackStreamRequest { sequence, events } = message?;
                    let results = api.track_batch("TrackStream", events).await?;
                    Ok(pb::TrackStreamResponse { sequence, results })
                }
            })
            .buffered(STREAM_IN_FLIGHT);
        Ok(Response::new(Box::pin(acks)))
    }

    async fn identify(
        &self,
        request: Request<pb::IdentifyRequest>,
    ) -> Result<Response<pb::IdentifyResponse>, Status> {
        let pb::IdentifyRequest {
            anonymous_id,
            user_id,
        } = request.into_inner();
        for (field, id) in [("anonymous_id", &anonymous_id), ("user_id", &user_id)] {
            if id.is_empty() {
                return Err(self
                    .refuse(
                        "Identify",
                        FieldError::new(field, Reason::Missing, "is required"),
                    )
                    .into());
            }
        }
        convert::person_key(&user_id, &anonymous_id).map_err(|e| self.refuse("Identify", e))?;
        let anonymous = self
            .pseudonymizer
            .person(PersonKey::Anonymous(anonymous_id));
        let user = self.pseudonymizer.person(PersonKey::User(user_id));
        let merged = self
            .engine
            .merge(anonymous, user)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::IdentifyResponse {
            merged: merged == Merge::Merged,
        }))
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
        let now = self.clock.now();
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
        let rows = match subject {
            pb::score_request::Subject::Person(person) => {
                let person =
                    convert::person(Some(person), "person").map_err(|e| self.refuse("Score", e))?;
                let scores = self
                    .engine
                    .score(person, models, now)
                    .await
                    .map_err(ApiError::from)?
                    .ok_or_else(|| {
                        ApiError::NotFound("person: no events for this person".into())
                    })?;
                vec![pb::RowScores {
                    scores: model_scores(scores)?,
                }]
            }
            pb::score_request::Subject::FeatureRows(pb::FeatureRows { rows }) => {
                self.check_count(
                    "Score",
                    "feature_rows.rows",
                    rows.len(),
                    self.limits.max_score_rows,
                )?;
                let rows = self.feature_rows(rows)?;
                let metrics = self.metrics.clone();
                // A batch of rows is CPU work; keep it off the async workers.
                tokio::task::spawn_blocking(move || score_batch(&metrics, &models, &rows))
                    .await
                    .map_err(|e| Status::internal(format!("scoring task failed: {e}")))??
            }
        };
        Ok(Response::new(pb::ScoreResponse {
            rows,
            feature_spec_version: FeatureSpec::current().version.to_owned(),
        }))
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

        let spec = FeatureSpec::current();
        let row = features::extract(&profile, now);
        let features = spec
            .features
            .iter()
            .zip(row.values())
            .map(|(def, &value)| pb::FeatureValue {
                name: def.name.to_owned(),
                value,
                description: def.description.to_owned(),
            })
            .collect();
        let session = profile.open_session(now).map(|s| pb::SessionState {
            active: true,
            started_at: Some(convert::timestamp(s.start)),
            last_event_at: Some(convert::timestamp(s.last)),
            page_views: s.page_views,
            product_views: s.product_views,
            distinct_products: s.products.len() as u32,
        });
        let cart = profile.cart();
        let cart = pb::CartState {
            lines: cart
                .lines
                .iter()
                .map(|l| pb::CartLine {
                    product_id: l.product_id.clone(),
                    quantity: l.quantity,
                    price: l.price,
                })
                .collect(),
            items: cart.items(),
            value: cart.value(),
            last_add_at: cart.last_add.map(convert::timestamp),
            checkout_started: cart.checkout_started(),
        };
        Ok(Response::new(pb::GetProfileResponse {
            features,
            session,
            cart: Some(cart),
            first_seen: profile.first_seen().map(convert::timestamp),
            last_seen: profile.last_seen().map(convert::timestamp),
            feature_spec_version: spec.version.to_owned(),
            top_category: profile
                .top_category(now)
                .map(|(name, _)| name.to_owned())
                .unwrap_or_default(),
            segment: self
                .models
                .segments()
                .as_ref()
                .as_ref()
                .and_then(|s| s.assign(&row))
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            rule_segments: crate::segments::rule_segments(&row)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let spec = FeatureSpec::current();
        Ok(Response::new(pb::ListModelsResponse {
            models: model_infos(&self.models.current()),
            feature_spec_version: spec.version.to_owned(),
            feature_spec_hash: spec.hash.clone(),
            errors: load_errors(&self.models.failures()),
        }))
    }

    type SubscribeTriggersStream =
        Pin<Box<dyn Stream<Item = Result<pb::SubscribeTriggersResponse, Status>> + Send + 'static>>;

    async fn subscribe_triggers(
        &self,
        request: Request<pb::SubscribeTriggersRequest>,
    ) -> Result<Response<Self::SubscribeTriggersStream>, Status> {
        let pb::SubscribeTriggersRequest { cursor, rules } = request.into_inner();
        let outbox = &self.triggers.outbox;
        let newest = outbox.watermark();
        if cursor > newest {
            self.metrics
                .invalid_input
                .with_label_values(&["SubscribeTriggers", "out_of_range"])
                .inc();
            return Err(Status::out_of_range(format!(
                "cursor: {cursor} is ahead of the newest trigger ({newest}); was it issued by another Nudge deployment?"
            )));
        }
        let first = outbox
            .first()
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if let Some(first) = first {
            if cursor > 0 && cursor + 1 < first {
                self.metrics
                    .invalid_input
                    .with_label_values(&["SubscribeTriggers", "out_of_range"])
                    .inc();
                return Err(Status::out_of_range(format!(
                    "cursor: triggers after {cursor} up to {} were trimmed (older than the outbox retention); resume from cursor 0 or {}",
                    first - 1,
                    first - 1
                )));
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(SUBSCRIBER_BUFFER);
        self.metrics.subscribers.inc();
        let subscribed = Subscribed(self.metrics.clone());
        let triggers = self.triggers.clone();
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let _subscribed = subscribed;
            stream_triggers(triggers, cursor, rules, tx, stopping).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn explain_triggers(
        &self,
        request: Request<pb::ExplainTriggersRequest>,
    ) -> Result<Response<pb::ExplainTriggersResponse>, Status> {
        let pb::ExplainTriggersRequest { person } = request.into_inner();
        let person = self.person("ExplainTriggers", person)?;
        let state = self.engine.explain(person).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ExplainTriggersResponse {
            decisions: state
                .decisions
                .into_iter()
                .map(|a| pb::TriggerDecision {
                    time: Some(convert::timestamp(a.at)),
                    outcome: a.outcome.as_str().to_owned(),
                    rule: a.rule,
                    trigger_id: a.trigger_id,
                    variant: a.variant.unwrap_or_default(),
                })
                .collect(),
            timers: state
                .timers
                .into_iter()
                .map(|t| pb::PendingTimer {
                    rule: t.rule,
                    due: Some(convert::timestamp(t.due)),
                    step: t.step,
                    cause: t.cause,
                })
                .collect(),
        }))
    }

    async fn get_experiment_report(
        &self,
        request: Request<pb::GetExperimentReportRequest>,
    ) -> Result<Response<pb::GetExperimentReportResponse>, Status> {
        let pb::GetExperimentReportRequest { rule } = request.into_inner();
        let triggers = self.triggers.clone();
        let outcomes = tokio::task::spawn_blocking(move || triggers.outcomes())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::GetExperimentReportResponse {
            variants: outcomes
                .into_iter()
                .filter(|o| rule.is_empty() || o.rule == rule)
                .map(|o| pb::VariantOutcome {
                    conversion_rate: if o.totals.exposures == 0 {
                        0.0
                    } else {
                        o.totals.conversions as f64 / o.totals.exposures as f64
                    },
                    rule: o.rule,
                    experiment: o.experiment,
                    variant: o.variant,
                    exposures: o.totals.exposures,
                    conversions: o.totals.conversions,
                })
                .collect(),
        }))
    }

    async fn reload_rules(
        &self,
        _request: Request<pb::ReloadRulesRequest>,
    ) -> Result<Response<pb::ReloadRulesResponse>, Status> {
        let triggers = self.triggers.clone();
        let rules = tokio::task::spawn_blocking(move || triggers.reload_rules("ReloadRules"))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::failed_precondition(format!("{e}\nthe running rules stay")))?;
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
        let limit = if limit == 0 { 100 } else { limit as usize };
        let triggers = self.triggers.clone();
        let letters = tokio::task::spawn_blocking(move || triggers.dead_letters(&endpoint, limit))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: letters
                .into_iter()
                .map(|d| pb::DeadLetter {
                    cursor: d.seq,
                    attempts: d.attempts,
                    last_error: d.last_error,
                    time: Some(convert::timestamp(crate::time::Time(d.at_ms))),
                    trigger: Some(convert::trigger(d.trigger)),
                })
                .collect(),
        }))
    }

    async fn reload_models(
        &self,
        _request: Request<pb::ReloadModelsRequest>,
    ) -> Result<Response<pb::ReloadModelsResponse>, Status> {
        let report = self.reloader.reload("ReloadModels").await.map_err(|e| {
            Status::unavailable(format!(
                "reload failed; the current models keep serving: {e}"
            ))
        })?;
        Ok(Response::new(pb::ReloadModelsResponse {
            models: model_infos(&report.set),
            changed: report.changed,
            errors: load_errors(&self.models.failures()),
        }))
    }
}

/// Streams the outbox after `cursor` into `tx` until the subscriber goes away.
async fn stream_triggers(
    triggers: Arc<Triggers>,
    mut cursor: u64,
    rules: Vec<String>,
    tx: tokio::sync::mpsc::Sender<Result<pb::SubscribeTriggersResponse, Status>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = triggers.outbox.changes();
    loop {
        if *stopping.borrow() {
            let _ = tx
                .send(Err(Status::unavailable(format!(
                    "the server is shutting down; resume from cursor {cursor} on another instance or after the restart"
                ))))
                .await;
            return;
        }
        let batch = {
            let triggers = triggers.clone();
            tokio::task::spawn_blocking(move || triggers.outbox.read(cursor, 256)).await
        };
        let batch = match batch {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "reading the outbox failed: {e}"
                    ))))
                    .await;
                return;
            }
            Err(_) => return,
        };
        if batch.is_empty() {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = stopping.changed() => {}
                _ = tx.closed() => return,
            }
            continue;
        }
        for (seq, trigger) in batch {
            cursor = seq;
            if !rules.is_empty() && !rules.contains(&trigger.rule) {
                continue;
            }
            let message = pb::SubscribeTriggersResponse {
                cursor: seq,
                trigger: Some(convert::trigger(trigger)),
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
    }
}

/// Counts a subscriber while its stream lives.
struct Subscribed(Arc<Metrics>);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.subscribers.dec();
    }
}

fn model_infos(set: &ModelSet) -> Vec<pb::ModelInfo> {
    set.iter()
        .map(|m| {
            let manifest = &m.manifest;
            pb::ModelInfo {
                name: manifest.name.clone(),
                version: manifest.version.clone(),
                format: manifest.format.as_str().to_owned(),
                predicts: manifest.predicts.clone(),
                features: manifest.features.clone(),
                sha256: manifest.sha256.clone(),
                loaded_at: Some(convert::timestamp(m.loaded_at)),
            }
        })
        .collect()
}

fn load_errors(failures: &[LoadFailure]) -> Vec<pb::ModelLoadError> {
    failures
        .iter()
        .map(|f| pb::ModelLoadError {
            manifest: f
                .manifest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            reason: f.error.reason().to_owned(),
            message: f.error.to_string(),
            at: Some(convert::timestamp(f.at)),
        })
        .collect()
}

/// Scores every row with every model, one backend call per model.
fn score_batch(
    metrics: &Metrics,
    models: &[Arc<Model>],
    rows: &[FeatureRow],
) -> Result<Vec<pb::RowScores>, ApiError> {
    let mut out: Vec<pb::RowScores> = (0..rows.len()).map(|_| pb::RowScores::default()).collect();
    for model in models {
        let started = Instant::now();
        let result = model.score(rows);
        metrics.observe_model(model.name(), started.elapsed(), result.is_ok());
        let probabilities = result.map_err(|error| ApiError::Model {
            model: model.manifest.name.clone(),
            error,
        })?;
        for (row, probability) in out.iter_mut().zip(probabilities) {
            row.scores.push(model_score(model, probability));
        }
    }
    Ok(out)
}
