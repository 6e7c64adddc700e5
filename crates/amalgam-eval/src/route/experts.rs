//! Experts for the routed layers, from what users hold: dense fine-tunes (or task library
//! tasks, rebuilt in memory) as truncated SVDs of their weight deltas against the shared model,
//! and LoRA adapters as their own factors.

use std::path::{Path, PathBuf};

use amalgam::linalg::{rows, thin_svd};
use amalgam::lora::Adapter;

use super::side::Factors;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// Where an expert comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A fine-tuned model folder of the shared model's architecture.
    Model(PathBuf),
    /// Task `task` of the task library at `lib`, rebuilt in memory.
    Library {
        /// The library.
        lib: PathBuf,
        /// The task.
        task: String,
    },
    /// A PEFT LoRA adapter of the shared model.
    Adapter(PathBuf),
}

/// A named expert.
#[derive(Clone, Debug)]
pub struct Expert {
    /// Its name: the task it serves (a task file `NAME.test.jsonl` is its own task).
    pub name: String,
    /// Where it comes from.
    pub source: Source,
}

impl Expert {
    /// The expert a path names: a library's task (`LIB:TASK`, or every task of a library), a
    /// PEFT adapter folder (it has `adapter_config.json`) or a model folder. Names are the
    /// library task names, or the folder names.
    pub fn from_arg(arg: &str) -> Result<Vec<Expert>> {
        let path = Path::new(arg);
        if path.join(amalgam::library::format::MANIFEST).is_file() {
            let manifest = amalgam::library::format::Manifest::load(path)?;
            return Ok(manifest
                .tasks
                .iter()
                .map(|t| Expert {
                    name: t.name.clone(),
                    source: Source::Library {
                        lib: path.to_path_buf(),
                        task: t.name.clone(),
                    },
                })
                .collect());
        }
        if let Some((lib, task)) = arg.rsplit_once(':') {
            let lib = Path::new(lib);
            if lib.join(amalgam::library::format::MANIFEST).is_file() {
                return Ok(vec![Expert {
                    name: task.to_string(),
                    source: Source::Library {
                        lib: lib.to_path_buf(),
                        task: task.to_string(),
                    },
                }]);
            }
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::Argument(format!("{arg}: not a folder")))?;
        if !path.is_dir() {
            return Err(Error::Argument(format!(
                "{arg}: no such folder (an expert is a model folder, a PEFT adapter folder, a \
                 task library, or LIB:TASK)"
            )));
        }
        let source = if path.join("adapter_config.json").is_file() {
            Source::Adapter(path.to_path_buf())
        } else {
            Source::Model(path.to_path_buf())
        };
        Ok(vec![Expert { name, source }])
    }

    /// Whether it is a LoRA adapter.
    pub fn is_adapter(&self) -> bool {
        matches!(self.source, Source::Adapter(_))
    }

    /// A short description for messages.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Model(p) | Source::Adapter(p) => p.display().to_string(),
            Source::Library { lib, task } => format!("{}:{task}", lib.display()),
        }
    }
}

/// An expert opened for reading its layers.
pub enum Opened {
    /// Dense weights (a model or a library task).
    Dense(Box<Weights>),
    /// A LoRA adapter.
    Adapter(Box<Adapter>),
}

impl Opened {
    /// Open `expert`; dense weights under the first of `prefixes` that holds `probe`.
    pub fn open(expert: &Expert, prefixes: &[&str], probe: &str) -> Result<Opened> {
        Ok(match &expert.source {
            Source::Model(p) => {
                let mut w = Weights::open(p)?;
                w.select_prefix(prefixes, probe)?;
                Opened::Dense(Box::new(w))
            }
            Source::Library { lib, task } => {
                let mut w = Weights::library(lib, task, None)?;
                w.select_prefix(prefixes, probe)?;
                Opened::Dense(Box::new(w))
            }
            Source::Adapter(p) => Opened::Adapter(Box::new(Adapter::open(p)?)),
        })
    }
}

/// A layer's delta as an expert: its factors and the right singular vectors a SMILE gate
/// projects on (`in × gate_k`, row-major; empty for adapters).
pub struct LayerExpert {
    /// The factors.
    pub factors: Factors,
    /// Top right singular vectors of the delta, `in × gate_k`.
    pub gate: Vec<f32>,
    /// Arrow's prototype: the top right singular vector of the delta (`in`).
    pub prototype: Vec<f32>,
}

/// What to keep of a dense delta.
#[derive(Clone, Copy, Debug)]
pub struct Truncation {
    /// Rank of the expert (`None`: full, the exact delta).
    pub rank: Option<usize>,
    /// Singular vectors in a SMILE gate.
    pub gate_k: usize,
}

/// The expert of the dense delta `dw` (`out × in`, row-major) with bias delta `db`: `None` when
/// both are zero (the expert leaves this layer as the shared model has it).
pub fn dense(
    dw: &[f32],
    db: Option<Vec<f32>>,
    (out, inp): (usize, usize),
    t: Truncation,
) -> std::result::Result<Option<LayerExpert>, String> {
    let db = db.filter(|b| b.iter().any(|&v| v != 0.0));
    if dw.iter().all(|&v| v == 0.0) && db.is_none() {
        return Ok(None);
    }
    let svd = thin_svd(rows(dw, out, inp))?;
    let full = svd.s.len();
    // Directions with no weight add nothing; a zero delta keeps one (zero) direction.
    let nonzero = svd.s.iter().take_while(|&&s| s > 0.0).count().max(1);
    let k = t.rank.unwrap_or(full).min(nonzero).max(1);
    let mut down = vec![0f32; inp * k];
    let mut up = vec![0f32; k * out];
    for j in 0..k {
        for i in 0..inp {
            down[i * k + j] = svd.v[(i, j)] * svd.s[j];
        }
        for o in 0..out {
            up[j * out + o] = svd.u[(o, j)];
        }
    }
    let g = t.gate_k.min(full);
    let mut gate = vec![0f32; inp * t.gate_k];
    for i in 0..inp {
        for j in 0..g {
            gate[i * t.gate_k + j] = svd.v[(i, j)];
        }
    }
    let prototype = (0..inp).map(|i| svd.v[(i, 0)]).collect();
    Ok(Some(LayerExpert {
        factors: Factors {
            down,
            up,
            rank: k,
            bias: db,
        },
        gate,
        prototype,
    }))
}

