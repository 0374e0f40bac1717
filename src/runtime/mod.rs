//! The runtime layer: tokio and quinn drive the protocol state machine.
