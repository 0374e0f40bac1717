//! End-to-end tests of the `mantissa agent` process (being written).
