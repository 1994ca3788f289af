//! Labeled history in the formats data teams have: events as JSON Lines in the shape of
//! `Track` (the proto's JSON mapping, as the simulator writes), or as CSV; and labels as a
//! CSV of (person, time, label). Files are read as streams, one record at a time.
//!
//! Every event goes through the same validation as the server's (`Event::validate`), with
//! the event's own time as `now`: what the server would refuse, training refuses too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use nudge::event::{Event, EventKind, PersonKey, Properties};
use nudge::time::Time;

/// One event as a JSON line: the field names of `nudge.v1.Event` in the proto JSON
/// mapping (camelCase), `type` as `EVENT_TYPE_PAGE_VIEW` or `page_view`, times in RFC 3339.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventRecord {
    pub event_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub anonymous_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub event_time: String,
    #[serde(default)]
    pub properties: PropertiesRecord,
    /// Free-form string attributes, as `Track` takes them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// `nudge.v1.EventProperties` in the proto JSON mapping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PropertiesRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwell_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
}

/// One event as a CSV row (header names as below; empty cells are absent).
#[derive(Debug, Deserialize)]
struct CsvEvent {
    event_id: String,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    anonymous_id: String,
    #[serde(rename = "type")]
    kind: String,
    event_time: String,
    product_id: Option<String>,
    category: Option<String>,
    price: Option<f64>,
    quantity: Option<u32>,
    order_value: Option<f64>,
    page: Option<String>,
    search_query: Option<String>,
    dwell_seconds: Option<f64>,
}

pub fn parse_time(text: &str) -> anyhow::Result<Time> {
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("{text:?} is not an RFC 3339 time"))?;
    Ok(Time(t.timestamp_millis()))
}

pub fn format_time(t: Time) -> String {
    chrono::DateTime::from_timestamp_millis(t.millis())
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn kind(text: &str) -> anyhow::Result<EventKind> {
    let name = text
        .strip_prefix("EVENT_TYPE_")
        .unwrap_or(text)
        .to_ascii_lowercase();
    EventKind::parse(&name).with_context(|| format!("{text:?} is not an event type"))
}

impl EventRecord {
    pub fn into_event(self) -> anyhow::Result<Event> {
        let person = PersonKey::from_ids(&self.user_id, &self.anonymous_id)
            .context("one of userId and anonymousId is required")?;
        // Both ids: the visitor logged in as this user, as the server reads a Track event.
        let linked = (!self.user_id.is_empty() && !self.anonymous_id.is_empty())
            .then(|| PersonKey::Anonymous(self.anonymous_id.clone()));
        let p = self.properties;
        let event = Event {
            id: self.event_id,
            person,
            linked,
            kind: kind(&self.kind)?,
            time: parse_time(&self.event_time)?,
            properties: Properties {
                product_id: p.product_id,
                category: p.category,
                price: p.price,
                quantity: p.quantity,
                order_value: p.order_value,
                page: p.page,
                search_query: p.search_query,
                dwell_seconds: p.dwell_seconds,
                order_id: p.order_id,
                campaign_id: p.campaign_id,
            },
            attributes: self.attributes,
        };
        // The server's rules, with the event's own time as `now`.
        event.validate(event.time, i64::MAX)?;
        Ok(event)
    }

    pub fn from_event(e: &Event) -> EventRecord {
        let (user_id, anonymous_id) = match (&e.person, &e.linked) {
            (PersonKey::User(id), Some(PersonKey::Anonymous(anonymous))) => {
                (id.clone(), anonymous.clone())
            }
            (PersonKey::User(id), _) => (id.clone(), String::new()),
            (PersonKey::Anonymous(id), _) => (String::new(), id.clone()),
        };
        let p = &e.properties;
        EventRecord {
            event_id: e.id.clone(),
            user_id,
            anonymous_id,
            kind: e.kind.as_str().to_owned(),
            event_time: format_time(e.time),
            properties: PropertiesRecord {
                product_id: p.product_id.clone(),
                category: p.category.clone(),
                price: p.price,
                quantity: p.quantity,
                order_value: p.order_value,
                page: p.page.clone(),
                search_query: p.search_query.clone(),
                dwell_seconds: p.dwell_seconds,
                order_id: p.order_id.clone(),
                campaign_id: p.campaign_id.clone(),
            },
            attributes: e.attributes.clone(),
        }
    }
}

/// Reads events from a `.jsonl` or `.csv` file, one at a time. Errors name the line.
pub fn read_events(path: &Path) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<Event>>>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let name = path.display().to_string();
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => Ok(Box::new(
            BufReader::new(file)
                .lines()
                .enumerate()
                .filter_map(move |(i, line)| {
                    let line = match line {
                        Ok(l) if l.trim().is_empty() => return None,
                        Ok(l) => l,
                        Err(e) => return Some(Err(e.into())),
                    };
                    Some(
                        serde_json::from_str::<EventRecord>(&line)
                            .map_err(anyhow::Error::from)
                            .and_then(EventRecord::into_event)
                            .with_context(|| format!("{name}:{}", i + 1)),
                    )
                }),
        )),
        Some("csv") => {
            let reader = csv::Reader::from_reader(file);
            Ok(Box::new(
                reader
                    .into_deserialize::<CsvEvent>()
                    .enumerate()
                    .map(move |(i, row)| {
                        let row = row.with_context(|| format!("{name}: row {}", i + 1))?;
                        EventRecord {
                            event_id: row.event_id,
                            user_id: row.user_id,
                            anonymous_id: row.anonymous_id,
                            kind: row.kind,
                            event_time: row.event_time,
                            properties: PropertiesRecord {
                                product_id: row.product_id,
                                category: row.category,
                                price: row.price,
                                quantity: row.quantity,
                                order_value: row.order_value,
                                page: row.page,
                                search_query: row.search_query,
                                dwell_seconds: row.dwell_seconds,
                                ..Default::default()
                            },
                            attributes: BTreeMap::new(),
                        }
                        .into_event()
                        .with_context(|| format!("{name}: row {}", i + 1))
                    }),
            ))
        }
        _ => bail!("{name}: events must be .jsonl or .csv"),
    }
}

