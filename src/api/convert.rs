//! Protocol messages to domain types and back. Protocol types are destructured
//! exhaustively, so a field added to the proto is a compile error here until someone
//! decides what it means.

use crate::delivery::webhook::DeadLetter;
use crate::engine::Merge;
use crate::event::{
    check_len, check_names, quoted, Event, EventKind, FieldError, PersonKey, Properties, Reason,
    MAX_ID_BYTES, MAX_NAME_BYTES,
};
use crate::features::{self, FeatureRow, FeatureSpec, FEATURE_COUNT};
use crate::identity::Pseudonymizer;
use crate::model::{LoadFailure, Model, ModelSet, Score};
use crate::pb;
use crate::profile::Profile;
use crate::segments::Segments;
use crate::time::Time;
use crate::trigger::{Explanation, VariantOutcome};

/// The latest instant a protobuf Timestamp may hold (9999-12-31T23:59:59Z).
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;
/// The earliest (0001-01-01T00:00:00Z).
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;

/// Turns a wire event into a validated domain event, judging its time against `now` and
/// the retention window.
pub fn event(pb: pb::Event, now: Time, retention_ms: i64) -> Result<Event, FieldError> {
    let pb::Event {
        event_id,
        user_id,
        anonymous_id,
        r#type,
        event_time,
        properties,
        attributes,
    } = pb;
    let person = person_key(&user_id, &anonymous_id)?;
    // Both ids: the visitor turned out to be this user.
    let linked = (!user_id.is_empty() && !anonymous_id.is_empty())
        .then_some(PersonKey::Anonymous(anonymous_id));
    let kind = event_kind(r#type)?;
    let time = event_time
        .map(|t| time("event_time", &t))
        .transpose()?
        .ok_or_else(|| FieldError::new("event_time", Reason::Missing, "is required"))?;
    let event = Event {
        id: event_id,
        person,
        linked,
        kind,
        time,
        properties: properties.map(self::properties).unwrap_or_default(),
        attributes: attributes.into_iter().collect(),
    };
    event.validate(now, retention_ms)?;
    Ok(event)
}

/// The event type a wire value names, if it names one.
pub fn event_kind(value: i32) -> Result<EventKind, FieldError> {
    use pb::EventType as T;
    match T::try_from(value) {
        Ok(T::Unspecified) => Err(FieldError::new("type", Reason::Missing, "is required")),
        Ok(T::PageView) => Ok(EventKind::PageView),
        Ok(T::ProductView) => Ok(EventKind::ProductView),
        Ok(T::Search) => Ok(EventKind::Search),
        Ok(T::AddToCart) => Ok(EventKind::AddToCart),
        Ok(T::RemoveFromCart) => Ok(EventKind::RemoveFromCart),
        Ok(T::CheckoutStarted) => Ok(EventKind::CheckoutStarted),
        Ok(T::Purchase) => Ok(EventKind::Purchase),
        Ok(T::EmailOpen) => Ok(EventKind::EmailOpen),
        Ok(T::EmailClick) => Ok(EventKind::EmailClick),
        Err(_) => Err(FieldError::new(
            "type",
            Reason::UnknownEventType,
            format!("{value} is not a known event type"),
        )),
    }
}

fn properties(pb: pb::EventProperties) -> Properties {
    let pb::EventProperties {
        product_id,
        category,
        price,
        quantity,
        order_value,
        page,
        search_query,
        dwell_seconds,
        order_id,
        campaign_id,
    } = pb;
    Properties {
        product_id,
        category,
        price,
        quantity,
        order_value,
        page,
        search_query,
        dwell_seconds,
        order_id,
        campaign_id,
    }
}

/// The person named by a user id and/or an anonymous id, as given (not pseudonymized).
fn person_key(user_id: &str, anonymous_id: &str) -> Result<PersonKey, FieldError> {
    for (field, id) in [("user_id", user_id), ("anonymous_id", anonymous_id)] {
        if id.len() > MAX_ID_BYTES {
            return Err(FieldError::new(
                field,
                Reason::TooLong,
                format!("is {} bytes; at most {MAX_ID_BYTES} are allowed", id.len()),
            ));
        }
    }
    PersonKey::from_ids(user_id, anonymous_id).ok_or_else(|| {
        FieldError::new(
            "user_id",
            Reason::Missing,
            "one of user_id and anonymous_id is required",
        )
    })
}

/// The person a request names, pseudonymized: the only way a request's ids become a
/// [`PersonKey`], so no RPC can look up a raw id when pseudonymization is on.
pub fn person(
    pb: Option<pb::PersonRef>,
    field: &str,
    pseudonymizer: &Pseudonymizer,
) -> Result<PersonKey, FieldError> {
    let pb::PersonRef {
        user_id,
        anonymous_id,
    } = pb.ok_or_else(|| FieldError::new(field, Reason::Missing, "is required"))?;
    person_key(&user_id, &anonymous_id)
        .map(|p| pseudonymizer.person(p))
        .map_err(|e| e.under(field))
}

/// A protobuf Timestamp as a `Time`, refusing values the protobuf spec does not allow.
pub fn time(field: &str, t: &prost_types::Timestamp) -> Result<Time, FieldError> {
    if !(0..1_000_000_000).contains(&t.nanos)
        || !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&t.seconds)
    {
        return Err(FieldError::new(
            field,
            Reason::OutOfRange,
            "is not a valid timestamp (years 1 to 9999, nanos 0 to 999999999)",
        ));
    }
    Ok(Time(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000))
}

