//! Resource limits on what one sample may make a reader hold in memory.
//!
//! A shard is untrusted input: a tar header can announce a 50 GB member, a gzip member can inflate a
//! thousandfold, a `.json` member can nest ten thousand arrays deep. Readers check the sizes a header
//! announces **before** allocating, bound every decompression by the limit of the member's role, and measure a
//! JSON document's nesting with a byte scan before handing it to `serde_json`. A sample that breaks a limit is
//! dropped with a reason naming the member, the size and the limit; it is never truncated silently, and the
//! shard goes on with its next sample (skipping a member's data reads nothing into memory).
//!
//! | limit | default | broken → |
//! |---|---|---|
//! | [`ReadLimits::max_member_bytes`]: any member read into memory (the image) | 256 MiB | `member_too_large` |
//! | [`ReadLimits::max_caption_bytes`]: the caption (`.txt`, a folder's `caption`) | 64 KiB | `member_too_large` |
//! | [`ReadLimits::max_meta_bytes`]: the metadata (`.json`) | 1 MiB | `member_too_large` |
//! | [`ReadLimits::max_json_depth`]: nesting of the metadata | 64 | `invalid_meta` |
//!
//! Image pixels are limited separately, at decode ([`crate::decode::DecodeConfig::max_pixels`]).

use serde::{Deserialize, Serialize};

/// Default of [`ReadLimits::max_member_bytes`]: 256 MiB, far above any training image, far below a machine.
pub const DEFAULT_MAX_MEMBER_BYTES: u64 = 256 << 20;
/// Default of [`ReadLimits::max_caption_bytes`]: 64 KiB (a CLIP caption is 77 tokens, a few hundred bytes).
pub const DEFAULT_MAX_CAPTION_BYTES: u64 = 64 << 10;
/// Default of [`ReadLimits::max_meta_bytes`]: 1 MiB.
pub const DEFAULT_MAX_META_BYTES: u64 = 1 << 20;
/// Default of [`ReadLimits::max_json_depth`]: 64 nested arrays or objects (`serde_json` stops at 128).
pub const DEFAULT_MAX_JSON_DEPTH: usize = 64;

/// Per-sample resource limits of the readers (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReadLimits {
    /// Largest member (after gzip decompression) read into memory: the image, and the bound of every other
    /// member. Default [`DEFAULT_MAX_MEMBER_BYTES`].
    pub max_member_bytes: u64,
    /// Largest caption in bytes. Default [`DEFAULT_MAX_CAPTION_BYTES`].
    pub max_caption_bytes: u64,
    /// Largest metadata document in bytes. Default [`DEFAULT_MAX_META_BYTES`].
    pub max_meta_bytes: u64,
    /// Deepest nesting of arrays and objects in a metadata document. Default [`DEFAULT_MAX_JSON_DEPTH`].
    pub max_json_depth: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_member_bytes: DEFAULT_MAX_MEMBER_BYTES,
            max_caption_bytes: DEFAULT_MAX_CAPTION_BYTES,
            max_meta_bytes: DEFAULT_MAX_META_BYTES,
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
        }
    }
}

/// What a member is to its sample, for the limit that applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The image.
    Image,
    /// The caption.
    Caption,
    /// The metadata.
    Meta,
}

