//! The single integration-test binary (one link of burn instead of one per file, as ripgrep does).

mod bench;
mod cache;
mod cli;
mod efficientnet_lite;
mod fuzz;
mod inline;
mod labels;
mod mobilenet;
mod object;
mod pipeline;
mod resume;
mod s3util;
mod source;
mod text;
mod tokenizer;
mod train;
mod util;
mod vision;
mod vit;
mod write;
