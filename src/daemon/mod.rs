//! The standalone daemon on top of the runtime: the `mantissa agent` process, its HTTP/JSON API,
//! configuration, and the HTTP client the CLI's client commands use.

pub mod agent;
pub mod client;
pub mod config;
pub mod http;
pub mod offer;