impl ReadLimits {
    /// Lists every problem with these limits; empty when they are valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, v) in [
            ("max_member_bytes", self.max_member_bytes),
            ("max_caption_bytes", self.max_caption_bytes),
            ("max_meta_bytes", self.max_meta_bytes),
            ("max_json_depth", self.max_json_depth as u64),
        ] {
            if v == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        problems
    }

    /// The byte limit of a member in `role`, and the option's name for messages. A caption or metadata limit
    /// above the member limit is capped by it.
    pub(crate) fn bytes(&self, role: Role) -> (u64, &'static str) {
        match role {
            Role::Image => (self.max_member_bytes, "max_member_bytes"),
            Role::Caption if self.max_caption_bytes <= self.max_member_bytes => {
                (self.max_caption_bytes, "max_caption_bytes")
            }
            Role::Meta if self.max_meta_bytes <= self.max_member_bytes => (self.max_meta_bytes, "max_meta_bytes"),
            Role::Caption | Role::Meta => (self.max_member_bytes, "max_member_bytes"),
        }
    }

    /// The message for a member of `size` bytes (`None`: unknown, it inflated past the limit) above the limit
    /// of `role`, or `None` when it fits. `what` names the member; it is only called for the message, so the
    /// common case (the member fits) allocates nothing.
    pub(crate) fn too_large(&self, role: Role, what: impl FnOnce() -> String, size: Option<u64>) -> Option<String> {
        let (limit, name) = self.bytes(role);
        match size {
            Some(n) if n <= limit => None,
            Some(n) => Some(format!("{} has {n} bytes, above the limit of {limit} ({name})", what())),
            None => Some(format!("{} decompresses to more than {limit} bytes ({name})", what())),
        }
    }

    /// Parses a metadata document: the size and nesting limits first, then `serde_json`. The error says which
    /// check failed.
    pub(crate) fn parse_meta(&self, bytes: &[u8]) -> Result<serde_json::Value, String> {
        let depth = json_depth(bytes);
        if depth > self.max_json_depth {
            return Err(format!(
                "JSON nests {depth} levels deep, above the limit of {} (max_json_depth)",
                self.max_json_depth
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))
    }
}

/// The deepest nesting of `[`/`{` in a JSON text, not counting brackets inside strings (escapes honoured).
/// Linear and allocation-free, so it can run before a parser that recurses; on malformed text it still returns
/// the depth the brackets reach, and the parser reports the syntax error.
pub(crate) fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_brackets_outside_strings() {
        assert_eq!(json_depth(b"1"), 0);
        assert_eq!(json_depth(b"{\"a\": [1, {\"b\": []}]}"), 4);
        assert_eq!(json_depth(br#"{"a": "[[[[{{{", "b": "\"[["}"#), 1);
        assert_eq!(json_depth(b"]]]][["), 2);
    }

    #[test]
    fn meta_limits_name_the_option() {
        let limits = ReadLimits { max_json_depth: 3, ..ReadLimits::default() };
        assert!(limits.parse_meta(b"[[[1]]]").is_ok());
        let err = limits.parse_meta(b"[[[[1]]]]").unwrap_err();
        assert!(err.contains("4 levels") && err.contains("max_json_depth"), "{err}");
        // Deeper than serde_json's own recursion limit: refused by the scan, never handed to the parser.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(ReadLimits::default().parse_meta(deep.as_bytes()).unwrap_err().contains("100000 levels"));
        assert!(limits.parse_meta(b"{oops").unwrap_err().starts_with("not valid JSON"));
    }

    #[test]
    fn byte_limits_per_role() {
        let limits =
            ReadLimits { max_member_bytes: 100, max_caption_bytes: 10, max_meta_bytes: 1000, max_json_depth: 1 };
        assert_eq!(limits.bytes(Role::Caption), (10, "max_caption_bytes"));
        // A metadata limit above the member limit is capped by it.
        assert_eq!(limits.bytes(Role::Meta), (100, "max_member_bytes"));
        assert_eq!(limits.too_large(Role::Image, || "m".into(), Some(100)), None);
        let msg = limits.too_large(Role::Caption, || "member `k.txt`".into(), Some(11)).unwrap();
        assert_eq!(msg, "member `k.txt` has 11 bytes, above the limit of 10 (max_caption_bytes)");
        assert!(limits.too_large(Role::Image, || "m".into(), None).unwrap().contains("more than 100 bytes"));
        assert_eq!(
            ReadLimits { max_json_depth: 0, ..limits }.validate(),
            vec!["max_json_depth must be greater than 0"]
        );
    }
}
