//! Linear classification heads: a safetensors file with `weight` `[classes, hidden]` and `bias`
//! `[classes]` (or one `*.weight` / `*.bias` pair, as task wrappers name them).

use std::path::{Path, PathBuf};

use amalgam::io::Model;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::Linear;

/// A loaded head.
pub struct Head {
    /// The file.
    pub path: PathBuf,
    /// Number of classes.
    pub classes: usize,
    linear: Linear,
}

impl Head {
    /// Load `path` for an encoder of width `hidden`.
    pub fn load(path: &Path, hidden: usize) -> Result<Head> {
        let err = |reason: String| Error::Head {
            path: path.to_path_buf(),
            reason,
        };
        if !path.is_file() {
            return Err(err(
                "not found (a head is a .safetensors file with weight and bias)".into(),
            ));
        }
        let model = Model::open(path)?;
        let pick = |exact: &str| -> Result<String> {
            if model.contains(exact) {
                return Ok(exact.to_string());
            }
            let suffix = format!(".{exact}");
            let found: Vec<&str> = model
                .tensors()
                .iter()
                .map(|t| t.name.as_str())
                .filter(|n| n.ends_with(&suffix))
                .collect();
            match found.as_slice() {
                [one] => Ok(one.to_string()),
                [] => Err(err(format!(
                    "no tensor named {exact:?} or ending in {suffix:?}"
                ))),
                many => Err(err(format!(
                    "several candidates for the head's {exact}: {many:?}"
                ))),
            }
        };
        let (wname, bname) = (pick("weight")?, pick("bias")?);
        let w = model.entry(&wname)?;
        let b = model.entry(&bname)?;
        let [classes, width] = w.shape[..] else {
            return Err(err(format!(
                "{wname} has shape {:?}, expected [classes, hidden]",
                w.shape
            )));
        };
        if width != hidden {
            return Err(err(format!(
                "{wname} has shape {:?}: it expects {width}-wide inputs, but the model's hidden \
                 size is {hidden}; was this head trained on another model?",
                w.shape
            )));
        }
        if b.shape != [classes] {
            return Err(err(format!(
                "{bname} has shape {:?}, expected [{classes}]",
                b.shape
            )));
        }
        if classes == 0 || !w.dtype.is_float() || !b.dtype.is_float() {
            return Err(err("weight and bias must be non-empty float tensors".into()));
        }
        let weight = Tensor::from_vec(model.floats(&wname)?, (classes, width), &Device::Cpu)?;
        let bias = Tensor::from_vec(model.floats(&bname)?, classes, &Device::Cpu)?;
        Ok(Head {
            path: path.to_path_buf(),
            classes,
            linear: Linear::new(weight, Some(bias))?,
        })
    }

    /// Logits `[batch, classes]` for pooled embeddings `[batch, hidden]`.
    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        self.linear.forward(pooled)
    }
}
