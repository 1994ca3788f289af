//! Nudge: real-time behavioral scoring and triggers.
//!
//! Layout, in the order data flows:
//! - [`api`]: the gRPC edge; turns protocol messages into domain types and errors into
//!   statuses. No protocol type goes past it.
//! - [`event`]: `Event`, the validated domain type.
//! - [`identity`]: pseudonymization, and the aliases that make a visitor one person with
//!   a known user.
//! - [`engine`]: owns the profiles, one shard thread per slice of people; scores them,
//!   evaluates their trigger rules and commits their changes to the store (group commit)
//!   before answering.
//! - [`profile`]: a person's behavioral state, updated by `Profile::apply`.
//! - [`features`]: the FeatureSpec and `extract(&Profile, now)`.
//! - [`model`]: the `Scorer` trait, LightGBM and ONNX backends, manifests, scoring, the
//!   served set, hot swap and publishing.
//! - [`segments`]: published k-means segments and rule-based segments.
//! - [`trigger`]: the pure rules core: rules, CEL, evaluation, suppression, experiments,
//!   and the per-person trigger state.
//! - [`delivery`]: the outbox of delivered triggers, `SubscribeTriggers` readers and
//!   webhooks.
//! - [`store`]: everything durable, in one fjall database.
//! - [`readiness`]: whether the server can do its work now, and why not.
//! - [`security`]: TLS for the listeners, API keys with scopes and rate limits, and the
//!   addresses webhooks may reach.
//! - [`kafka`]: the `[kafka]` settings and the librdkafka clients the Kafka source (in
//!   `api`) and sink (in `delivery`) share.
//! - [`metrics`]: the Prometheus registry and the `/metrics` endpoint (no domain types).
//! - [`config`]: the TOML config with `NUDGE__` overrides; each section's part builds
//!   itself from it.
//! - [`app`]: builds every part from the config, serves, drains on shutdown.
//! - [`time`]: `Time`, and the `Clock` the server reads `now` from.
//! - [`heap`]: the bytes a value holds on the heap, as the engine's cache counts them.

pub mod api;
pub mod app;
pub mod config;
pub mod delivery;
pub mod engine;
pub mod event;
pub mod features;
pub mod heap;
pub mod identity;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod profile;
pub mod readiness;
pub mod security;
pub mod segments;
pub mod store;
pub mod time;
pub mod trigger;

/// Generated protocol types for `nudge.v1`. Only [`api`] and clients use these.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("nudge.v1");

    /// The Open Inference Protocol (KServe V2) messages and service, `inference`.
    pub mod inference {
        tonic::include_proto!("inference");
    }

    /// The encoded descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/nudge_descriptor.bin"));
}
