//! `Event`, the validated domain type for one thing a person did, and the rules that make an
//! event valid. The api module turns protocol messages into `Event`s; nothing past it sees a
//! protocol type.

use std::collections::BTreeMap;

use crate::time::{Time, DAY_MS};

/// Longest accepted `event_id`, in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 128;
/// Longest accepted user or anonymous id, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest accepted string property (product id, category, page, query …), in bytes.
pub const MAX_PROPERTY_BYTES: usize = 1024;
/// Most free-form attributes per event.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute key and value, in bytes.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 128;
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;
/// Longest accepted name a request uses to pick something the server has (a model, a
/// rule, a feature, a webhook endpoint), in bytes: longer than any such name can be, and
/// short enough for a message to quote it.
pub const MAX_NAME_BYTES: usize = 256;
/// Most names one request may list (models to score, rules to subscribe to).
pub const MAX_NAMES: usize = 256;
/// How far in the future an `event_time` may be, to absorb client clock skew.
pub const MAX_FUTURE_MS: i64 = DAY_MS;
// Limits on the numbers an event carries. They keep every feature finite: a cart holds at
// most `MAX_CART_LINES` (100) lines of at most `u32::MAX` units (a line's units saturate)
// at most `MAX_PRICE` each, so its value stays below 4.3e23; revenue sums saturate at
// `profile::MAX_REVENUE` (1e18) however many orders arrive; dwell times add up in
// saturating integer milliseconds. The limits are far above any real price or order in
// any currency, so they refuse only broken or hostile input.

/// Longest accepted dwell time: a day.
pub const MAX_DWELL_SECONDS: f64 = 86_400.0;
/// Largest accepted quantity on one cart event.
pub const MAX_QUANTITY: u32 = 10_000;
/// Largest accepted unit price: 10^12 in the shop's currency unit.
pub const MAX_PRICE: f64 = 1e12;
/// Largest accepted order value of one purchase: 10^15 in the shop's currency unit.
pub const MAX_ORDER_VALUE: f64 = 1e15;

/// What a person did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    PageView,
    ProductView,
    Search,
    AddToCart,
    RemoveFromCart,
    CheckoutStarted,
    Purchase,
    EmailOpen,
    EmailClick,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::PageView,
        EventKind::ProductView,
        EventKind::Search,
        EventKind::AddToCart,
        EventKind::RemoveFromCart,
        EventKind::CheckoutStarted,
        EventKind::Purchase,
        EventKind::EmailOpen,
        EventKind::EmailClick,
    ];

    /// The snake_case name used in metrics labels and files.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::PageView => "page_view",
            EventKind::ProductView => "product_view",
            EventKind::Search => "search",
            EventKind::AddToCart => "add_to_cart",
            EventKind::RemoveFromCart => "remove_from_cart",
            EventKind::CheckoutStarted => "checkout_started",
            EventKind::Purchase => "purchase",
            EventKind::EmailOpen => "email_open",
            EventKind::EmailClick => "email_click",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether the event is the person browsing the site (and so opens or extends a
    /// session). Email opens and clicks happen in a mail client and do not.
    pub const fn is_visit(self) -> bool {
        !matches!(self, EventKind::EmailOpen | EventKind::EmailClick)
    }

    /// Whether the event is a page the person looked at.
    pub const fn is_page(self) -> bool {
        matches!(self, EventKind::PageView | EventKind::ProductView)
    }
}

/// Who an event belongs to. A known user id wins over an anonymous id; identity stitching
/// (anonymous → known) is the identity module's job.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PersonKey {
    User(String),
    Anonymous(String),
}

impl PersonKey {
    /// The key for a user id and/or an anonymous id; `None` when both are empty.
    pub fn from_ids(user_id: &str, anonymous_id: &str) -> Option<PersonKey> {
        if !user_id.is_empty() {
            Some(PersonKey::User(user_id.to_owned()))
        } else if !anonymous_id.is_empty() {
            Some(PersonKey::Anonymous(anonymous_id.to_owned()))
        } else {
            None
        }
    }

    /// A stable 64-bit hash (FNV-1a), the same in every process, used to pick a shard.
    pub fn stable_hash(&self) -> u64 {
        let (tag, id) = match self {
            PersonKey::User(id) => (b'u', id),
            PersonKey::Anonymous(id) => (b'a', id),
        };
        fnv1a(std::iter::once(tag).chain(id.bytes()))
    }
}

/// FNV-1a over bytes: small, stable across processes and versions.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The typed facts of an event. Numbers are finite and not negative once validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties {
    pub product_id: Option<String>,
    pub category: Option<String>,
    pub price: Option<f64>,
    pub quantity: Option<u32>,
    pub order_value: Option<f64>,
    pub page: Option<String>,
    pub search_query: Option<String>,
    pub dwell_seconds: Option<f64>,
    pub order_id: Option<String>,
    pub campaign_id: Option<String>,
}

