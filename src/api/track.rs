//! `Track` and `TrackStream`: a batch of wire events validated one by one (a bad one is
//! answered with its field and reason, the others still apply), applied by the engine, and
//! answered per event with the person's fresh scores.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::{Code, Status, Streaming};

use super::{convert, layer, ApiError, NudgeApi};
use crate::engine::{Admit, Outcome};
use crate::event::FieldError;
use crate::pb;
use crate::security::keys::Caller;

/// Batches one TrackStream works on at once; more wait in HTTP/2 flow control.
const STREAM_IN_FLIGHT: usize = 8;

pub type AckStream =
    Pin<Box<dyn Stream<Item = Result<pb::TrackStreamResponse, Status>> + Send + 'static>>;

impl NudgeApi {
    /// Validates, applies and answers a batch of events (Track, TrackStream, and the HTTP
    /// API's calls once translated). `rpc` labels refusals, `source` the events metric.
    pub(super) async fn track_batch(
        &self,
        rpc: &'static str,
        source: &'static str,
        events: Vec<pb::Event>,
        admit: Admit,
    ) -> Result<Vec<pb::EventResult>, ApiError> {
        let now = self.clock.now();
        self.check_count(rpc, "events", events.len(), self.limits.max_batch_events)?;
        if let Admit::Shed { .. } = admit {
            // Under overload most calls are refused; they should cost as little as
            // possible, so the refusal comes before validating and pseudonymizing.
            self.engine.refuse_if_saturated()?;
        }

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
                        .with_label_values(&[source, type_label, "rejected"])
                        .inc();
                    self.count_refusal(rpc, &e);
                    result.status = pb::EventStatus::Rejected.into();
                    result.error = Some(convert::field_error(&e));
                }
            }
            results.push(result);
        }

        let kinds: Vec<&'static str> = valid.iter().map(|(_, e)| e.kind.as_str()).collect();
        let tracked = self.engine.track(valid, now, admit).await?;
        for ((i, outcome), kind) in tracked.into_iter().zip(kinds) {
            let (status, outcome_label, scores) = match outcome {
                Outcome::Accepted(scores) => (pb::EventStatus::Accepted, "accepted", scores),
                Outcome::Duplicate(scores) => (pb::EventStatus::Duplicate, "duplicate", scores),
            };
            self.metrics
                .events
                .with_label_values(&[source, kind, outcome_label])
                .inc();
            results[i].status = status.into();
            // The event is applied; a model that failed is logged and counted, and the
            // event still answers with the scores that succeeded.
            results[i].scores = scores
                .into_iter()
                .filter_map(|s| match s {
                    Ok(s) => Some(convert::model_score(&s.model, s.probability)),
                    Err((model, error)) => {
                        tracing::error!(model = %model.manifest.name, %error, "scoring after an event failed");
                        None
                    }
                })
                .collect();
        }
        Ok(results)
    }

    /// Acknowledges each batch of a TrackStream in order, a few in flight at a time. A
    /// failed batch (overload, store failure) ends the stream with its status, and the
    /// caller resends from the first batch it has no acknowledgement for.
    pub(super) fn track_stream(
        &self,
        requests: Streaming<pb::TrackStreamRequest>,
        caller: Option<Arc<Caller>>,
    ) -> AckStream {
        let api = self.clone();
        let acks = requests
            .enumerate()
            .map(move |(i, message)| {
                let api = api.clone();
                let caller = caller.clone();
                async move {
                    let pb::TrackStreamRequest { sequence, events } =
                        message.map_err(|status| api.undecodable(status))?;
                    if let Some(caller) = caller.filter(|_| i > 0) {
                        super::auth::admit(&api.metrics, &caller)?;
                    }
                    // The stream's window bounds its batches; its deadline is the whole
                    // stream's, not theirs.
                    let results = api
                        .track_batch("TrackStream", "grpc", events, Admit::Flow)
                        .await?;
                    Ok(pb::TrackStreamResponse { sequence, results })
                }
            })
            .buffered(STREAM_IN_FLIGHT);
        Box::pin(acks)
    }

    /// A stream message tonic refused is the caller's input, as the layer treats a unary
    /// one (one status for one cause): RESOURCE_EXHAUSTED when oversize, INVALID_ARGUMENT
    /// naming the proto field when undecodable, counted. (A stream's status travels in
    /// trailers, which the layer does not rewrite.)
    fn undecodable(&self, status: Status) -> Status {
        let Some((code, reason, message)) = layer::refusal(
            status.code(),
            status.message(),
            self.limits.max_message_bytes,
        ) else {
            return status;
        };
        if code == Code::InvalidArgument {
            let e = FieldError::new("message", reason, message);
            return self.refuse("TrackStream", e).into();
        }
        self.metrics
            .invalid_input
            .with_label_values(&["TrackStream", reason.as_str()])
            .inc();
        Status::new(code, message)
    }
}
