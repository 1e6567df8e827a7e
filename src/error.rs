//! The crate's one error type and the reasons a sample can be dropped.
//!
//! Two kinds of failure exist and they are kept apart on purpose:
//! - [`Error`]: something the caller must act on (bad configuration, unreadable weights, an I/O failure that
//!   stops a shard, or, with [`OnError::Fail`], a bad sample surfaced as an `Err` item).
//! - [`DropReason`]: why one sample did not make it into a batch. By default a bad sample never stops the
//!   stream: it is dropped and counted under its reason, so `read = emitted + dropped` always holds.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a sample was dropped instead of emitted.
///
/// The `as_str` names are stable: they appear in `--jsonl` records (`{"key", "dropped": "<reason>"}`) and in
/// the run summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The image bytes could not be decoded (corrupt or unsupported data, or a JPEG without its end marker).
    UndecodableImage,
    /// The image's header declares more pixels than the decode limit allows
    /// ([`crate::decode::DecodeConfig::max_pixels`]); it was not decoded.
    ImageTooLarge,
    /// The sample has no member with a `jpg`, `jpeg`, `png` or `webp` extension.
    MissingImage,
    /// A member is larger than its limit (image, caption or metadata bytes; see
    /// [`crate::source::ReadLimits`]); its data was not read.
    MemberTooLarge,
    /// The caption member is not valid UTF-8.
    InvalidCaption,
    /// The metadata member is not valid JSON, or nests deeper than
    /// [`crate::source::ReadLimits::max_json_depth`].
    InvalidMeta,
    /// The shard ended (or the connection broke) inside one of the sample's members.
    Truncated,
    /// A stage failed on this sample for another reason (the message is in the detail).
    StageFailed,
    /// A whole shard could not be opened (missing file, HTTP error); counted once per shard, its samples are
    /// unknown.
    UnreadableShard,
}

impl DropReason {
    /// Every reason, in summary order.
    pub const ALL: [DropReason; 9] = [
        DropReason::UndecodableImage,
        DropReason::ImageTooLarge,
        DropReason::MissingImage,
        DropReason::MemberTooLarge,
        DropReason::InvalidCaption,
        DropReason::InvalidMeta,
        DropReason::Truncated,
        DropReason::StageFailed,
        DropReason::UnreadableShard,
    ];

    /// Stable snake_case name used in records and summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UndecodableImage => "undecodable_image",
            DropReason::ImageTooLarge => "image_too_large",
            DropReason::MissingImage => "missing_image",
            DropReason::MemberTooLarge => "member_too_large",
            DropReason::InvalidCaption => "invalid_caption",
            DropReason::InvalidMeta => "invalid_meta",
            DropReason::Truncated => "truncated",
            DropReason::StageFailed => "stage_failed",
            DropReason::UnreadableShard => "unreadable_shard",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sample-level failure: the sample key, the reason and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleError {
    /// Key of the failed sample (WebDataset key or folder entry).
    pub key: String,
    /// Category used for counting.
    pub reason: DropReason,
    /// What exactly went wrong, for logs.
    pub detail: String,
}

impl SampleError {
    /// Builds a sample error.
    pub fn new(key: impl Into<String>, reason: DropReason, detail: impl Into<String>) -> Self {
        Self { key: key.into(), reason, detail: detail.into() }
    }
}

impl fmt::Display for SampleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sample `{}` dropped ({}): {}", self.key, self.reason, self.detail)
    }
}

impl std::error::Error for SampleError {}

/// What the pipeline does with a bad sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Drop the sample, count it under its [`DropReason`] and go on (default).
    #[default]
    Drop,
    /// Yield an `Err(Error::Sample(..))` item naming the sample, then go on with the next batch.
    Fail,
}

/// The crate's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration; every problem found is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
    /// A shard specification (path, glob, brace range or URL) could not be resolved.
    #[error("shard spec `{spec}`: {detail}")]
    ShardSpec {
        /// The specification as given.
        spec: String,
        /// What went wrong.
        detail: String,
    },
    /// Reading a shard failed.
    #[error("shard `{shard}`: {source}")]
    Shard {
        /// Path or URL of the shard.
        shard: String,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A bad sample surfaced because the pipeline runs with [`OnError::Fail`].
    #[error("{0}")]
    Sample(SampleError),
    /// A checkpoint state does not fit this pipeline (other seed, world size or sources).
    #[error("cannot resume from state: {0}")]
    State(String),
    /// Selecting or initialising a compute device failed.
    #[error("device `{device}`: {detail}")]
    Device {
        /// The requested device.
        device: String,
        /// What went wrong.
        detail: String,
    },
    /// A pipeline thread panicked or stopped unexpectedly.
    #[error("pipeline stage `{stage}` failed: {detail}")]
    Stage {
        /// Stage name.
        stage: String,
        /// What went wrong.
        detail: String,
    },
    /// Model weights or their config do not fit the model (missing, extra or misshaped tensor, wrong dtype,
    /// truncated file, inconsistent config).
    #[error("weights `{file}`: {detail}")]
    Weights {
        /// The weights or config file.
        file: String,
        /// What is wrong, naming the tensor where there is one.
        detail: String,
    },
    /// Plain I/O error with context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// JSON (state, JSONL captions) could not be parsed or written.
    #[error("{context}: {source}")]
    Json {
        /// What was being parsed.
        context: String,
        /// Underlying serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// The message a caught panic carries (`panic!("...")` with a literal or a formatted string), if it has one.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> Option<String> {
    panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned())
}
