//! The safetensors container, read by hand before any tensor reaches burn: the 8-byte little-endian header
//! length, the JSON header, the data section. One reader for every model, so that a truncated or corrupt file
//! is described the same way whichever model it was meant for.
//!
//! [`split`] checks the framing (length prefix inside the file, header a JSON object) and [`TensorInfo::parse`]
//! one header entry (dtype, shape, data offsets, no overflow). [`check_f32_header`] is the strict check the
//! ImageNet classifiers share: exactly the tensors the model expects (names, shapes), `F32`, contiguous, and
//! [`load_strict`] their whole loading path around it; the ViT checks its own (its dtypes and optional tensors
//! differ), with the same pieces.

use std::collections::BTreeMap;

use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use serde_json::{Map, Value};

/// A safetensors file split into its parsed header and its data section.
#[derive(Debug)]
pub struct Container<'a> {
    /// Header entries by key, in file order (`__metadata__` included when present).
    pub header: Map<String, Value>,
    /// The bytes after the header; entry offsets index into it.
    pub data: &'a [u8],
    /// Offset of `data` in the file (8 + header length).
    pub data_start: usize,
}

/// Splits `bytes` into header and data. The error says what is wrong with the framing.
pub fn split(bytes: &[u8]) -> std::result::Result<Container<'_>, String> {
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(format!(
            "truncated or not a safetensors file: {} bytes, less than the 8-byte header length",
            bytes.len()
        ));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    let Some((header, data)) = usize::try_from(header_len).ok().and_then(|n| rest.split_at_checked(n)) else {
        return Err(format!(
            "truncated or not a safetensors file: the header claims {header_len} bytes of JSON but only {} follow",
            rest.len()
        ));
    };
    let header: Map<String, Value> =
        serde_json::from_slice(header).map_err(|e| format!("corrupt safetensors header (not a JSON object): {e}"))?;
    Ok(Container { header, data, data_start: bytes.len() - data.len() })
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// safetensors dtype name (`F32`, `F16`, `BF16`, ...).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// First byte in the data section.
    pub begin: usize,
    /// One past the last byte in the data section (`begin <= end`).
    pub end: usize,
}

impl TensorInfo {
    /// Parses one header entry; the error names the field that is missing or malformed.
    pub fn parse(entry: &Value) -> std::result::Result<Self, String> {
        let dims = |v: Option<&Value>| {
            v.and_then(Value::as_array).and_then(|a| {
                a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<_>>>()
            })
        };
        let dtype = entry.get("dtype").and_then(Value::as_str).ok_or("no dtype in the header")?.to_string();
        let shape = dims(entry.get("shape")).ok_or("no valid shape in the header")?;
        let offsets = dims(entry.get("data_offsets"))
            .filter(|o| o.len() == 2 && o[0] <= o[1])
            .ok_or("no valid data_offsets in the header")?;
        if shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)).is_none() {
            return Err(format!("shape {shape:?} overflows"));
        }
        Ok(Self { dtype, shape, begin: offsets[0], end: offsets[1] })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Bytes per element of a safetensors dtype, `None` for an unknown one.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Loads `bytes` into `model` strictly: [`check_f32_header`] against the tensors `model` expects, named in the
/// file as `file_key` maps its module paths (torchvision's names are the paths themselves; the EfficientNet-Lite
/// port prefixes module names with `_`), then burn-store's [`SafetensorsStore`] with PyTorch's conventions,
/// configured further by `store` (skip enum variants, key remapping). The error is the detail of an
/// [`crate::Error::Weights`], naming the tensor.
pub fn load_strict<M: ModuleSnapshot>(
    model: &mut M,
    bytes: Vec<u8>,
    name: &str,
    file_key: fn(&str) -> String,
    store: impl FnOnce(SafetensorsStore) -> SafetensorsStore,
) -> std::result::Result<(), String> {
    let expected: BTreeMap<String, Vec<usize>> = model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|t| (file_key(&t.name), t.shape.to_vec()))
        .collect();
    check_f32_header(&bytes, &expected, name)?;
    let mut store = store(SafetensorsStore::from_bytes(Some(bytes)))
        .with_from_adapter(PyTorchToBurnAdapter)
        .validate(true)
        .allow_partial(false);
    let result = model.load_from(&mut store).map_err(|e| format!("loading failed: {e}"))?;
    // The header check makes these unreachable; kept so that a divergence can never load silently.
    if let Some(e) = result.errors.first() {
        return Err(e.to_string());
    }
    if let Some((path, _)) = result.missing.first() {
        return Err(format!("missing tensor `{}`", file_key(path)));
    }
    if let Some(key) = result.unused.first() {
        return Err(format!("unexpected tensor `{key}` (not used by {name})"));
    }
    Ok(())
}

/// At most this many problems are listed in one error.
const MAX_PROBLEMS: usize = 12;

