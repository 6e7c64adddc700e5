//! Tensors of a model folder as candle tensors, read through amalgam's validated,
//! memory-mapped safetensors reader (single files and sharded indexes alike) and decoded to f32.

use std::path::Path;

use amalgam::io::Model;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// A model's tensors under a name prefix.
pub struct Weights {
    model: Model,
    prefix: String,
    device: Device,
}

impl Weights {
    /// Open the model at `path` (a folder, a `.safetensors` file or an index).
    pub fn open(path: &Path) -> Result<Weights> {
        Ok(Weights {
            model: Model::open(path)?,
            prefix: String::new(),
            device: Device::Cpu,
        })
    }

    /// The underlying model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Use the first of `prefixes` under which `probe` exists (`"bert."`, `"model."`, `""`, ...),
    /// so checkpoints saved from task wrappers load too. Errors when none has it.
    pub fn select_prefix(&mut self, prefixes: &[&str], probe: &str) -> Result<()> {
        match prefixes
            .iter()
            .find(|p| self.model.contains(&format!("{p}{probe}")))
        {
            Some(p) => {
                self.prefix = p.to_string();
                Ok(())
            }
            None => Err(amalgam::Error::MissingTensor {
                path: self.model.path.clone(),
                name: format!("{}{probe}", prefixes[0]),
            }
            .into()),
        }
    }

    /// Whether `name` (under the prefix) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.model.contains(&format!("{}{name}", self.prefix))
    }

    /// The tensor `name` (under the prefix) as f32, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_absolute(&format!("{}{name}", self.prefix), shape)
    }

    /// The tensor `name` (no prefix) as f32, checked to have `shape`.
    pub fn get_absolute(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let entry = self.model.entry(name)?;
        if entry.shape != shape {
            return Err(Error::Shape {
                path: self.model.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        if !entry.dtype.is_float() {
            return Err(amalgam::Error::argument(
                format!("{}: tensor {name}", self.model.path.display()),
                format!(
                    "has dtype {:?}; evaluation needs floating-point weights",
                    entry.dtype
                ),
            )
            .into());
        }
        let values = self.model.floats(name)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(amalgam::Error::argument(
                format!("{}: tensor {name}", self.model.path.display()),
                format!("element {i} is {}; the model is corrupt", values[i]),
            )
            .into());
        }
        self.model.release(name);
        Ok(Tensor::from_vec(values, shape, &self.device)?)
    }
}
