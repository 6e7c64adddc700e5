//! Routing parity (fixtures from scripts/gen_routing_fixtures.py): SMILE against FusionBench
//! 0.2.33's `SmileMoELinear` on a tiny BERT, Arrow against PEFT 0.21's Arrow model on a tiny
//! Llama (outputs and per-token coefficients, to 1e-4), and the oracle over a task library
//! against the rebuilt task model.

use std::path::{Path, PathBuf};

use amalgam::io::Model;
use amalgam_eval::route::GateKind;
use amalgam_eval::route::experts::{Expert, Source, Truncation};
use amalgam_eval::{Evaluator, Weighting};

mod common;

use common::{flat, ids_rows as ids, max_diff};

const TOL: f32 = 1e-4;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/routing")
        .join(path)
}

fn experts(dirs: &[PathBuf]) -> Vec<Expert> {
    dirs.iter()
        .flat_map(|d| Expert::from_arg(d.to_str().unwrap()).unwrap())
        .collect()
}

#[test]
fn smile_matches_fusionbench_smile_moe_linear() {
    let exp = Model::open(fixture("smile/expected.safetensors")).unwrap();
    let ids = ids(&exp);
    let fts: Vec<PathBuf> = (0..3).map(|i| fixture(&format!("smile/ft{i}"))).collect();
    for (setting, gate_k, k, top_k) in [("g2k4t1", 2, 4, 1), ("g3k6t2", 3, 6, 2)] {
        let mut ev = Evaluator::open(&fixture("smile/base"), None).unwrap();
        let plain = ev.forward_ids(&ids).unwrap();
        assert!(max_diff(&flat(&plain), &exp.floats("hidden_base").unwrap()) < TOL);
        let attached = ev
            .attach(
                &experts(&fts),
                &[],
                GateKind::Smile { gate_k, top_k },
                Truncation {
                    rank: Some(k),
                    gate_k,
                },
                &|_, _| {},
            )
            .unwrap();
        assert_eq!(attached.layers, 12);
        assert_eq!(attached.experts, ["ft0", "ft1", "ft2"]);
        let (hidden, trace) = ev.forward_ids_routed(&ids, Some(Weighting::Token)).unwrap();
        let d = max_diff(
            &flat(&hidden),
            &exp.floats(&format!("hidden_{setting}")).unwrap(),
        );
        assert!(d < TOL, "{setting}: hidden states differ by {d}");
        // The first routed layer to run is layer 0's query.
        let d = max_diff(
            &trace[0],
            &exp.floats(&format!("routing_{setting}")).unwrap(),
        );
        assert!(d < TOL, "{setting}: routing weights differ by {d}");
        assert_eq!(trace.len(), 12);
    }
}

#[test]
fn arrow_matches_peft_arrow_routing() {
    let exp = Model::open(fixture("arrow/expected.safetensors")).unwrap();
    let ids = ids(&exp);
    let adapters: Vec<PathBuf> = (0..3)
        .map(|i| fixture(&format!("arrow/adapters/task{i}")))
        .collect();
    for (setting, top_k, temperature) in [("k2t1", 2, 1.0), ("k3t05", 3, 0.5)] {
        let mut ev = Evaluator::open(&fixture("arrow/base"), None).unwrap();
        let plain = ev.forward_ids(&ids).unwrap();
        assert!(max_diff(&flat(&plain), &exp.floats("logits_base").unwrap()) < TOL);
        let attached = ev
            .attach(
                &experts(&adapters),
                &[],
                GateKind::Arrow { top_k, temperature },
                Truncation {
                    rank: None,
                    gate_k: 1,
                },
                &|_, _| {},
            )
            .unwrap();
        // q, v and up of each of the two layers.
        assert_eq!(attached.layers, 6);
        let (logits, trace) = ev.forward_ids_routed(&ids, Some(Weighting::Token)).unwrap();
        let d = max_diff(
            &flat(&logits),
            &exp.floats(&format!("logits_{setting}")).unwrap(),
        );
        assert!(d < TOL, "{setting}: logits differ by {d}");
        // Layer 0's q_proj runs first.
        let d = max_diff(&trace[0], &exp.floats(&format!("coeff_{setting}")).unwrap());
        assert!(d < TOL, "{setting}: coefficients differ by {d}");
    }
}

