//! HTTP load benchmark of a 3-node cluster (being written).

fn main() {}
