//! The results file: JSON lines, a header naming the search, then one line per finished trial
//! (in the order trials finished). Written by the driver only, one whole line at a time and
//! synced, so a killed search loses at most the line it was writing; reopening it drops such a
//! torn last line and resumes.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// The first line: which search the file belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The format version.
    pub amalgam_search: u32,
    /// [`crate::SearchConfig::hash`].
    pub config: String,
    /// Values searched.
    pub dimension: usize,
    /// Candidates per generation.
    pub population: usize,
}

/// What one trial measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The weighted mean of the tasks' scores (accuracy; −perplexity for language modelling).
    pub objective: f64,
    /// Each task's `amalgam eval --json` line.
    pub tasks: Vec<Value>,
    /// Seconds merging.
    pub merge_seconds: f64,
    /// Seconds evaluating.
    pub eval_seconds: f64,
}

/// One line of the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The trial's number (generation × population + index).
    pub trial: usize,
    /// Its CMA-ES generation.
    pub generation: usize,
    /// The genotype.
    pub x: Vec<f64>,
    /// What it measured.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// An open results file, appended to.
pub struct Results {
    path: PathBuf,
    file: File,
}

impl Results {
    /// Open (or create) the results file at `path` for the search `header` describes; returns
    /// it with the trials it already holds. A file of another search is refused.
    pub fn open(path: &Path, header: &Header) -> Result<(Results, Vec<Record>, Option<String>)> {
        let at = |e: std::io::Error| Error::new(format!("{}: {e}", path.display()));
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(at)?;
        let mut records = Vec::new();
        let mut warning = None;
        let mut good_end = 0u64;
        let mut lines = Vec::new();
        {
            let mut reader = BufReader::new(&file);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = reader.read_until(b'\n', &mut buf).map_err(at)?;
                if n == 0 {
                    break;
                }
                lines.push((
                    buf.ends_with(b"\n"),
                    String::from_utf8_lossy(&buf).into_owned(),
                ));
            }
        }
        let count = lines.len();
        for (i, (whole, line)) in lines.into_iter().enumerate() {
            let last_torn = i + 1 == count && !whole;
            let bad = |what: &str| {
                Error::new(format!(
                    "{}: line {}: {what}; the file is not an amalgam search results file of this \
                     config — give another --results path",
                    path.display(),
                    i + 1
                ))
            };
            if i == 0 {
                match serde_json::from_str::<Header>(&line) {
                    Ok(h) if &h == header => {}
                    Ok(h) if h.config != header.config => {
                        return Err(Error::new(format!(
                            "{}: holds the trials of another search config (hash {}, this one's \
                             is {}); give another --results path, or the config it was made with",
                            path.display(),
                            h.config,
                            header.config
                        )));
                    }
                    Ok(_) => return Err(bad("its header's dimension or population differs")),
                    Err(_) if last_torn => break,
                    Err(e) => return Err(bad(&format!("not a header ({e})"))),
                }
            } else {
                match serde_json::from_str::<Record>(&line) {
                    Ok(r) => records.push(r),
                    Err(_) if last_torn => {
                        warning = Some(format!(
                            "{}: dropped a torn last line (a run killed while writing it); its \
                             trial runs again",
                            path.display()
                        ));
                        break;
                    }
                    Err(e) => return Err(bad(&format!("not a trial record ({e})"))),
                }
            }
            good_end += line.len() as u64;
        }
        file.set_len(good_end).map_err(at)?;
        file.seek(SeekFrom::End(0)).map_err(at)?;
        let mut results = Results {
            path: path.to_path_buf(),
            file,
        };
        if good_end == 0 {
            results.line(&serde_json::to_string(header).expect("json"))?;
        }
        Ok((results, records, warning))
    }

    fn line(&mut self, text: &str) -> Result<()> {
        let at = |e: std::io::Error| Error::new(format!("{}: {e}", self.path.display()));
        self.file
            .write_all(format!("{text}\n").as_bytes())
            .map_err(at)?;
        self.file.sync_data().map_err(at)
    }

    /// Append one trial.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        self.line(&serde_json::to_string(record).expect("json"))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            amalgam_search: 1,
            config: "abc".into(),
            dimension: 2,
            population: 4,
        }
    }

    fn record(trial: usize) -> Record {
        Record {
            trial,
            generation: 0,
            x: vec![0.1, 1.0 / 3.0],
            outcome: Outcome {
                objective: 0.5,
                tasks: vec![serde_json::json!({"name": "t", "accuracy": 0.5})],
                merge_seconds: 0.25,
                eval_seconds: 0.5,
            },
        }
    }

    #[test]
    fn records_round_trip_exactly_and_a_torn_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let (mut r, got, _) = Results::open(&path, &header()).unwrap();
        assert!(got.is_empty());
        r.append(&record(0)).unwrap();
        r.append(&record(1)).unwrap();
        drop(r);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"trial\": 2, \"gen").unwrap();
        drop(f);
        let (mut r, got, warning) = Results::open(&path, &header()).unwrap();
        assert_eq!(got, [record(0), record(1)]);
        assert!(warning.unwrap().contains("torn last line"));
        r.append(&record(2)).unwrap();
        let (_, got, warning) = Results::open(&path, &header()).unwrap();
        assert_eq!(got.len(), 3);
        assert!(warning.is_none());
    }

    #[test]
    fn another_searchs_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        Results::open(&path, &header()).unwrap();
        let mut other = header();
        other.config = "def".into();
        let e = Results::open(&path, &other).err().unwrap().to_string();
        assert!(e.contains("another search config (hash abc"), "{e}");
        std::fs::write(&path, "{\"x\": 1}\n").unwrap();
        let e = Results::open(&path, &header()).err().unwrap().to_string();
        assert!(e.contains("line 1: not a header"), "{e}");
    }
}
