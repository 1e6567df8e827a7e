//! juicer: streaming token-level data governance for image-text training data.
//!
//! (Architecture docs are written in full once the modules settle.)

#![warn(missing_docs)]

pub mod batch;
pub mod decode;
pub mod device;
pub mod error;
pub mod graph;
pub mod pipeline;
pub mod plan;
pub mod reader;
pub mod rng;
pub mod sample;
pub mod source;
pub mod stage;

pub use batch::{JuicedBatch, JuicedBatcher};
pub use device::DeviceSpec;
pub use error::{DropReason, Error, OnError, Result, SampleError};
pub use pipeline::{Config, Juicer, JuicerBuilder, JuicerIter, Summary};
pub use plan::{EpochSize, LoaderState, World};
pub use sample::{Decoded, JuicedSample, RawSample, SourcePos};
