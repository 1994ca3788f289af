//! What protects Nudge on an open network: TLS for its listeners ([`tls`]), API keys with
//! scopes and rate limits ([`keys`]), and the addresses outgoing webhooks may reach
//! ([`address`]). The gRPC check of keys is the `api::auth` layer; this module holds the
//! parts that know nothing of gRPC.

pub mod address;
pub mod keys;
pub mod tls;