/// One validated event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: String,
    pub person: PersonKey,
    /// The anonymous id the event also carried when it named a known user: that visitor is
    /// this person (identity stitching).
    pub linked: Option<PersonKey>,
    pub kind: EventKind,
    pub time: Time,
    pub properties: Properties,
    pub attributes: BTreeMap<String, String>,
}

/// Why an input was refused: the field's path, a stable reason, and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub reason: Reason,
    pub message: String,
}

/// Stable, machine-readable reasons for refusing input; also the `reason` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Missing,
    TooLong,
    TooMany,
    UnknownEventType,
    InFuture,
    NotFinite,
    Negative,
    OutOfRange,
    UnknownFeature,
    UnknownModel,
    MessageTooLarge,
    Undecodable,
    TooOld,
    /// Two fields that exclude each other are both set.
    Conflicting,
    /// A name that may appear once appears again.
    Duplicate,
    /// A packed array's length does not fit the shape it must have.
    ShapeMismatch,
    /// A value of a kind this server does not take (a tensor datatype, an output name).
    Unsupported,
}

impl Reason {
    pub const ALL: [Reason; 17] = [
        Reason::Missing,
        Reason::TooLong,
        Reason::TooMany,
        Reason::UnknownEventType,
        Reason::InFuture,
        Reason::NotFinite,
        Reason::Negative,
        Reason::OutOfRange,
        Reason::UnknownFeature,
        Reason::UnknownModel,
        Reason::MessageTooLarge,
        Reason::Undecodable,
        Reason::TooOld,
        Reason::Conflicting,
        Reason::Duplicate,
        Reason::ShapeMismatch,
        Reason::Unsupported,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::TooLong => "too_long",
            Reason::TooMany => "too_many",
            Reason::UnknownEventType => "unknown_event_type",
            Reason::InFuture => "in_future",
            Reason::NotFinite => "not_finite",
            Reason::Negative => "negative",
            Reason::OutOfRange => "out_of_range",
            Reason::UnknownFeature => "unknown_feature",
            Reason::UnknownModel => "unknown_model",
            Reason::MessageTooLarge => "message_too_large",
            Reason::Undecodable => "undecodable",
            Reason::TooOld => "too_old",
            Reason::Conflicting => "conflicting",
            Reason::Duplicate => "duplicate",
            Reason::ShapeMismatch => "shape_mismatch",
            Reason::Unsupported => "unsupported",
        }
    }
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: Reason, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason,
            message: message.into(),
        }
    }

    /// The same error with its field path put under `prefix` ("events[2]" + "event_time").
    pub fn under(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

impl Event {
    /// Checks everything about the event that does not depend on the wire format. `now` is
    /// the server's clock, against which future timestamps and the retention window are
    /// judged.
    pub fn validate(&self, now: Time, retention_ms: i64) -> Result<(), FieldError> {
        check_len("event_id", &self.id, MAX_EVENT_ID_BYTES)?;
        if self.id.is_empty() {
            return Err(FieldError::new("event_id", Reason::Missing, "is required"));
        }
        let (field, id) = match &self.person {
            PersonKey::User(id) => ("user_id", id),
            PersonKey::Anonymous(id) => ("anonymous_id", id),
        };
        check_len(field, id, MAX_ID_BYTES)?;
        if self.time.since(now) > MAX_FUTURE_MS {
            return Err(FieldError::new(
                "event_time",
                Reason::InFuture,
                format!(
                    "is {} hours ahead of the server's clock; at most 24 are allowed",
                    self.time.since(now) / crate::time::HOUR_MS
                ),
            ));
        }
        if now.since(self.time) > retention_ms {
            return Err(FieldError::new(
                "event_time",
                Reason::TooOld,
                format!(
                    "is {} days old; events older than the {}-day retention are refused",
                    now.since(self.time) / DAY_MS,
                    retention_ms / DAY_MS
                ),
            ));
        }
        self.validate_properties()
            .map_err(|e| e.under("properties"))?;
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(FieldError::new(
                "attributes",
                Reason::TooMany,
                format!(
                    "has {} entries; at most {MAX_ATTRIBUTES} are allowed",
                    self.attributes.len()
                ),
            ));
        }
        for (key, value) in &self.attributes {
            check_len("attributes", key, MAX_ATTRIBUTE_KEY_BYTES)?;
            check_len(
                &format!("attributes[{key:?}]"),
                value,
                MAX_ATTRIBUTE_VALUE_BYTES,
            )?;
        }
        Ok(())
    }

    fn validate_properties(&self) -> Result<(), FieldError> {
        let p = &self.properties;
        for (field, value) in [
            ("product_id", &p.product_id),
            ("category", &p.category),
            ("page", &p.page),
            ("search_query", &p.search_query),
            ("order_id", &p.order_id),
            ("campaign_id", &p.campaign_id),
        ] {
            if let Some(value) = value {
                check_len(field, value, MAX_PROPERTY_BYTES)?;
            }
        }
        for (field, value, max) in [
            ("price", p.price, MAX_PRICE),
            ("order_value", p.order_value, MAX_ORDER_VALUE),
            ("dwell_seconds", p.dwell_seconds, MAX_DWELL_SECONDS),
        ] {
            if let Some(value) = value {
                check_amount(field, value, max)?;
            }
        }
        if p.quantity.is_some_and(|q| q == 0 || q > MAX_QUANTITY) {
            return Err(FieldError::new(
                "quantity",
                Reason::OutOfRange,
                format!("must be between 1 and {MAX_QUANTITY}"),
            ));
        }
        let needs_product = matches!(
            self.kind,
            EventKind::ProductView | EventKind::AddToCart | EventKind::RemoveFromCart
        );
        if needs_product && p.product_id.as_deref().is_none_or(str::is_empty) {
            return Err(FieldError::new(
                "product_id",
                Reason::Missing,
                format!("is required for {} events", self.kind.as_str()),
            ));
        }
        if self.kind == EventKind::Purchase && p.order_value.is_none() {
            return Err(FieldError::new(
                "order_value",
                Reason::Missing,
                "is required for purchase events",
            ));
        }
        Ok(())
    }
}