/// A `Time` as a protobuf Timestamp.
pub fn timestamp(t: Time) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.millis().div_euclid(1000),
        nanos: (t.millis().rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn field_error(e: &FieldError) -> pb::FieldError {
    pb::FieldError {
        field: e.field.clone(),
        reason: e.reason.as_str().to_owned(),
        message: e.message.clone(),
    }
}

/// A trigger as the protocol carries it.
pub fn trigger(t: crate::trigger::Trigger) -> pb::Trigger {
    pb::Trigger {
        trigger_id: t.trigger_id,
        rule: t.rule,
        user_id: t.user_id.unwrap_or_default(),
        anonymous_id: t.anonymous_id.unwrap_or_default(),
        time: Some(timestamp(Time(t.time_ms))),
        cause: t.cause,
        scores: t.scores.into_iter().collect(),
        journey_stage: t.journey_stage,
        contributions: t
            .contributions
            .into_iter()
            .map(|(model, features)| pb::ModelContributions {
                model,
                features: features
                    .into_iter()
                    .map(|c| pb::FeatureContribution {
                        feature: c.feature,
                        value: c.value,
                    })
                    .collect(),
            })
            .collect(),
        action: Some(pb::Action {
            r#type: t.action.kind,
            channel: t.action.channel,
            template: t.action.template,
            params: t.action.params.into_iter().collect(),
        }),
        experiment: t.experiment.unwrap_or_default(),
        variant: t.variant.unwrap_or_default(),
        context: t.context.map(context),
    }
}

fn context(c: crate::trigger::TriggerContext) -> pb::TriggerContext {
    pb::TriggerContext {
        product: c.product.map(product_interest),
        cart: c
            .cart
            .unwrap_or_default()
            .into_iter()
            .map(|l| pb::ContextCartLine {
                product_id: l.product_id,
                category: l.category,
                unit_price: l.unit_price,
                quantity: l.quantity,
            })
            .collect(),
        top_products: c
            .top_products
            .unwrap_or_default()
            .into_iter()
            .map(product_interest)
            .collect(),
        top_categories: c
            .top_categories
            .unwrap_or_default()
            .into_iter()
            .map(|c| pb::CategoryShare {
                category: c.category,
                share: c.share,
            })
            .collect(),
        segment: c.segment.map(|s| pb::ContextSegment {
            segment: s.segment,
            segments: s.segments,
            stage: s.stage,
        }),
        event: c.event.map(|e| pb::ContextEvent {
            event_id: e.event_id,
            kind: e.kind,
            time: Some(timestamp(Time(e.time_ms))),
            product_id: e.product_id,
            category: e.category,
            page: e.page,
            search_query: e.search_query,
        }),
    }
}

fn product_interest(p: crate::trigger::context::ProductFacts) -> pb::ProductInterest {
    pb::ProductInterest {
        product_id: p.product_id,
        category: p.category,
        price: p.price.is_finite().then_some(p.price),
        views_7d: p.views_7d,
        views_30d: p.views_30d,
        cart_adds_7d: p.cart_adds_7d,
        cart_adds_30d: p.cart_adds_30d,
        purchases_30d: p.purchases_30d,
        dwell_seconds_7d: p.dwell_seconds_7d,
        dwell_seconds_30d: p.dwell_seconds_30d,
        in_cart: p.in_cart,
        last_seen: Some(timestamp(Time(p.last_seen_ms))),
    }
}

/// Both ids of an `Identify` call, checked, as the (visitor, user) to merge.
pub fn identify(
    pb: pb::IdentifyRequest,
    pseudonymizer: &Pseudonymizer,
) -> Result<(PersonKey, PersonKey), FieldError> {
    let pb::IdentifyRequest {
        anonymous_id,
        user_id,
    } = pb;
    for (field, id) in [("anonymous_id", &anonymous_id), ("user_id", &user_id)] {
        if id.is_empty() {
            return Err(FieldError::new(field, Reason::Missing, "is required"));
        }
    }
    person_key(&user_id, &anonymous_id)?;
    Ok((
        pseudonymizer.person(PersonKey::Anonymous(anonymous_id)),
        pseudonymizer.person(PersonKey::User(user_id)),
    ))
}

pub fn identify_response(merged: Merge) -> pb::IdentifyResponse {
    pb::IdentifyResponse {
        merged: merged == Merge::Merged,
    }
}

/// Turns a Score request's caller-computed rows into FeatureSpec rows, from whichever of
/// the two forms the request uses (exactly one must be set), at most `max_rows` of them.
/// An absent feature is missing (NaN).
pub fn feature_rows(pb: pb::FeatureRows, max_rows: usize) -> Result<Vec<FeatureRow>, FieldError> {
    let pb::FeatureRows {
        rows,
        columns,
        values,
    } = pb;
    let packed = !columns.is_empty() || !values.is_empty();
    if !rows.is_empty() {
        if packed {
            return Err(FieldError::new(
                "feature_rows",
                Reason::Conflicting,
                "sets both rows and the packed columns/values; send one form",
            ));
        }
        check_row_count("feature_rows.rows", rows.len(), max_rows)?;
        return mapped_rows(rows);
    }
    if !packed {
        return Err(FieldError::new(
            "feature_rows.rows",
            Reason::Missing,
            "at least one row is required, in rows or in columns and values",
        ));
    }
    packed_rows(&columns, &values, max_rows)
}

fn check_row_count(field: &str, count: usize, max: usize) -> Result<(), FieldError> {
    if count == 0 {
        return Err(FieldError::new(
            field,
            Reason::Missing,
            "at least one row is required",
        ));
    }
    if count > max {
        return Err(FieldError::new(
            field,
            Reason::TooMany,
            format!("has {count} rows; at most {max} are allowed per request"),
        ));
    }
    Ok(())
}

/// `subject` says what is not a feature: "is" when the field path already names it.
fn unknown_feature(field: String, subject: &str, spec: &FeatureSpec) -> FieldError {
    FieldError::new(
        field,
        Reason::UnknownFeature,
        format!(
            "{subject} not a feature of FeatureSpec version {}; ListModels lists the features",
            spec.version
        ),
    )
}

/// The map form: every row names its features.
fn mapped_rows(rows: Vec<pb::FeatureRow>) -> Result<Vec<FeatureRow>, FieldError> {
    let spec = FeatureSpec::current();
    rows.into_iter()
        .enumerate()
        .map(|(i, pb::FeatureRow { values })| {
            let mut row = FeatureRow::missing();
            for (name, value) in values {
                // A key is the caller's: bounded before a message quotes it.
                check_len(
                    &format!("feature_rows.rows[{i}].values"),
                    &name,
                    MAX_NAME_BYTES,
                )?;
                let field = || format!("feature_rows.rows[{i}].values[{name:?}]");
                let Some(at) = spec.index_of(&name) else {
                    return Err(unknown_feature(field(), "is", spec));
                };
                if !value.is_finite() {
                    return Err(FieldError::new(
                        field(),
                        Reason::NotFinite,
                        format!("is {value}; leave a feature out to mark it missing"),
                    ));
                }
                row.0[at] = value;
            }
            Ok(row)
        })
        .collect()
}

/// The packed form: the columns are named once, then `values` holds the rows back to back.
/// Each column's FeatureSpec position is looked up once for the whole request; the rows
/// are then only copied into place. A NaN is a missing value, as an absent key is in the
/// map form, so the two forms can state exactly the same rows.
fn packed_rows(
    columns: &[String],
    values: &[f64],
    max_rows: usize,
) -> Result<Vec<FeatureRow>, FieldError> {
    let spec = FeatureSpec::current();
    if columns.is_empty() {
        return Err(FieldError::new(
            "feature_rows.columns",
            Reason::Missing,
            format!(
                "is empty but values holds {} numbers; name the feature of each column",
                values.len()
            ),
        ));
    }
    check_names("feature_rows.columns", columns)?;
    // For each FeatureSpec position, the column that names it, to catch a repeat.
    let mut named_by: [Option<usize>; FEATURE_COUNT] = [None; FEATURE_COUNT];
    let mut positions = Vec::with_capacity(columns.len());
    for (c, name) in columns.iter().enumerate() {
        let field = || format!("feature_rows.columns[{c}]");
        let Some(at) = spec.index_of(name) else {
            return Err(unknown_feature(
                field(),
                &format!("{} is", quoted(name)),
                spec,
            ));
        };
        if let Some(first) = named_by[at] {
            return Err(FieldError::new(
                field(),
                Reason::Duplicate,
                format!("{name:?} is already columns[{first}]; name each feature at most once"),
            ));
        }
        named_by[at] = Some(c);
        positions.push(at);
    }
    let width = columns.len();
    if !values.len().is_multiple_of(width) {
        return Err(FieldError::new(
            "feature_rows.values",
            Reason::ShapeMismatch,
            format!(
                "holds {} numbers, which is not a whole number of rows of {width} columns",
                values.len()
            ),
        ));
    }
    check_row_count("feature_rows.values", values.len() / width, max_rows)?;
    values
        .chunks_exact(width)
        .enumerate()
        .map(|(r, chunk)| {
            let mut row = FeatureRow::missing();
            for ((c, &at), &value) in positions.iter().enumerate().zip(chunk) {
                if value.is_nan() {
                    continue;
                }
                if value.is_infinite() {
                    return Err(FieldError::new(
                        format!("feature_rows.values[{}]", r * width + c),
                        Reason::NotFinite,
                        format!(
                            "is {value} (row {r}, column {:?}); NaN marks a missing value",
                            columns[c]
                        ),
                    ));
                }
                row.0[at] = value;
            }
            Ok(row)
        })
        .collect()
}

/// One model's answer, as the API reports it.
pub fn model_score(model: &Model, probability: f64) -> pb::ModelScore {
    pb::ModelScore {
        model: model.manifest.name.clone(),
        version: model.manifest.version.clone(),
        probability,
    }
}

/// Scored rows as the Score response carries them.
pub fn score_response(rows: Vec<Vec<Score>>) -> pb::ScoreResponse {
    pb::ScoreResponse {
        rows: rows
            .into_iter()
            .map(|scores| pb::RowScores {
                scores: scores
                    .iter()
                    .map(|s| model_score(&s.model, s.probability))
                    .collect(),
            })
            .collect(),
        feature_spec_version: FeatureSpec::current().version.to_owned(),
    }
}

/// A person's profile at `now` as GetProfile answers it: every feature with its
/// definition, the open session, the cart, the segments.
pub fn profile_response(
    profile: &Profile,
    now: Time,
    segments: Option<&Segments>,
) -> pb::GetProfileResponse {
    let spec = FeatureSpec::current();
    let row = features::extract(profile, now);
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
        started_at: Some(timestamp(s.start)),
        last_event_at: Some(timestamp(s.last)),
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
        last_add_at: cart.last_add.map(timestamp),
        checkout_started: cart.checkout_started(),
    };
    pb::GetProfileResponse {
        features,
        session,
        cart: Some(cart),
        first_seen: profile.first_seen().map(timestamp),
        last_seen: profile.last_seen().map(timestamp),
        feature_spec_version: spec.version.to_owned(),
        top_category: profile
            .top_category(now)
            .map(|(name, _)| name.to_owned())
            .unwrap_or_default(),
        segment: segments
            .and_then(|s| s.assign(&row))
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        rule_segments: crate::segments::rule_segments(&row)
            .into_iter()
            .map(str::to_owned)
            .collect(),
    }
}