/// Checks a safetensors container of `model`'s weights's header (8-byte little-endian length, then JSON) against the expected tensor
/// names and shapes: every tensor present once, no other, shapes equal, dtype `F32`, byte ranges consistent with the
/// shapes, contiguous and inside the file. Returns a description of every problem found.
pub fn check_f32_header(
    bytes: &[u8],
    expected: &BTreeMap<String, Vec<usize>>,
    model: &str,
) -> std::result::Result<(), String> {
    let Container { header: entries, data, .. } = split(bytes)?;
    let data_len = data.len();

    let mut problems = Vec::new();
    let mut ranges = Vec::new();
    for name in expected.keys().filter(|name| !entries.contains_key(*name)) {
        problems.push(format!("missing tensor `{name}` (expected shape {:?})", expected[name]));
    }
    for (name, entry) in entries.iter().filter(|(name, _)| name.as_str() != "__metadata__") {
        let (dtype, shape, begin, end) = match TensorInfo::parse(entry) {
            Ok(t) => (t.dtype, t.shape, t.begin, t.end),
            Err(e) => {
                problems.push(format!("tensor `{name}`: corrupt header entry {entry} ({e})"));
                continue;
            }
        };
        match expected.get(name) {
            None => problems.push(format!("unexpected tensor `{name}` ({dtype} {shape:?}): not used by {model}")),
            Some(want) if *want != shape => {
                problems.push(format!("tensor `{name}` has shape {shape:?}, expected {want:?}"))
            }
            Some(_) => {}
        }
        if dtype != "F32" {
            problems.push(format!("tensor `{name}` has dtype {dtype}, expected F32"));
        }
        if end < begin || end > data_len {
            problems.push(format!(
                "tensor `{name}` spans bytes {begin}..{end} but the data section has {data_len} bytes: the file is \
                 truncated or corrupt"
            ));
        } else if dtype == "F32" && shape.iter().product::<usize>().checked_mul(4) != Some(end - begin) {
            problems.push(format!(
                "tensor `{name}` has {} bytes of data, but F32 {shape:?} needs {}: corrupt header",
                end - begin,
                shape.iter().product::<usize>() * 4
            ));
        }
        ranges.push((begin, end, name.as_str()));
    }
    if problems.is_empty() {
        ranges.sort_unstable();
        let mut pos = 0;
        for (begin, end, name) in ranges {
            if begin != pos {
                problems.push(format!(
                    "tensor `{name}` starts at byte {begin} of the data section, expected {pos}: corrupt header \
                     (overlapping or gapped data)"
                ));
            }
            pos = end;
        }
        if problems.is_empty() && pos != data_len {
            problems.push(format!("{} unexplained trailing bytes after the last tensor", data_len - pos));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let more = problems.len().saturating_sub(MAX_PROBLEMS);
    problems.truncate(MAX_PROBLEMS);
    let mut detail = problems.join("; ");
    if more > 0 {
        detail.push_str(&format!("; ... and {more} more problems"));
    }
    Err(detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(header: &Value, data: &[u8]) -> Vec<u8> {
        let h = serde_json::to_vec(header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        out
    }

    #[test]
    fn splits_header_and_data() {
        let bytes = file(&json!({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), &[0; 8]);
        let c = split(&bytes).unwrap();
        assert_eq!((c.data.len(), c.data_start), (8, bytes.len() - 8));
        let info = TensorInfo::parse(&c.header["w"]).unwrap();
        assert_eq!(info, TensorInfo { dtype: "F32".into(), shape: vec![2], begin: 0, end: 8 });
        assert_eq!(info.numel() * dtype_size(&info.dtype).unwrap(), 8);
    }

    #[test]
    fn bad_framing_and_entries_are_described() {
        assert!(split(&[1, 2, 3]).unwrap_err().contains("less than the 8-byte header length"));
        let mut long = 1000u64.to_le_bytes().to_vec();
        long.extend(b"{}");
        assert!(split(&long).unwrap_err().contains("claims 1000 bytes of JSON but only 2 follow"));
        let mut not_json = 2u64.to_le_bytes().to_vec();
        not_json.extend(b"[]");
        assert!(split(&not_json).unwrap_err().contains("corrupt safetensors header"));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend(b"{}");
        assert!(split(&huge).unwrap_err().contains("truncated"));
        for (entry, want) in [
            (json!({"shape": [1], "data_offsets": [0, 4]}), "no dtype"),
            (json!({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}), "no valid shape"),
            (json!({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}), "no valid data_offsets"),
            (json!({"dtype": "F32", "shape": [u64::MAX, 4], "data_offsets": [0, 4]}), "overflows"),
        ] {
            assert!(TensorInfo::parse(&entry).unwrap_err().contains(want), "{entry}");
        }
    }
}