/// Writes events as JSON lines.
pub fn write_events<'a>(
    out: &mut impl Write,
    events: impl IntoIterator<Item = &'a Event>,
) -> anyhow::Result<()> {
    for e in events {
        serde_json::to_writer(&mut *out, &EventRecord::from_event(e))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// A label given by the data team: this person, at this time, had this outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct GivenLabel {
    pub person: PersonKey,
    pub time: Time,
    pub label: bool,
}

#[derive(Debug, Deserialize)]
struct CsvLabel {
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    anonymous_id: String,
    time: String,
    label: u8,
}

/// Reads labels from a CSV with columns `user_id`, `anonymous_id`, `time`, `label` (0/1).
pub fn read_labels(path: &Path) -> anyhow::Result<Vec<GivenLabel>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in reader.deserialize::<CsvLabel>().enumerate() {
        let row = row.with_context(|| format!("{}: row {}", path.display(), i + 1))?;
        out.push(GivenLabel {
            person: PersonKey::from_ids(&row.user_id, &row.anonymous_id)
                .with_context(|| format!("{}: row {}: no person", path.display(), i + 1))?,
            time: parse_time(&row.time)?,
            label: match row.label {
                0 => false,
                1 => true,
                other => bail!(
                    "{}: row {}: label {other} is not 0 or 1",
                    path.display(),
                    i + 1
                ),
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_and_csv_give_the_same_events() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("e.jsonl");
        std::fs::write(
            &jsonl,
            concat!(
                r#"{"eventId":"1","userId":"u","type":"EVENT_TYPE_PRODUCT_VIEW","eventTime":"2026-03-02T10:00:00Z","properties":{"productId":"p","price":9.5}}"#,
                "\n\n",
                r#"{"eventId":"2","anonymousId":"a","type":"purchase","eventTime":"2026-03-02T10:01:00.500Z","properties":{"orderValue":20}}"#,
                "\n",
                r#"{"eventId":"3","userId":"u","anonymousId":"a","type":"page_view","eventTime":"2026-03-02T10:02:00Z"}"#,
                "\n"
            ),
        )
        .unwrap();
        let csv = dir.path().join("e.csv");
        std::fs::write(
            &csv,
            "event_id,user_id,anonymous_id,type,event_time,product_id,category,price,quantity,order_value,page,search_query,dwell_seconds\n\
             1,u,,product_view,2026-03-02T10:00:00Z,p,,9.5,,,,,\n\
             2,,a,EVENT_TYPE_PURCHASE,2026-03-02T10:01:00.500Z,,,,,20,,,\n\
             3,u,a,page_view,2026-03-02T10:02:00Z,,,,,,,,\n",
        )
        .unwrap();
        let a: Vec<Event> = read_events(&jsonl).unwrap().map(Result::unwrap).collect();
        let b: Vec<Event> = read_events(&csv).unwrap().map(Result::unwrap).collect();
        assert_eq!(a, b);
        assert_eq!(a[1].time, Time(1_772_445_660_500));
        assert_eq!(a[1].person, PersonKey::Anonymous("a".into()));
        // Both ids: the user's event, and the login that links the visitor.
        assert_eq!(a[2].person, PersonKey::User("u".into()));
        assert_eq!(a[2].linked, Some(PersonKey::Anonymous("a".into())));
        assert_eq!(a[0].linked, None);

        // Round trip through the writer.
        let mut out = Vec::new();
        write_events(&mut out, &a).unwrap();
        std::fs::write(&jsonl, out).unwrap();
        let c: Vec<Event> = read_events(&jsonl).unwrap().map(Result::unwrap).collect();
        assert_eq!(a, c);

        // A bad line names itself.
        std::fs::write(&jsonl, "{\"eventId\":\"x\",\"type\":\"teleport\",\"eventTime\":\"2026-03-02T10:00:00Z\",\"userId\":\"u\"}\n").unwrap();
        let err = read_events(&jsonl).unwrap().next().unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("e.jsonl:1"), "{err:#}");
    }

    /// A line as a Track caller writes it — the proto3 JSON mapping of `nudge.v1.Event`,
    /// with attributes and both ids — reads as the event the server makes of the same
    /// message.
    #[test]
    fn a_track_shaped_line_reads_as_the_server_reads_the_message() {
        use nudge::pb;
        let line = r#"{"eventId":"e-9","userId":"u-42","anonymousId":"cookie-7","type":"EVENT_TYPE_ADD_TO_CART","eventTime":"2026-03-02T10:00:00.250Z","properties":{"productId":"sku-1","category":"shoes","price":59.0,"quantity":2,"campaignId":"spring"},"attributes":{"utm_source":"newsletter","ab":"b"}}"#;
        let record: EventRecord = serde_json::from_str(line).unwrap();
        let from_file = record.into_event().unwrap();
        let message = pb::Event {
            event_id: "e-9".into(),
            user_id: "u-42".into(),
            anonymous_id: "cookie-7".into(),
            r#type: pb::EventType::AddToCart.into(),
            event_time: Some(nudge::api::convert::timestamp(Time(1_772_445_600_250))),
            properties: Some(pb::EventProperties {
                product_id: Some("sku-1".into()),
                category: Some("shoes".into()),
                price: Some(59.0),
                quantity: Some(2),
                campaign_id: Some("spring".into()),
                ..Default::default()
            }),
            attributes: [("utm_source", "newsletter"), ("ab", "b")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        };
        let served = nudge::api::convert::event(message, from_file.time, i64::MAX).unwrap();
        assert_eq!(from_file, served);
        assert_eq!(from_file.attributes["utm_source"], "newsletter");

        // And it writes back the same line's content.
        let again: EventRecord = serde_json::from_str(
            &serde_json::to_string(&EventRecord::from_event(&served)).unwrap(),
        )
        .unwrap();
        assert_eq!(again.into_event().unwrap(), served);
    }
}
