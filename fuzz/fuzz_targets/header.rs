//! Fuzz the safetensors header parser and validator: any bytes must give Ok or a clean error,
//! and an accepted header's offsets must lie inside the input. The checks are `amalgam::fuzz::header`,
//! which the stable harness (`crates/amalgam/tests/fuzz_parsers.rs`) runs too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| amalgam::fuzz::header(data));