/// The expert of a LoRA module with factors `a` (`r × in`) and `b` (`out × r`), scaling `s`:
/// `down = Aᵀ`, `up = s·Bᵀ`; its prototype is the exact top right singular vector of `B·A`
/// (from the SVD of `Aᵀ = Uₐ Sₐ Vₐᵀ` and of the small `C = B Vₐ Sₐ = U_c S_c V_cᵀ`:
/// `B·A = U_c S_c (Uₐ V_c)ᵀ`).
pub fn lora(
    a: &[f32],
    b: &[f32],
    (out, inp, r): (usize, usize, usize),
    scaling: f32,
    bias: Option<Vec<f32>>,
) -> std::result::Result<LayerExpert, String> {
    let mut down = vec![0f32; inp * r];
    for j in 0..r {
        for i in 0..inp {
            down[i * r + j] = a[j * inp + i];
        }
    }
    let mut up = vec![0f32; r * out];
    for o in 0..out {
        for j in 0..r {
            up[j * out + o] = scaling * b[o * r + j];
        }
    }
    // Aᵀ is `in × r` = `down` before any scaling.
    let sa = thin_svd(rows(&down, inp, r))?;
    let ra = sa.s.len();
    let mut c = vec![0f32; out * ra];
    for o in 0..out {
        for j in 0..ra {
            let mut acc = 0f32;
            for l in 0..r {
                acc += b[o * r + l] * sa.v[(l, j)];
            }
            c[o * ra + j] = acc * sa.s[j];
        }
    }
    let sc = thin_svd(rows(&c, out, ra))?;
    let prototype = (0..inp)
        .map(|i| (0..ra).map(|j| sa.u[(i, j)] * sc.v[(j, 0)]).sum::<f32>())
        .collect();
    Ok(LayerExpert {
        factors: Factors {
            down,
            up,
            rank: r,
            bias,
        },
        gate: Vec::new(),
        prototype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x·down·up` for one input row.
    fn apply(f: &Factors, x: &[f32], out: usize) -> Vec<f32> {
        let inp = x.len();
        let h: Vec<f32> = (0..f.rank)
            .map(|j| (0..inp).map(|i| x[i] * f.down[i * f.rank + j]).sum())
            .collect();
        (0..out)
            .map(|o| (0..f.rank).map(|j| h[j] * f.up[j * out + o]).sum())
            .collect()
    }

    #[test]
    fn a_full_rank_dense_expert_is_the_delta() {
        let (out, inp) = (3, 4);
        let dw: Vec<f32> = (0..12).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.1).collect();
        let e = dense(
            &dw,
            None,
            (out, inp),
            Truncation {
                rank: None,
                gate_k: 2,
            },
        )
        .unwrap()
        .unwrap();
        let x = [0.3, -1.0, 0.5, 2.0];
        let got = apply(&e.factors, &x, out);
        for o in 0..out {
            let want: f32 = (0..inp).map(|i| dw[o * inp + i] * x[i]).sum();
            assert!((got[o] - want).abs() < 1e-5, "{o}: {} vs {want}", got[o]);
        }
        assert!(
            dense(
                &[0.0; 12],
                Some(vec![0.0; 3]),
                (out, inp),
                Truncation {
                    rank: None,
                    gate_k: 2
                }
            )
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn a_lora_prototype_is_the_top_right_singular_vector_of_ba() {
        let (out, inp, r) = (5, 6, 2);
        let a: Vec<f32> = (0..r * inp)
            .map(|i| ((i * 5 % 7) as f32 - 3.0) * 0.2)
            .collect();
        let b: Vec<f32> = (0..out * r)
            .map(|i| ((i * 3 % 4) as f32 - 1.5) * 0.3)
            .collect();
        let e = lora(&a, &b, (out, inp, r), 2.0, None).unwrap();
        let mut ba = vec![0f32; out * inp];
        for o in 0..out {
            for i in 0..inp {
                ba[o * inp + i] = (0..r).map(|l| b[o * r + l] * a[l * inp + i]).sum();
            }
        }
        let svd = thin_svd(rows(&ba, out, inp)).unwrap();
        let dot: f32 = (0..inp).map(|i| svd.v[(i, 0)] * e.prototype[i]).sum();
        assert!((dot.abs() - 1.0).abs() < 1e-5, "cosine {dot}");
        // The expert is s·B·A.
        let x = [1.0, 0.5, -0.5, 0.25, 2.0, -1.0];
        let got = apply(&e.factors, &x, out);
        for o in 0..out {
            let want: f32 = 2.0 * (0..inp).map(|i| ba[o * inp + i] * x[i]).sum::<f32>();
            assert!((got[o] - want).abs() < 1e-5);
        }
    }
}
