//! Fuzz the shard-index parser: any bytes give Ok or a clean error, and an accepted index only
//! names plain files and lists each tensor once. The checks are `amalgam::fuzz::index`,
//! which the stable harness (`crates/amalgam/tests/fuzz_parsers.rs`) runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| amalgam::fuzz::index(data));
