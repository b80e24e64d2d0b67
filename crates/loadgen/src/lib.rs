//! Workloads for the demo, the end-to-end tests and the benchmarks: deterministic
//! support tickets with duplicates and malformed records, a producer that records where
//! each record landed, and an accounting of what became of each one.

pub mod accounting;
pub mod bench;
pub mod kafka_io;
pub mod tickets;
pub mod workload;
