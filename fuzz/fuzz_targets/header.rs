//! Fuzz the safetensors header parser and validator: any bytes must give Ok or a clean error,
//! and an accepted header's offsets must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = amalgam::io::header::parse(std::path::Path::new("fuzz"), data) {
        for t in &h.tensors {
            assert!(h.data_start + t.end <= data.len());
            assert_eq!(t.end - t.start, t.numel() * t.dtype.size());
        }
    }
});