pub fn explain_response(e: Explanation) -> pb::ExplainTriggersResponse {
    pb::ExplainTriggersResponse {
        decisions: e
            .decisions
            .into_iter()
            .map(|a| pb::TriggerDecision {
                time: Some(timestamp(a.at)),
                outcome: a.outcome.as_str().to_owned(),
                rule: a.rule,
                trigger_id: a.trigger_id,
                variant: a.variant.unwrap_or_default(),
                computed_params: a.detail.computed.into_iter().collect(),
                context: a.detail.context.map(context),
            })
            .collect(),
        timers: e
            .timers
            .into_iter()
            .map(|t| pb::PendingTimer {
                rule: t.rule,
                due: Some(timestamp(t.due)),
                step: t.step,
                cause: t.cause,
            })
            .collect(),
    }
}

/// The experiment report, only `rule`'s variants unless it is empty.
pub fn experiment_report(
    outcomes: Vec<VariantOutcome>,
    rule: &str,
) -> pb::GetExperimentReportResponse {
    pb::GetExperimentReportResponse {
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
    }
}

pub fn dead_letters(letters: Vec<DeadLetter>) -> pb::ListDeadLettersResponse {
    pb::ListDeadLettersResponse {
        dead_letters: letters
            .into_iter()
            .map(|d| pb::DeadLetter {
                cursor: d.seq,
                attempts: d.attempts,
                last_error: d.last_error,
                time: Some(timestamp(Time(d.at_ms))),
                trigger: Some(trigger(d.trigger)),
            })
            .collect(),
    }
}

pub fn model_infos(set: &ModelSet) -> Vec<pb::ModelInfo> {
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
                loaded_at: Some(timestamp(m.loaded_at)),
                engine: m.engine(),
                engine_note: m.engine_note().unwrap_or_default().to_owned(),
            }
        })
        .collect()
}

pub fn load_errors(failures: &[LoadFailure]) -> Vec<pb::ModelLoadError> {
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
            at: Some(timestamp(f.at)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_bad_ones_are_refused() {
        for ms in [0, 1, 999, 1_796_034_246_123, -1, -1001] {
            let t = Time(ms);
            assert_eq!(time("t", &timestamp(t)).unwrap(), t);
        }
        let bad_nanos = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(
            time("t", &bad_nanos).unwrap_err().reason,
            Reason::OutOfRange
        );
        let far = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(time("t", &far).unwrap_err().reason, Reason::OutOfRange);
    }

    #[test]
    fn unknown_and_missing_event_types_are_told_apart() {
        assert_eq!(event_kind(0).unwrap_err().reason, Reason::Missing);
        assert_eq!(event_kind(99).unwrap_err().reason, Reason::UnknownEventType);
        assert_eq!(event_kind(7).unwrap(), EventKind::Purchase);
    }
}
