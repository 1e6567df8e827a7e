//! The single integration-test binary (one link of burn instead of one per file, as ripgrep does).

mod pipeline;
mod source;
mod util;