/// A request's string of at most `max` bytes, or `TooLong` naming the field.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        return Err(FieldError::new(
            field,
            Reason::TooLong,
            format!("is {} bytes; at most {max} are allowed", value.len()),
        ));
    }
    Ok(())
}

/// A list of at most [`MAX_NAMES`] names of at most [`MAX_NAME_BYTES`] each, or the
/// field (`field[i]` for one name) and why not.
pub fn check_names(field: &str, names: &[String]) -> Result<(), FieldError> {
    if names.len() > MAX_NAMES {
        return Err(FieldError::new(
            field,
            Reason::TooMany,
            format!(
                "has {} entries; at most {MAX_NAMES} are allowed",
                names.len()
            ),
        ));
    }
    for (i, name) in names.iter().enumerate() {
        check_len(&format!("{field}[{i}]"), name, MAX_NAME_BYTES)?;
    }
    Ok(())
}

/// A caller's text as a message quotes it: at most 64 characters, `…` marking a cut.
pub fn quoted(text: &str) -> String {
    let shown: String = text.chars().take(64).collect();
    let more = if shown.len() < text.len() { "…" } else { "" };
    format!("{shown:?}{more}")
}

/// A finite number that is not negative and at most `max`.
fn check_amount(field: &str, value: f64, max: f64) -> Result<(), FieldError> {
    if !value.is_finite() {
        return Err(FieldError::new(
            field,
            Reason::NotFinite,
            format!("is {value}; numbers must be finite"),
        ));
    }
    if value < 0.0 {
        return Err(FieldError::new(
            field,
            Reason::Negative,
            format!("is {value}; it must not be negative"),
        ));
    }
    if value > max {
        return Err(FieldError::new(
            field,
            Reason::OutOfRange,
            format!(
                "is {}; at most {} is allowed",
                readable(value),
                readable(max)
            ),
        ));
    }
    Ok(())
}

