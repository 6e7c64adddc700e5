//! Task files: JSONL rows `{"text", "label"}` (classification) or `{"text"}` (language
//! modelling).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// What a task measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Rows carry integer labels; report accuracy.
    Classification,
    /// Rows carry only text; report per-token loss and perplexity.
    LanguageModelling,
}

/// A loaded task.
#[derive(Debug)]
pub struct Task {
    /// The file.
    pub path: PathBuf,
    /// The file name without `.jsonl` / `.test.jsonl`.
    pub name: String,
    /// Classification or language modelling.
    pub kind: Kind,
    /// The texts.
    pub texts: Vec<String>,
    /// The labels (classification only), as many as texts.
    pub labels: Vec<usize>,
    /// The 1-based line of each row, for errors.
    pub lines: Vec<usize>,
}

/// The task name of a file: its name without `.test.jsonl` or `.jsonl`.
pub fn task_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in [".test.jsonl", ".jsonl"] {
        if let Some(stem) = file.strip_suffix(suffix) {
            return stem.to_string();
        }
    }
    file
}

impl Task {
    /// Read `path`; with `limit`, only the first `limit` rows. Blank lines are skipped. Every
    /// row must have a string `text`; either every row has a non-negative integer `label` or
    /// none has.
    pub fn load(path: &Path, limit: Option<usize>) -> Result<Task> {
        let err = |line: usize, reason: String| Error::Task {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| err(0, format!("cannot read: {e}")))?;
        let mut task = Task {
            path: path.to_path_buf(),
            name: task_name(path),
            kind: Kind::LanguageModelling,
            texts: Vec::new(),
            labels: Vec::new(),
            lines: Vec::new(),
        };
        let mut labelled = None;
        for (i, line) in text.lines().enumerate() {
            if limit.is_some_and(|l| task.texts.len() >= l) {
                break;
            }
            let n = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            let row: Value = serde_json::from_str(line)
                .map_err(|e| err(n, format!("not a JSON object: {e}")))?;
            let Some(obj) = row.as_object() else {
                return Err(err(
                    n,
                    format!("expected an object with \"text\", found {row}"),
                ));
            };
            let text = match obj.get("text") {
                Some(Value::String(s)) => s.clone(),
                Some(v) => return Err(err(n, format!("\"text\" is {v}, expected a string"))),
                None => return Err(err(n, "no \"text\" field".into())),
            };
            let label =
                match obj.get("label") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_u64().ok_or_else(|| {
                        err(n, format!("\"label\" is {v}, expected an integer ≥ 0"))
                    })? as usize),
                };
            match (labelled, label) {
                (None, _) => labelled = Some(label.is_some()),
                (Some(true), None) => {
                    return Err(err(n, "no \"label\", but earlier rows have one".into()));
                }
                (Some(false), Some(_)) => {
                    return Err(err(n, "has a \"label\", but earlier rows have none".into()));
                }
                _ => {}
            }
            task.texts.push(text);
            task.labels.extend(label);
            task.lines.push(n);
        }
        if task.texts.is_empty() {
            return Err(err(
                0,
                "no rows; a task needs at least one {\"text\": ...} row".into(),
            ));
        }
        if labelled == Some(true) {
            task.kind = Kind::Classification;
        }
        Ok(task)
    }
}
