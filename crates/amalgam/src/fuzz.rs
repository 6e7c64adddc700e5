//! The checks the fuzz harnesses run on one input of each file parser (the stable harness in
//! `tests/fuzz_parsers.rs` and the libFuzzer targets in `fuzz/`): the parser must return, `Ok`
//! or a clean error, and an accepted input must hold what the parser promises. A failed check
//! panics.

use std::path::Path;

/// The safetensors header parser and validator: an accepted header's offsets lie inside the
/// input and match each tensor's shape and dtype.
pub fn header(data: &[u8]) {
    if let Ok(h) = crate::io::header::parse(Path::new("fuzz"), data) {
        for t in &h.tensors {
            assert!(h.data_start + t.end <= data.len());
            assert_eq!(t.end - t.start, t.numel() * t.dtype.size());
        }
    }
}

/// The shard-index parser: an accepted index lists each tensor once and names only plain files.
pub fn index(data: &[u8]) {
    if let Ok(i) = crate::io::index::parse(Path::new("fuzz"), data) {
        let mut names: Vec<_> = i.weight_map.iter().map(|(n, _)| n).collect();
        let before = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), before);
        assert!(i.files.iter().all(|f| !f.contains('/')));
    }
}

/// The merge config parser (YAML).
pub fn merge_config(data: &[u8]) {
    let _ =
        crate::config::MergeConfig::parse(Path::new("fuzz.yml"), &String::from_utf8_lossy(data));
}

/// The library config parser (YAML).
pub fn library_config(data: &[u8]) {
    let _ = crate::library::config::LibraryConfig::parse(
        Path::new("fuzz.yml"),
        &String::from_utf8_lossy(data),
    );
}

/// The library manifest parser: an accepted manifest's task files stay inside the library.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = crate::library::format::Manifest::parse(Path::new("fuzz"), data) {
        for t in &m.tasks {
            assert!(
                !t.file.contains('/') || t.file.starts_with("tasks/"),
                "{}",
                t.file
            );
            assert!(!t.file.contains(".."), "{}", t.file);
        }
    }
}

/// The PEFT adapter config parser.
pub fn adapter_config(data: &[u8]) {
    let _ = crate::lora::AdapterConfig::parse(
        Path::new("fuzz"),
        Path::new("fuzz/adapter_config.json"),
        &String::from_utf8_lossy(data),
    );
}
