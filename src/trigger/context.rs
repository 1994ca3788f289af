//! What a trigger carries so its message can be personal: the person's product and
//! category memory as rules read it ([`Memory`], taken when the event was applied), and the
//! context block a rule asks for ([`TriggerContext`], chosen by the rule's `context` list).
//!
//! Sizes are bounded whatever the person did: at most [`MAX_CART_LINES`] cart lines,
//! [`MAX_TOP_PRODUCTS`] products and [`MAX_TOP_CATEGORIES`] categories. Ids in it are the
//! ids Nudge stores: the event id is pseudonymized when pseudonymization is on, and no
//! person id appears in it (the trigger names the person once, at its top). Product ids
//! and category names are the catalog's, which a message needs as they are.

use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::profile::interest::{ProductInterest, PRODUCT_DAYS};
use crate::profile::Profile;
use crate::time::Time;

/// Cart lines a context carries (the cart itself holds up to `profile::MAX_CART_LINES`).
pub const MAX_CART_LINES: usize = 10;
/// Products a context carries, most interesting first.
pub const MAX_TOP_PRODUCTS: usize = 3;
/// Categories a context carries, highest affinity first.
pub const MAX_TOP_CATEGORIES: usize = 3;

/// The parts of a context a rule can ask for, by the names the rules file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ContextPart {
    Cart,
    TopProducts,
    TopCategories,
    Segment,
    Event,
}

impl ContextPart {
    pub const ALL: [ContextPart; 5] = [
        ContextPart::Cart,
        ContextPart::TopProducts,
        ContextPart::TopCategories,
        ContextPart::Segment,
        ContextPart::Event,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ContextPart::Cart => "cart",
            ContextPart::TopProducts => "top_products",
            ContextPart::TopCategories => "top_categories",
            ContextPart::Segment => "segment",
            ContextPart::Event => "event",
        }
    }

    pub fn parse(name: &str) -> Option<ContextPart> {
        ContextPart::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// One product as rules read it (`product.views_7d`) and contexts carry it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProductFacts {
    pub product_id: String,
    /// Empty when no event gave one.
    pub category: String,
    /// The latest unit price seen (NaN when none was; left out of JSON then).
    #[serde(with = "finite")]
    pub price: f64,
    pub views_7d: u32,
    pub views_30d: u32,
    pub cart_adds_7d: u32,
    pub cart_adds_30d: u32,
    pub purchases_30d: u32,
    pub dwell_seconds_7d: u32,
    pub dwell_seconds_30d: u32,
    pub in_cart: bool,
    /// Milliseconds since the epoch of the latest event about it.
    pub last_seen_ms: i64,
}

/// One cart line in a context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CartLineFacts {
    pub product_id: String,
    /// From the product memory; empty when no event gave the product's category.
    pub category: String,
    pub unit_price: f64,
    pub quantity: u32,
}

/// A category and its share of the person's affinity over the last 30 days.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CategoryShare {
    pub category: String,
    pub share: f64,
}

/// Which parts of [`Memory`] some rule reads: [`Memory::of`] builds only these, so a
/// rules file that reads none of it pays nothing per event, and one that reads only
/// `product` does not also sort categories and copy the cart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryNeeds {
    /// `product` in an expression (every product-level rule reads it).
    pub product: bool,
    /// `top_category`, `categories` or `category_share(..)`, or a `top_categories` context.
    pub categories: bool,
    /// A `cart` context.
    pub cart: bool,
    /// A `top_products` context.
    pub top_products: bool,
}

impl MemoryNeeds {
    /// Whether the rules read any of the memory.
    pub fn any(self) -> bool {
        self.product || self.categories || self.cart || self.top_products
    }
}

/// What rules and contexts read of a person's memory, taken when the event was applied
/// (so a later event of the same batch does not change what an earlier one's rules see).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    /// The product of the current event, if it names one.
    pub product: Option<ProductFacts>,
    /// Every category with any affinity, highest share first.
    pub categories: Vec<CategoryShare>,
    /// The cart, at most [`MAX_CART_LINES`] lines.
    pub cart: Vec<CartLineFacts>,
    pub top_products: Vec<ProductFacts>,
}

