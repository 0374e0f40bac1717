//! Fault injection with real agents in network namespaces (being written).
