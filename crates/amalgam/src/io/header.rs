//! Parsing and validation of a safetensors header, over borrowed bytes.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON mapping
//! tensor names to `{dtype, shape, data_offsets}` (plus an optional `__metadata__` string map),
//! then the data section. Nothing here trusts the file: every length is checked against the bytes
//! that exist, every offset against its neighbours, duplicate names are rejected (a plain JSON map
//! would silently keep the last), and all arithmetic on file-supplied numbers is checked.
//! This module does no I/O, so the fuzz target drives it directly.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Headers larger than this are refused: real ones are a few MB even for 100k-tensor models,
/// and a huge declared length is the cheapest way to make a reader allocate without bound.
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// One tensor's entry in a header, with offsets relative to the start of the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape; empty for a scalar.
    pub shape: Vec<usize>,
    /// First byte, relative to the data section.
    pub start: usize,
    /// One past the last byte, relative to the data section.
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of bytes of data.
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

/// A validated header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Tensors in the order the header lists them.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` map, if any.
    pub metadata: BTreeMap<String, String>,
    /// Absolute file offset where the data section starts (`8 + header length`).
    pub data_start: usize,
}

/// Parse and validate the header of the safetensors file whose full contents are `bytes`.
/// `path` is only used in error messages.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    let bad = |reason: String| Error::safetensors(path, reason);
    if bytes.len() < 8 {
        return Err(bad(format!(
            "file is {} bytes, shorter than the 8-byte header length; it is truncated or not safetensors",
            bytes.len()
        )));
    }
    let declared = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if declared > MAX_HEADER_LEN {
        return Err(bad(format!(
            "declared header length {declared} exceeds the {MAX_HEADER_LEN}-byte limit; the file is corrupt or not safetensors"
        )));
    }
    let header_len = declared as usize;
    let data_start = 8usize
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            bad(format!(
                "declared header length {header_len} runs past the end of the {}-byte file; the file is truncated",
                bytes.len()
            ))
        })?;
    let json = &bytes[8..data_start];
    let entries = parse_entries(json).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let data_len = bytes.len() - data_start;
    let (tensors, metadata) = validate_entries(entries, data_len).map_err(bad)?;
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

/// The raw top-level entries of a header, in order, duplicates kept so they can be reported.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object mapping tensor names to their entries")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_entries(json: &[u8]) -> serde_json::Result<Entries> {
    // Writers pad the header with trailing spaces to align the data section.
    let end = json
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |i| i + 1);
    serde_json::from_slice(&json[..end])
}

fn validate_entries(
    entries: Entries,
    data_len: usize,
) -> std::result::Result<(Vec<TensorInfo>, BTreeMap<String, String>), String> {
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    let mut metadata = BTreeMap::new();
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(format!("tensor '{name}' appears twice in the header"));
        }
        if name == "__metadata__" {
            metadata = parse_metadata(value)?;
            continue;
        }
        tensors.push(parse_tensor(name, value)?);
    }
    check_layout(&tensors, data_len)?;
    Ok((tensors, metadata))
}

fn parse_metadata(
    value: serde_json::Value,
) -> std::result::Result<BTreeMap<String, String>, String> {
    let serde_json::Value::Object(map) = value else {
        return Err("__metadata__ must be an object of strings".into());
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            other => Err(format!(
                "__metadata__ value for '{k}' must be a string, found {other}"
            )),
        })
        .collect()
}

fn parse_tensor(name: String, value: serde_json::Value) -> std::result::Result<TensorInfo, String> {
    let serde_json::Value::Object(map) = value else {
        return Err(format!("tensor '{name}': entry must be an object"));
    };
    if let Some(k) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(format!("tensor '{name}': unknown field '{k}'"));
    }
    let dtype = match map.get("dtype") {
        Some(serde_json::Value::String(s)) => DType::from_safetensors_name(s)
            .ok_or_else(|| format!("tensor '{name}': unknown dtype '{s}'"))?,
        _ => return Err(format!("tensor '{name}': missing or non-string 'dtype'")),
    };
    let shape = usize_list(&map, "shape").map_err(|e| format!("tensor '{name}': {e}"))?;
    let offsets = usize_list(&map, "data_offsets").map_err(|e| format!("tensor '{name}': {e}"))?;
    let [start, end] = offsets[..] else {
        return Err(format!(
            "tensor '{name}': data_offsets must have 2 entries, found {}",
            offsets.len()
        ));
    };
    if end < start {
        return Err(format!(
            "tensor '{name}': data_offsets [{start}, {end}] end before they start"
        ));
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor '{name}': shape {shape:?} overflows the address space"))?;
    if end - start != expected {
        return Err(format!(
            "tensor '{name}': data_offsets [{start}, {end}] span {} bytes but shape {shape:?} of {dtype} needs {expected}",
            end - start
        ));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

fn usize_list(
    map: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> std::result::Result<Vec<usize>, String> {
    let Some(serde_json::Value::Array(items)) = map.get(key) else {
        return Err(format!("missing or non-array '{key}'"));
    };
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| format!("'{key}' holds {v}, not a non-negative integer"))
        })
        .collect()
}

