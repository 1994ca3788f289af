//! Nudge's integration tests: one binary, real gRPC over loopback sockets, real models.

mod architecture;
mod bad_input;
mod cache;
mod commands;
mod context;
mod crash;
mod dashboard;
mod durability;
mod faults;
mod features;
mod hotswap;
mod identity;
mod image;
mod inference;
mod kafka;
mod models;
mod operations;
mod parity;
mod regressions;
mod scoring;
mod security;
mod segment;
mod support;
mod triggers;
