//! Fuzz the shard-index parser: any bytes give Ok or a clean error, and an accepted index only
//! names plain files and lists each tensor once.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(i) = amalgam::io::index::parse(std::path::Path::new("fuzz"), data) {
        let mut names: Vec<_> = i.weight_map.iter().map(|(n, _)| n).collect();
        let before = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), before);
        assert!(i.files.iter().all(|f| !f.contains('/')));
    }
});