/// A number as people read it: large ones in exponent form (1e308, not 309 digits).
fn readable(value: f64) -> String {
    if value.abs() >= 1e6 {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind) -> Event {
        Event {
            id: "e1".into(),
            person: PersonKey::User("u1".into()),
            linked: None,
            kind,
            time: Time(1_000 * DAY_MS),
            properties: Properties {
                product_id: Some("p1".into()),
                order_value: Some(10.0),
                ..Properties::default()
            },
            attributes: BTreeMap::new(),
        }
    }

    /// Applies `edit` to a valid event and checks the outcome: `None` = valid, or the
    /// expected (field, reason).
    fn check(kind: EventKind, edit: impl FnOnce(&mut Event), expected: Option<(&str, Reason)>) {
        let mut e = event(kind);
        edit(&mut e);
        let got = e.validate(Time(1_000 * DAY_MS), 90 * DAY_MS).err();
        let got = got.as_ref().map(|e| (e.field.as_str(), e.reason));
        assert_eq!(got, expected);
    }

    #[test]
    fn validation_names_the_field_and_reason() {
        use EventKind::*;
        check(PageView, |_| {}, None);
        check(
            PageView,
            |e| e.id.clear(),
            Some(("event_id", Reason::Missing)),
        );
        check(
            PageView,
            |e| e.id = "x".repeat(129),
            Some(("event_id", Reason::TooLong)),
        );
        check(
            PageView,
            |e| e.person = PersonKey::Anonymous("a".repeat(300)),
            Some(("anonymous_id", Reason::TooLong)),
        );
        check(PageView, |e| e.time = e.time.plus_ms(DAY_MS), None);
        check(PageView, |e| e.time = e.time.plus_ms(-90 * DAY_MS), None);
        check(
            PageView,
            |e| e.time = e.time.plus_ms(-90 * DAY_MS - 1),
            Some(("event_time", Reason::TooOld)),
        );
        check(
            PageView,
            |e| e.time = e.time.plus_ms(DAY_MS + 1),
            Some(("event_time", Reason::InFuture)),
        );
        check(
            ProductView,
            |e| e.properties.price = Some(f64::NAN),
            Some(("properties.price", Reason::NotFinite)),
        );
        check(
            ProductView,
            |e| e.properties.price = Some(f64::INFINITY),
            Some(("properties.price", Reason::NotFinite)),
        );
        check(
            Purchase,
            |e| e.properties.order_value = Some(-1.0),
            Some(("properties.order_value", Reason::Negative)),
        );
        check(
            Purchase,
            |e| e.properties.order_value = None,
            Some(("properties.order_value", Reason::Missing)),
        );
        check(
            AddToCart,
            |e| e.properties.product_id = None,
            Some(("properties.product_id", Reason::Missing)),
        );
        check(
            AddToCart,
            |e| e.properties.quantity = Some(0),
            Some(("properties.quantity", Reason::OutOfRange)),
        );
        check(
            ProductView,
            |e| e.properties.dwell_seconds = Some(90_000.0),
            Some(("properties.dwell_seconds", Reason::OutOfRange)),
        );
        // Finite but huge amounts would overflow the cart value and the revenue sums.
        check(
            AddToCart,
            |e| e.properties.price = Some(1e308),
            Some(("properties.price", Reason::OutOfRange)),
        );
        check(AddToCart, |e| e.properties.price = Some(1e12), None);
        check(
            AddToCart,
            |e| e.properties.price = Some(1.000_000_1e12),
            Some(("properties.price", Reason::OutOfRange)),
        );
        check(
            Purchase,
            |e| e.properties.order_value = Some(1.7e308),
            Some(("properties.order_value", Reason::OutOfRange)),
        );
        check(Purchase, |e| e.properties.order_value = Some(1e15), None);
        check(
            Purchase,
            |e| e.properties.order_value = Some(1.000_000_1e15),
            Some(("properties.order_value", Reason::OutOfRange)),
        );
        check(
            ProductView,
            |e| e.properties.dwell_seconds = Some(86_400.0),
            None,
        );
        check(AddToCart, |e| e.properties.quantity = Some(10_000), None);
        check(
            AddToCart,
            |e| e.properties.quantity = Some(10_001),
            Some(("properties.quantity", Reason::OutOfRange)),
        );
        let mut huge = event(AddToCart);
        huge.properties.price = Some(1e308);
        assert_eq!(
            huge.validate(huge.time, 90 * DAY_MS)
                .unwrap_err()
                .to_string(),
            "properties.price: is 1e308; at most 1e12 is allowed"
        );
        // NaN is not finite before it is out of range.
        check(
            AddToCart,
            |e| e.properties.price = Some(f64::NAN),
            Some(("properties.price", Reason::NotFinite)),
        );
        check(
            PageView,
            |e| {
                for i in 0..65 {
                    e.attributes.insert(format!("k{i}"), "v".into());
                }
            },
            Some(("attributes", Reason::TooMany)),
        );
    }

    #[test]
    fn person_hash_is_stable_and_distinguishes_kinds() {
        let user = PersonKey::User("42".into());
        let anon = PersonKey::Anonymous("42".into());
        assert_ne!(user.stable_hash(), anon.stable_hash());
        // FNV-1a 64 of "u42" and "a42", pinned so a change to the hash (which would move
        // every person to another shard) is a deliberate decision. The values were computed
        // once outside this code, with a few lines of Python FNV-1a checked against the
        // published vector for "a" (0xaf63dc4c8601ec8c):
        //     h = 0xcbf29ce484222325
        //     for b in b"u42": h = ((h ^ b) * 0x100000001b3) % 2**64
        assert_eq!(user.stable_hash(), 0x4d2f_6519_3e88_405a);
        assert_eq!(anon.stable_hash(), 0xe668_7119_04a5_f9ae);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
    }
}
