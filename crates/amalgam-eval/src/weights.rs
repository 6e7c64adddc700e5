//! Tensors of a model folder as candle tensors, read through amalgam's validated,
//! memory-mapped safetensors reader (single files and sharded indexes alike) and decoded to f32;
//! or the tensors of one task of a task library, rebuilt from the base in memory as `library
//! rebuild` would write them (rounded to the library's output dtype).

use std::collections::HashMap;
use std::path::Path;

use amalgam::io::Model;
use amalgam::library::{Library, TaskModule};
use candle_core::{Device, Tensor, Var};

use crate::error::{Error, Result};

/// A library task: the library, the task's module, and where each tensor is listed.
struct LibraryTask {
    library: Library,
    task: TaskModule,
    index: HashMap<String, usize>,
}

/// A model's tensors under a name prefix.
pub struct Weights {
    /// The model, or a library task's base (whose folder gives config and tokenizer).
    model: Model,
    library: Option<LibraryTask>,
    prefix: String,
    device: Device,
    single_pass: bool,
    /// When set, every tensor loaded is a candle `Var` (a leaf that backward passes give a
    /// gradient), recorded here by name; a tensor loaded twice (a tied head) is one `Var`.
    vars: Option<std::cell::RefCell<Vec<(String, Var)>>>,
}

impl Weights {
    /// Open the model at `path` (a folder, a `.safetensors` file or an index).
    pub fn open(path: &Path) -> Result<Weights> {
        Ok(Weights {
            model: Model::open(path)?,
            library: None,
            prefix: String::new(),
            device: Device::Cpu,
            single_pass: false,
            vars: None,
        })
    }

