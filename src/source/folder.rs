//! Folder source: a directory of images described by a captions JSONL file.
//!
//! Each non-empty JSONL line is an object with `"image"` (a path relative to the JSONL's directory) and optional
//! `"caption"` (string) and `"key"` (string). The key is `"key"` when present, else the image path without its
//! extension; the whole line object becomes the sample's `meta`. The entries are parsed once at resolve time
//! and split into virtual shards that share them through an `Arc`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::limits::{ReadLimits, Role};
use super::tar::is_image_ext;
use crate::error::{DropReason, Error, Result, SampleError};
use crate::sample::RawSample;

/// One line of a captions JSONL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderEntry {
    /// Sample key: the line's `"key"`, else the image path without its extension.
    pub key: String,
    /// Image path as written in the line (relative to the JSONL's directory).
    pub image: PathBuf,
    /// Caption, when the line has one.
    pub caption: Option<String>,
    /// The whole line object.
    pub meta: serde_json::Value,
    /// 1-based line number in the JSONL, for messages.
    pub line: usize,
}

/// A slice of a folder source: entries `range` of the captions JSONL at `jsonl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderShard {
    /// Path of the captions JSONL.
    pub jsonl: PathBuf,
    /// Directory image paths are relative to (the JSONL's directory).
    pub root: PathBuf,
    /// Every entry of the JSONL, shared by all of its virtual shards.
    pub entries: Arc<[FolderEntry]>,
    /// Entries of this shard.
    pub range: Range<usize>,
}

impl FolderShard {
    /// `"<jsonl path>[start..end]"`.
    pub fn name(&self) -> String {
        format!("{}[{}..{}]", self.jsonl.display(), self.range.start, self.range.end)
    }

    /// Number of samples in the shard.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether the shard has no samples.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// Parses a captions JSONL and splits it into shards of `shard_size` entries. Errors name `spec` and, for a bad
/// line, its line number.
pub(crate) fn load_folder(spec: &str, jsonl: &Path, shard_size: usize) -> Result<Vec<FolderShard>> {
    let spec_err = |detail: String| Error::ShardSpec { spec: spec.to_string(), detail };
    if shard_size == 0 {
        return Err(spec_err("folder shard size must be at least 1".into()));
    }
    let text =
        std::fs::read_to_string(jsonl).map_err(|e| spec_err(format!("cannot read `{}`: {e}", jsonl.display())))?;
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let at = |what: String| spec_err(format!("`{}` line {line}: {what}", jsonl.display()));
        let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| at(format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| at("not a JSON object".into()))?;
        let image = match obj.get("image") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(at("`image` is not a non-empty string".into())),
            None => return Err(at("missing `image`".into())),
        };
        let caption = match obj.get("caption") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(at("`caption` is not a string".into())),
        };
        let key = match obj.get("key") {
            None | Some(serde_json::Value::Null) => {
                let p = Path::new(&image);
                match p.extension() {
                    Some(_) => p.with_extension("").to_string_lossy().into_owned(),
                    None => image.clone(),
                }
            }
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => return Err(at("`key` is not a string".into())),
        };
        entries.push(FolderEntry { key, image: PathBuf::from(image), caption, meta: value, line });
    }
    let root = jsonl.parent().map(Path::to_path_buf).unwrap_or_default();
    let entries: Arc<[FolderEntry]> = entries.into();
    let shards = (0..entries.len())
        .step_by(shard_size)
        .map(|start| FolderShard {
            jsonl: jsonl.to_path_buf(),
            root: root.clone(),
            entries: Arc::clone(&entries),
            range: start..(start + shard_size).min(entries.len()),
        })
        .collect();
    Ok(shards)
}

/// Iterator over a folder shard's samples.
pub(crate) struct FolderReader {
    shard: FolderShard,
    name: String,
    next: usize,
    limits: ReadLimits,
}

impl FolderReader {
    /// Starts at entry `skip` of the shard; images and captions above `limits` drop their sample.
    pub(crate) fn new(shard: FolderShard, skip: usize, limits: ReadLimits) -> Self {
        let next = shard.range.start.saturating_add(skip).min(shard.range.end);
        let name = shard.name();
        Self { shard, name, next, limits }
    }

    fn read(&self, entry: &FolderEntry) -> Result<RawSample, SampleError> {
        let ext = entry.image.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        if !is_image_ext(&ext) {
            let detail = format!(
                "shard `{}` line {}: `{}` has no jpg/jpeg/png/webp extension",
                self.name,
                entry.line,
                entry.image.display()
            );
            return Err(SampleError::new(entry.key.clone(), DropReason::MissingImage, detail));
        }
        let path = self.shard.root.join(&entry.image);
        let at = || format!("shard `{}` line {}", self.name, entry.line);
        let too_large = |detail: String| SampleError::new(entry.key.clone(), DropReason::MemberTooLarge, detail);
        if let Some(caption) = &entry.caption {
            let size = caption.len() as u64;
            if let Some(d) = self.limits.too_large(Role::Caption, || "the caption".into(), Some(size)) {
                return Err(too_large(format!("{}: {d}", at())));
            }
        }
        let cannot_read = |e: std::io::Error| {
            let detail = format!("{}: cannot read `{}`: {e}", at(), path.display());
            SampleError::new(entry.key.clone(), DropReason::MissingImage, detail)
        };
        // The size on disk is checked before the file is read.
        let size = std::fs::metadata(&path).map_err(cannot_read)?.len();
        if let Some(d) = self.limits.too_large(Role::Image, || format!("image `{}`", path.display()), Some(size)) {
            return Err(too_large(format!("{}: {d}", at())));
        }
        let image = std::fs::read(&path).map_err(cannot_read)?;
        Ok(RawSample {
            key: entry.key.clone(),
            image: Bytes::from(image),
            image_ext: ext,
            caption: entry.caption.clone(),
            meta: Some(entry.meta.clone()),
        })
    }
}