/// Offsets must tile the data section exactly: start at 0, no gaps, no overlaps, end at its end.
fn check_layout(tensors: &[TensorInfo], data_len: usize) -> std::result::Result<(), String> {
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| (t.start, t.end));
    let mut cursor = 0usize;
    for t in order {
        if t.start != cursor {
            let what = if t.start > cursor {
                "a gap"
            } else {
                "an overlap"
            };
            return Err(format!(
                "tensor '{}': data starts at byte {} but the previous tensor ends at {cursor} ({what} in the data section)",
                t.name, t.start
            ));
        }
        cursor = t.end;
    }
    if cursor != data_len {
        return Err(if cursor > data_len {
            format!(
                "tensors need {cursor} bytes of data but the file holds {data_len}; the file is truncated"
            )
        } else {
            format!(
                "the data section is {data_len} bytes but the tensors cover only {cursor}; trailing bytes are not allowed"
            )
        });
    }
    Ok(())
}

/// Serialize a header for the given tensors, in order, with contiguous offsets starting at 0.
/// The JSON is padded with spaces so that the data section starts 8-byte aligned.
/// Returns the full prefix: 8-byte length, then the JSON.
pub fn serialize<'a>(
    tensors: impl IntoIterator<Item = (&'a str, DType, &'a [usize], usize, usize)>,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("string map"),
        );
    }
    for (name, dtype, shape, start, end) in tensors {
        map.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype.safetensors_name(),
                "shape": shape,
                "data_offsets": [start, end],
            }),
        );
    }
    let mut json = serde_json::to_vec(&map).expect("header serializes");
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data_len));
        b
    }

    fn err(bytes: &[u8]) -> String {
        parse(Path::new("m.safetensors"), bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn valid_header_parses() {
        let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
        let h = parse(Path::new("x"), &file(json, 12)).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].name, "b");
        assert_eq!(h.metadata["format"], "pt");
        assert_eq!(h.data_start, 8 + json.len());
    }

    #[test]
    fn serialize_then_parse_round_trips() {
        let shapes = [vec![3usize, 2], vec![], vec![0, 5]];
        let specs = [
            ("w", DType::F16, &shapes[0][..], 0, 12),
            ("s", DType::F64, &shapes[1][..], 12, 20),
            ("e", DType::F32, &shapes[2][..], 20, 20),
        ];
        let mut bytes = serialize(specs, &BTreeMap::new());
        assert_eq!(bytes.len() % 8, 0);
        bytes.extend([0u8; 20]);
        let h = parse(Path::new("x"), &bytes).unwrap();
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w", "s", "e"]);
        assert_eq!(h.tensors[1].shape, Vec::<usize>::new());
    }

    #[test]
    fn rejects_short_file() {
        assert!(err(&[1, 2, 3]).contains("truncated"));
    }

    #[test]
    fn rejects_header_past_end() {
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(err(&b).contains("runs past the end"));
    }

    #[test]
    fn rejects_huge_header_length() {
        assert!(err(&u64::MAX.to_le_bytes()).contains("exceeds"));
    }

    #[test]
    fn rejects_non_json_and_wrong_shape() {
        assert!(err(&file("not json", 0)).contains("not valid JSON"));
        assert!(err(&file("[1,2]", 0)).contains("not valid JSON"));
        assert!(err(&file(r#"{"a":5}"#, 0)).contains("must be an object"));
        assert!(err(&file(r#"{"a":{"dtype":"F32","shape":[1]}}"#, 4)).contains("data_offsets"));
        assert!(
            err(&file(
                r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#,
                4
            ))
            .contains("unknown dtype 'Q4'")
        );
        assert!(
            err(&file(
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                4
            ))
            .contains("non-negative")
        );
        assert!(err(&file(r#"{"__metadata__":{"x":1}}"#, 0)).contains("must be a string"));
    }

    #[test]
    fn rejects_duplicate_names() {
        let json = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(err(&file(json, 8)).contains("'a' appears twice"));
    }

    #[test]
    fn rejects_length_mismatch() {
        let json = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let e = err(&file(json, 8));
        assert!(e.contains("tensor 'a'") && e.contains("needs 12"), "{e}");
    }

    #[test]
    fn rejects_gap_overlap_truncation_and_trailing_bytes() {
        let two = |a: [usize; 2], b: [usize; 2]| {
            format!(
                r#"{{"a":{{"dtype":"F32","shape":[1],"data_offsets":[{},{}]}},"b":{{"dtype":"F32","shape":[1],"data_offsets":[{},{}]}}}}"#,
                a[0], a[1], b[0], b[1]
            )
        };
        assert!(err(&file(&two([0, 4], [8, 12]), 12)).contains("gap"));
        assert!(err(&file(&two([0, 4], [2, 6]), 6)).contains("overlap"));
        assert!(err(&file(&two([0, 4], [4, 8]), 6)).contains("truncated"));
        assert!(err(&file(&two([0, 4], [4, 8]), 10)).contains("trailing"));
        assert!(err(&file(&two([4, 8], [8, 12]), 12)).contains("'a'"));
    }

    #[test]
    fn rejects_overflowing_shape() {
        let json = format!(
            r#"{{"a":{{"dtype":"F64","shape":[{},{}],"data_offsets":[0,8]}}}}"#,
            u64::MAX / 2,
            4
        );
        assert!(err(&file(&json, 8)).contains("overflows"));
    }
}
