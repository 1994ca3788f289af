//! Protocol messages to domain types and back. Protocol types are destructured
//! exhaustively, so a field added to the proto is a compile error here until someone
//! decides what it means.

use crate::event::{Event, EventKind, FieldError, PersonKey, Properties, Reason, MAX_ID_BYTES};
use crate::pb;
use crate::time::Time;

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

/// The person named by a user id and/or an anonymous id.
pub fn person_key(user_id: &str, anonymous_id: &str) -> Result<PersonKey, FieldError> {
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

/// The person a request names.
pub fn person(pb: Option<pb::PersonRef>, field: &str) -> Result<PersonKey, FieldError> {
    let pb::PersonRef {
        user_id,
        anonymous_id,
    } = pb.ok_or_else(|| FieldError::new(field, Reason::Missing, "is required"))?;
    person_key(&user_id, &anonymous_id).map_err(|e| e.under(field))
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
    }
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