impl Iterator for FolderReader {
    type Item = Result<RawSample, SampleError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.shard.range.end {
            return None;
        }
        let entries = Arc::clone(&self.shard.entries);
        let entry = entries.get(self.next)?;
        self.next += 1;
        Some(self.read(entry))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.shard.range.end - self.next;
        (n, Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("captions.jsonl");
        std::fs::write(
            &jsonl,
            "{\"image\": \"img/a.jpg\", \"caption\": \"A\"}\n\n{\"image\": \"b.PNG\", \"key\": \"kb\"}\n{\"image\": \"c.webp\"}\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("img")).unwrap();
        std::fs::write(dir.path().join("img/a.jpg"), b"AAA").unwrap();
        std::fs::write(dir.path().join("b.PNG"), b"BBB").unwrap();
        let shards = load_folder("spec", &jsonl, 2).unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0].range, 0..2);
        assert_eq!(shards[1].range, 2..3);
        assert_eq!(shards[0].entries[0].key, "img/a");
        assert_eq!(shards[0].entries[1].key, "kb");
        assert_eq!(shards[0].entries[1].line, 3);
        let items: Vec<_> = FolderReader::new(shards[0].clone(), 0, ReadLimits::default()).collect();
        let a = items[0].as_ref().unwrap();
        assert_eq!((&a.image[..], a.image_ext.as_str(), a.caption.as_deref()), (&b"AAA"[..], "jpg", Some("A")));
        assert_eq!(a.meta.as_ref().unwrap()["image"], "img/a.jpg");
        let b = items[1].as_ref().unwrap();
        assert_eq!((b.key.as_str(), b.image_ext.as_str(), b.caption.as_deref()), ("kb", "png", None));
        let items: Vec<_> = FolderReader::new(shards[1].clone(), 0, ReadLimits::default()).collect();
        let err = items[0].as_ref().unwrap_err();
        assert_eq!((err.key.as_str(), err.reason), ("c", DropReason::MissingImage));
        assert!(err.detail.contains("captions.jsonl[2..3]"), "{}", err.detail);
        assert_eq!(FolderReader::new(shards[0].clone(), 1, ReadLimits::default()).count(), 1);
        assert_eq!(FolderReader::new(shards[0].clone(), 5, ReadLimits::default()).count(), 0);
    }

    #[test]
    fn images_and_captions_above_their_limits_drop_their_sample() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("captions.jsonl");
        std::fs::write(
            &jsonl,
            "{\"image\": \"a.jpg\", \"caption\": \"short\"}\n{\"image\": \"big.jpg\"}\n\
             {\"image\": \"a.jpg\", \"key\": \"long\", \"caption\": \"far too long\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("a.jpg"), b"AAA").unwrap();
        std::fs::write(dir.path().join("big.jpg"), vec![0u8; 100]).unwrap();
        let shards = load_folder("spec", &jsonl, 10).unwrap();
        let limits = ReadLimits { max_member_bytes: 99, max_caption_bytes: 5, ..ReadLimits::default() };
        let items: Vec<_> = FolderReader::new(shards[0].clone(), 0, limits).collect();
        assert_eq!(items.len(), 3, "one item per entry");
        assert!(items[0].is_ok());
        let big = items[1].as_ref().unwrap_err();
        assert_eq!((big.key.as_str(), big.reason), ("big", DropReason::MemberTooLarge));
        assert!(big.detail.contains("100 bytes, above the limit of 99 (max_member_bytes)"), "{}", big.detail);
        let long = items[2].as_ref().unwrap_err();
        assert_eq!((long.key.as_str(), long.reason), ("long", DropReason::MemberTooLarge));
        assert!(long.detail.contains("line 3") && long.detail.contains("max_caption_bytes"), "{}", long.detail);
    }

    #[test]
    fn bad_line_names_line_number() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("c.jsonl");
        std::fs::write(&jsonl, "{\"image\": \"a.jpg\"}\n{\"caption\": \"x\"}\n").unwrap();
        let err = load_folder("spec", &jsonl, 10).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("missing `image`"), "{err}");
        std::fs::write(&jsonl, "{\"image\": \"a.jpg\"}\nnot json\n").unwrap();
        let err = load_folder("spec", &jsonl, 10).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("invalid JSON"), "{err}");
    }
}
