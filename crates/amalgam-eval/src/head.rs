//! Linear classification heads: a safetensors file with `weight` `[classes, hidden]` and `bias`
//! `[classes]` (or one `*.weight` / `*.bias` pair, as task wrappers name them).

use std::path::{Path, PathBuf};

use amalgam::io::Model;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::Linear;
use crate::task::{Kind, Task};

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

/// The head of each of `tasks` (`None` for language modelling), checked against an encoder of
/// width `hidden` (`None`: a decoder): `given` is one head file per classification task, in
/// order, or one folder of `NAME.safetensors` heads.
pub fn heads_for(
    tasks: &[Task],
    given: &[PathBuf],
    hidden: Option<usize>,
) -> Result<Vec<Option<Head>>> {
    let classification: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.kind == Kind::Classification)
        .collect();
    if classification.is_empty() {
        if !given.is_empty() {
            return Err(Error::Argument(
                "--head given, but no task has labels (language-modelling tasks need no head)"
                    .into(),
            ));
        }
        return Ok(tasks.iter().map(|_| None).collect());
    }
    let Some(hidden) = hidden else {
        return Err(Error::Argument(format!(
            "{} has labels, which asks for classification with a head, but the model is a \
             decoder LM; classification needs an encoder (BERT family)",
            classification[0].path.display()
        )));
    };
    let dir = match given {
        [one] if one.is_dir() => Some(one.as_path()),
        _ => None,
    };
    if dir.is_none() && given.len() != classification.len() {
        return Err(Error::Argument(format!(
            "{} classification task(s) but {} --head file(s): give one head per labelled task, \
             in order, or one folder of NAME.safetensors heads",
            classification.len(),
            given.len()
        )));
    }
    let mut files = given.iter();
    tasks
        .iter()
        .map(|t| {
            if t.kind != Kind::Classification {
                return Ok(None);
            }
            let path = match dir {
                Some(d) => head_in(d, &t.name)?,
                None => files.next().expect("counted above").clone(),
            };
            Ok(Some(Head::load(&path, hidden)?))
        })
        .collect()
}

fn head_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.safetensors"));
    if !path.is_file() {
        return Err(Error::Argument(format!(
            "{}: no head for task {name} (expected {})",
            dir.display(),
            path.display()
        )));
    }
    Ok(path)
}
