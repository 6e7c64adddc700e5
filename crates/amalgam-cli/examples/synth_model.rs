//! Write a synthetic Llama-shaped model with amalgam's own streaming writer, for benchmarks:
//! the names, shapes and dtype of a real checkpoint, filled with seeded random values. With
//! `--base DIR` the model is that base plus small noise (a "fine-tune"), so task vectors are
//! small and dense like real ones.
//!
//! cargo run --release -p amalgam-cli --example synth_model -- OUT [--hidden 2048]
//!     [--layers 8] [--intermediate 5632] [--vocab 32000] [--dtype bf16] [--seed 1]
//!     [--base DIR] [--noise 0.002]

use std::path::PathBuf;

use amalgam::DType;
use amalgam::dtype::{decode_f32, encode_f32};
use amalgam::io::{Existing, Model, ModelWriter, TensorSpec};
use rayon::prelude::*;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().ok().expect("valid value"))
        .unwrap_or(default)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Roughly normal values (sum of two uniforms) with the given scale.
fn fill(out: &mut [f32], seed: u64, scale: f32) {
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = splitmix(seed ^ (c as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            for v in chunk {
                s = splitmix(s);
                let a = (s >> 40) as f32 / (1u64 << 24) as f32;
                let b = ((s >> 16) & 0xFF_FFFF) as f32 / (1u64 << 24) as f32;
                *v = (a + b - 1.0) * scale;
            }
        });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(args.first().expect("usage: synth_model OUT [options]"));
    let (h, layers, inter, vocab) = (
        arg(&args, "--hidden", 2048usize),
        arg(&args, "--layers", 8usize),
        arg(&args, "--intermediate", 5632usize),
        arg(&args, "--vocab", 32000usize),
    );
    let dtype =
        DType::parse_float(&arg(&args, "--dtype", "bf16".to_string())).expect("float dtype");
    let seed = arg(&args, "--seed", 1u64);
    let noise = arg(&args, "--noise", 0.002f32);
    let base: Option<PathBuf> = args
        .iter()
        .position(|a| a == "--base")
        .map(|i| PathBuf::from(&args[i + 1]));
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
    for i in 0..layers {
        let p = format!("model.layers.{i}.");
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![h, h]),
            ("self_attn.v_proj.weight", vec![h, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![inter, h]),
            ("mlp.up_proj.weight", vec![inter, h]),
            ("mlp.down_proj.weight", vec![h, inter]),
        ] {
            specs.push((format!("{p}{n}"), s));
        }
    }
    specs.push(("model.norm.weight".into(), vec![h]));
    specs.push(("lm_head.weight".into(), vec![vocab, h]));
    let tensor_specs: Vec<TensorSpec> = specs
        .iter()
        .map(|(n, s)| TensorSpec {
            name: n.clone(),
            dtype,
            shape: s.clone(),
        })
        .collect();
    let writer = ModelWriter::create(&out, tensor_specs, Some(5_000_000_000), Existing::Replace)
        .expect("create");
    let base_model = base.as_ref().map(|b| Model::open(b).expect("open base"));
    let (mut vals, mut noise_buf, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (name, shape)) in specs.iter().enumerate() {
        let n: usize = shape.iter().product();
        let tseed = splitmix(seed ^ splitmix(i as u64 + 1));
        match &base_model {
            Some(m) => {
                let v = m.tensor(name).expect("base tensor");
                decode_f32(v.dtype, v.bytes, &mut vals);
                m.release(name);
                noise_buf.resize(n, 0.0);
                fill(&mut noise_buf, tseed, noise);
                vals.par_iter_mut()
                    .zip(&noise_buf)
                    .for_each(|(a, b)| *a += b);
            }
            None => {
                vals.resize(n, 0.0);
                let scale = if shape.len() == 1 { 1.0 } else { 0.04 };
                fill(&mut vals, tseed, scale);
            }
        }
        encode_f32(dtype, &vals, &mut bytes);
        writer.write(i, &bytes).expect("write");
    }
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": h / 128,
        "num_key_value_heads": h / 128, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
        "torch_dtype": dtype.torch_name().expect("float"),
    });
    std::fs::write(
        writer.staging_dir().join("config.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    writer.finish().expect("finish");
}