#[test]
fn arrow_with_genknowsub_matches_peft() {
    let exp = Model::open(fixture("arrow/expected.safetensors")).unwrap();
    let ids = ids(&exp);
    let adapters: Vec<PathBuf> = (0..3)
        .map(|i| fixture(&format!("arrow/adapters/task{i}")))
        .collect();
    let general: Vec<PathBuf> = (0..2)
        .map(|i| fixture(&format!("arrow/adapters/general{i}")))
        .collect();
    let mut ev = Evaluator::open(&fixture("arrow/base"), None).unwrap();
    ev.attach(
        &experts(&adapters),
        &experts(&general),
        GateKind::Arrow {
            top_k: 2,
            temperature: 1.0,
        },
        Truncation {
            rank: None,
            gate_k: 1,
        },
        &|_, _| {},
    )
    .unwrap();
    let (logits, trace) = ev.forward_ids_routed(&ids, Some(Weighting::Token)).unwrap();
    let d = max_diff(&flat(&logits), &exp.floats("logits_gks_k2t1").unwrap());
    assert!(d < TOL, "logits differ by {d}");
    let d = max_diff(&trace[0], &exp.floats("coeff_gks_k2t1").unwrap());
    assert!(d < TOL, "coefficients differ by {d}");
    // Without the subtraction the result is another one.
    let d = max_diff(&flat(&logits), &exp.floats("logits_k2t1").unwrap());
    assert!(d > 1e-2, "{d}");
}

#[test]
fn arrow_refuses_dense_experts_and_mismatched_top_k() {
    let mut ev = Evaluator::open(&fixture("smile/base"), None).unwrap();
    let fts: Vec<PathBuf> = (0..3).map(|i| fixture(&format!("smile/ft{i}"))).collect();
    let trunc = Truncation {
        rank: Some(4),
        gate_k: 2,
    };
    let err = ev
        .attach(
            &experts(&fts),
            &[],
            GateKind::Arrow {
                top_k: 2,
                temperature: 1.0,
            },
            trunc,
            &|_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("Arrow routes LoRA adapters"), "{err}");
    let err = ev
        .attach(
            &experts(&fts),
            &[],
            GateKind::Smile {
                gate_k: 2,
                top_k: 4,
            },
            trunc,
            &|_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("--top-k 4 must be between 1 and the number of experts (3)"),
        "{err}"
    );
}

#[test]
fn experts_of_another_shape_are_refused_naming_the_tensor() {
    // The Llama adapters do not fit the BERT: no module matches, and the dense Llama is of
    // another architecture.
    let mut ev = Evaluator::open(&fixture("smile/base"), None).unwrap();
    let err = ev
        .attach(
            &[Expert {
                name: "llama".into(),
                source: Source::Model(fixture("arrow/base")),
            }],
            &[],
            GateKind::Sequence,
            Truncation {
                rank: None,
                gate_k: 1,
            },
            &|_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("embeddings.word_embeddings.weight"), "{err}");
}

#[test]
fn oracle_routing_of_a_library_equals_the_rebuilt_task_model() {
    // Rank `full`: the experts are the rebuilt tasks' exact deltas.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("library.yml");
    let p = |s: &str| fixture(s).display().to_string();
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ntasks:\n  - {{name: a, model: {}}}\n  - {{name: b, model: {}}}\n  - {{name: c, model: {}}}\nscheme: emr\n",
            p("smile/base"),
            p("smile/ft0"),
            p("smile/ft1"),
            // Another random BERT of the same shapes: every tensor differs, embeddings and
            // LayerNorms too, which sequence-level routing merges per input as well.
            p("../bert")
        ),
    )
    .unwrap();
    let lib = dir.path().join("lib");
    amalgam::library::build(&cfg, &lib, &Default::default(), &amalgam::progress::Silent).unwrap();
    let exp = Model::open(fixture("smile/expected.safetensors")).unwrap();
    let ids = ids(&exp);
    let mut ev = Evaluator::open(&fixture("smile/base"), None).unwrap();
    let attached = ev
        .attach(
            &Expert::from_arg(lib.to_str().unwrap()).unwrap(),
            &[],
            GateKind::Sequence,
            Truncation {
                rank: None,
                gate_k: 1,
            },
            &|_, _| {},
        )
        .unwrap();
    assert_eq!(attached.experts, ["a", "b", "c"]);
    for (t, task) in ["a", "b", "c"].iter().enumerate() {
        let mut w = vec![0f32; 3];
        w[t] = 1.0;
        let (routed, _) = ev
            .forward_ids_routed(&ids, Some(Weighting::Fixed(&w)))
            .unwrap();
        let rebuilt = Evaluator::open_library(&lib, task, None, None)
            .unwrap()
            .forward_ids(&ids)
            .unwrap();
        let d = max_diff(&flat(&routed), &flat(&rebuilt));
        assert!(
            d < TOL,
            "task {task}: oracle and rebuilt model differ by {d}"
        );
    }
}
