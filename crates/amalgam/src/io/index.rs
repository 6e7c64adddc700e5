//! Parsing of `model.safetensors.index.json`: which shard file holds which tensor. Pure over
//! bytes (the fuzz target drives it); the model reader checks it against the shards.

use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};

use crate::error::{Error, Result};

/// A parsed shard index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardIndex {
    /// `(tensor, shard file)` in file order; names are unique.
    pub weight_map: Vec<(String, String)>,
    /// Distinct shard files in order of first mention.
    pub files: Vec<String>,
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: OrderedMap,
}

/// A JSON object read in order, duplicates kept so they can be reported.
struct OrderedMap(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for OrderedMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping tensor names to shard file names")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<OrderedMap, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = m.next_entry::<String, String>()? {
                    out.push(e);
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parse and check an index file's contents: JSON of the right shape, no tensor listed twice,
/// every shard a plain file name inside the model directory. `path` is used in errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<ShardIndex> {
    let parsed: IndexFile = serde_json::from_slice(bytes)
        .map_err(|e| Error::index(path, format!("not a valid index: {e}")))?;
    let mut seen = std::collections::HashSet::new();
    let mut files: Vec<String> = Vec::new();
    for (name, file) in &parsed.weight_map.0 {
        if !is_plain_file_name(file) {
            return Err(Error::index(
                path,
                format!(
                    "shard file name '{file}' is not a plain file name inside the model directory"
                ),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(Error::index(
                path,
                format!("tensor '{name}' appears twice in weight_map"),
            ));
        }
        if !files.contains(file) {
            files.push(file.clone());
        }
    }
    Ok(ShardIndex {
        weight_map: parsed.weight_map.0,
        files,
    })
}

/// A name that, joined to the model directory, stays a file in it. Checked on the string, not
/// on `Path::components`, which normalises `a/` and `a/.` to `a` (found by the fuzzer).
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        parse(Path::new("i.json"), json.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_in_order() {
        let i = parse(
            Path::new("i"),
            br#"{"metadata":{"total_size":1},"weight_map":{"b":"s2","a":"s1","c":"s2"}}"#,
        )
        .unwrap();
        assert_eq!(i.files, ["s2", "s1"]);
        assert_eq!(i.weight_map[1], ("a".into(), "s1".into()));
    }

    #[test]
    fn trailing_separator_is_not_a_plain_file_name() {
        // Fuzzer find: `Path::components` drops a trailing `/` or `/.`, so these passed as plain.
        for bad in ["model.safetensors/", "model.safetensors/."] {
            let e = err(&format!(r#"{{"weight_map":{{"a":"{bad}"}}}}"#));
            assert!(e.contains("not a plain file name"), "{bad}: {e}");
        }
    }

    #[test]
    fn rejects_bad_indexes() {
        assert!(err("{}").contains("weight_map"));
        assert!(err(r#"{"weight_map":{"a":1}}"#).contains("not a valid index"));
        assert!(err(r#"{"weight_map":{"a":"x","a":"y"}}"#).contains("'a' appears twice"));
        for bad in ["../x", "/etc/passwd", "a/b", "", ".", ".."] {
            let e = err(&format!(r#"{{"weight_map":{{"a":"{bad}"}}}}"#));
            assert!(e.contains("not a plain file name"), "{bad}: {e}");
        }
    }
}