impl Memory {
    /// The parts of the memory of `profile` at `now` that `needs` names (the rest stay
    /// empty), for an evaluation caused by `event` (none for timers).
    pub fn of(profile: &Profile, event: Option<&Event>, now: Time, needs: MemoryNeeds) -> Memory {
        let mut memory = Memory::default();
        if !needs.any() {
            return memory;
        }
        let today = now.day();
        let products = profile.products();
        let facts = |p: &ProductInterest| product_facts(profile, p, today);
        if needs.product {
            memory.product = event
                .and_then(|e| e.properties.product_id.as_deref())
                .and_then(|id| products.get(id))
                .map(facts);
        }
        if needs.categories {
            memory.categories = profile
                .category_affinities(now)
                .into_iter()
                .map(|(category, share)| CategoryShare {
                    category: category.to_owned(),
                    share,
                })
                .collect();
        }
        if needs.cart {
            memory.cart = profile
                .cart()
                .lines
                .iter()
                .take(MAX_CART_LINES)
                .map(|l| CartLineFacts {
                    product_id: l.product_id.clone(),
                    category: products
                        .get(&l.product_id)
                        .and_then(|p| p.category.as_deref())
                        .unwrap_or_default()
                        .to_owned(),
                    unit_price: l.price,
                    quantity: l.quantity,
                })
                .collect();
        }
        if needs.top_products {
            memory.top_products = products
                .top(today)
                .into_iter()
                .take(MAX_TOP_PRODUCTS)
                .map(facts)
                .collect();
        }
        memory
    }

    /// The category with the highest affinity ("" when there is none).
    pub fn top_category(&self) -> &str {
        self.categories.first().map_or("", |c| c.category.as_str())
    }
}

fn product_facts(profile: &Profile, p: &ProductInterest, today: i32) -> ProductFacts {
    let week = p.last_days(today, 7);
    let month = p.last_days(today, PRODUCT_DAYS);
    ProductFacts {
        product_id: p.id.to_string(),
        category: p.category.as_deref().unwrap_or_default().to_owned(),
        price: p.price,
        views_7d: week.views.into(),
        views_30d: month.views.into(),
        cart_adds_7d: week.cart_adds.into(),
        cart_adds_30d: month.cart_adds.into(),
        purchases_30d: month.purchases.into(),
        dwell_seconds_7d: week.dwell_seconds.into(),
        dwell_seconds_30d: month.dwell_seconds.into(),
        in_cart: profile.cart().lines.iter().any(|l| *l.product_id == *p.id),
        last_seen_ms: p.last_seen.millis(),
    }
}

/// The context block of a trigger: the parts its rule asked for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TriggerContext {
    /// The product the rule fired for (product-level rules: rules that read `product`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<ProductFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cart: Option<Vec<CartLineFacts>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_products: Option<Vec<ProductFacts>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_categories: Option<Vec<CategoryShare>>,
    /// The k-means segment ("" without a segments file) and the rule-based segments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<SegmentFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventFacts>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentFacts {
    pub segment: String,
    pub segments: Vec<String>,
    pub stage: String,
}

/// The event that caused the trigger (absent for timers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventFacts {
    /// As stored: pseudonymized when pseudonymization is on.
    pub event_id: String,
    pub kind: String,
    pub time_ms: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub product_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub category: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub page: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub search_query: String,
}

impl EventFacts {
    pub fn of(e: &Event) -> EventFacts {
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let p = &e.properties;
        EventFacts {
            event_id: e.id.clone(),
            kind: e.kind.as_str().to_owned(),
            time_ms: e.time.millis(),
            product_id: text(&p.product_id),
            category: text(&p.category),
            page: text(&p.page),
            search_query: text(&p.search_query),
        }
    }
}

/// A price that may be NaN (unknown): JSON has no NaN, so it is written as null and read
/// back as NaN.
mod finite {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_some(v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}