    /// Task `task` of the library at `lib`, rebuilt tensor by tensor as it is loaded from
    /// `base` (default: the base the library was built from), checked as `library rebuild`
    /// checks it.
    pub fn library(lib: &Path, task: &str, base: Option<&Path>) -> Result<Weights> {
        let library = Library::open(lib)?;
        let module = library.task(task)?;
        let model = library.base(base)?;
        let index = library
            .manifest
            .base
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Weights {
            model,
            library: Some(LibraryTask {
                library,
                task: module,
                index,
            }),
            prefix: String::new(),
            device: Device::Cpu,
            single_pass: false,
            vars: None,
        })
    }

    /// Mark the tensors loaded from here as used for a single forward pass (layer-by-layer
    /// passes): layers then keep them in their stored layout instead of a copy laid out for
    /// repeated multiplication.
    pub fn set_single_pass(&mut self, on: bool) {
        self.single_pass = on;
    }

    /// Load every tensor from here on as a `Var`, for gradients ([`take_vars`](Self::take_vars)).
    pub fn set_trainable(&mut self) {
        self.vars = Some(Default::default());
    }

    /// The `Var`s loaded since [`set_trainable`](Self::set_trainable), by stored name, in load
    /// order.
    pub fn take_vars(&mut self) -> Vec<(String, Var)> {
        self.vars.take().map(|v| v.into_inner()).unwrap_or_default()
    }

    /// See [`set_single_pass`](Self::set_single_pass). A trainable model's layers too keep the
    /// tensors as loaded: a copy laid out otherwise would not follow `Var::set`.
    pub fn single_pass(&self) -> bool {
        self.single_pass || self.vars.is_some()
    }

    /// The underlying model (a library task's base).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The name prefix chosen by [`select_prefix`](Self::select_prefix) (`""`, `"bert."`, ...).
    pub fn prefix(&self) -> &str {
        &self.prefix
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
        self.contains_absolute(&format!("{}{name}", self.prefix))
    }

    /// Whether tensor `name` (no prefix) exists: in the model, or for a library task in the
    /// library (which may store a head its tied base does not have).
    pub fn contains_absolute(&self, name: &str) -> bool {
        match &self.library {
            Some(lib) => lib.index.contains_key(name),
            None => self.model.contains(name),
        }
    }

    /// The tensor `name` (under the prefix) as f32, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_absolute(&format!("{}{name}", self.prefix), shape)
    }

    /// The tensor `name` (no prefix) as f32, checked to have `shape`.
    pub fn get_absolute(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        // A library task's tensors are the library's (its base may tie a head the task stores).
        let (dtype, found) = match &self.library {
            Some(lib) => {
                let t = lib
                    .index
                    .get(name)
                    .map(|&i| &lib.library.manifest.base.tensors[i])
                    .ok_or_else(|| amalgam::Error::MissingTensor {
                        path: self.model.path.clone(),
                        name: name.to_string(),
                    })?;
                (t.dtype, t.shape.clone())
            }
            None => {
                let entry = self.model.entry(name)?;
                (entry.dtype, entry.shape.clone())
            }
        };
        if found != shape {
            return Err(Error::Shape {
                path: self.model.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        if !dtype.is_float() {
            return Err(amalgam::Error::argument(
                format!("{}: tensor {name}", self.model.path.display()),
                format!(
                    "has dtype {:?}; evaluation needs floating-point weights",
                    dtype
                ),
            )
            .into());
        }
        let values = match &self.library {
            Some(lib) => rebuilt(lib, &self.model, name)?,
            None => self.model.floats(name)?,
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(amalgam::Error::argument(
                format!("{}: tensor {name}", self.model.path.display()),
                format!("element {i} is {}; the model is corrupt", values[i]),
            )
            .into());
        }
        self.model.release(name);
        let t = Tensor::from_vec(values, shape, &self.device)?;
        let Some(vars) = &self.vars else {
            return Ok(t);
        };
        let mut vars = vars.borrow_mut();
        if let Some((_, v)) = vars.iter().find(|(n, _)| n == name) {
            return Ok(v.as_tensor().clone());
        }
        let v = Var::from_tensor(&t)?;
        let out = v.as_tensor().clone();
        vars.push((name.to_string(), v));
        Ok(out)
    }

    /// Rows `ids` of the 2-D tensor `name` (under the prefix), checked to have `shape`, as f32
    /// `[ids.len(), shape[1]]`: only those rows are read (an embedding table is the largest
    /// tensor of a small model; a few prompts need a few of its rows).
    pub fn rows(&self, name: &str, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        if self.library.is_some() {
            let t = self.get_absolute(&full, shape)?;
            let idx = Tensor::from_vec(ids.to_vec(), ids.len(), &self.device)?;
            return Ok(t.index_select(&idx, 0)?);
        }
        let entry = self.model.entry(&full)?;
        if entry.shape != shape || shape.len() != 2 {
            return Err(Error::Shape {
                path: self.model.path.clone(),
                name: full,
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        if !entry.dtype.is_float() {
            return Err(amalgam::Error::argument(
                format!("{}: tensor {full}", self.model.path.display()),
                format!(
                    "has dtype {:?}; evaluation needs floating-point weights",
                    entry.dtype
                ),
            )
            .into());
        }
        let width = shape[1];
        let row_bytes = width * entry.dtype.size();
        let mut raw = vec![0u8; row_bytes];
        let mut values = Vec::with_capacity(ids.len() * width);
        for &id in ids {
            let id = id as usize;
            if id >= shape[0] {
                return Err(amalgam::Error::argument(
                    format!("{}: tensor {full}", self.model.path.display()),
                    format!("token id {id} is past its {} rows", shape[0]),
                )
                .into());
            }
            self.model
                .read_at(entry.shard, entry.range.start + id * row_bytes, &mut raw)?;
            let start = values.len();
            amalgam::dtype::decode_f32_append(entry.dtype, &raw, &mut values);
            if let Some(i) = values[start..].iter().position(|v| !v.is_finite()) {
                return Err(amalgam::Error::argument(
                    format!("{}: tensor {full}", self.model.path.display()),
                    format!("row {id} element {i} is not finite; the model is corrupt"),
                )
                .into());
            }
        }
        Ok(Tensor::from_vec(values, (ids.len(), width), &self.device)?)
    }
}

/// Tensor `name` of a library task, rebuilt and rounded to the dtype `rebuild` writes.
fn rebuilt(lib: &LibraryTask, base: &Model, name: &str) -> Result<Vec<f32>> {
    let i = lib.index[name];
    let dtype = lib.library.out_dtype(i, None);
    let values = std::cell::RefCell::new(Vec::new());
    let mut bytes = Vec::new();
    let widen = |raw: &[u8]| {
        let mut back = Vec::new();
        amalgam::dtype::decode_f32(dtype, raw, &mut back);
        values.borrow_mut().extend_from_slice(&back);
    };
    lib.library.rebuild_tensor(
        &lib.task,
        base,
        i,
        0,
        &mut |_, chunk| {
            amalgam::dtype::encode_f32(dtype, chunk, &mut bytes);
            widen(&bytes);
            Ok(())
        },
        &mut |raw| {
            widen(raw);
            Ok(())
        },
    )?;
    let values = values.into_inner();
    Ok(values)
}
