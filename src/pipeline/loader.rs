//! burn's `DataLoader` trait over a [`Juicer`]: `iter` runs the next epoch, `num_items` counts the epoch's
//! samples for this rank, `slice` restricts a loader to a range of epoch positions, `to_device` moves where
//! batches are created. Errors become burn's `DatasetError` items.

use std::sync::{Arc, Mutex};

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::DatasetError;
use burn::tensor::Device;

use super::{Juicer, JuicerIter, Next};
use crate::error::Error;

/// Adapter of [`JuicerIter`] to burn's `DataLoaderIterator` (errors become `DatasetError`).
struct LoaderIter<O>(std::result::Result<JuicerIter<O>, Option<Error>>);

impl<O> Iterator for LoaderIter<O> {
    type Item = std::result::Result<O, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            Ok(it) => it.next().map(|r| r.map_err(DatasetError::new)),
            Err(e) => e.take().map(|e| Err(DatasetError::new(e))),
        }
    }
}

impl<O> DataLoaderIterator<O> for LoaderIter<O> {
    fn progress(&self) -> Progress {
        match &self.0 {
            Ok(it) => {
                Progress::new(it.state.samples_read as usize, it.total.unwrap_or(0) as usize, Some("samples".into()))
            }
            Err(_) => Progress::new(0, 0, None),
        }
    }
}

impl<O: Send + 'static> DataLoader<O> for Juicer<O> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<O> + 'a> {
        // `progress().items_total` needs the shard counts; burn's trainers show it from the first step.
        let _ = self.shard_counts();
        Box::new(LoaderIter(Juicer::iter(self).map_err(Some)))
    }

    fn num_items(&self) -> usize {
        let epoch = match self.next.lock().map(|n| n.clone()) {
            Ok(Next::Epoch(e)) => e,
            // An elastic epoch reads its ranges.
            Ok(Next::Resume(s)) if s.ranges.is_some() => {
                let ranges = s.ranges.iter().flatten();
                return ranges.map(|r| r.end.unwrap_or(r.start).saturating_sub(r.start) as usize).sum();
            }
            Ok(Next::Resume(s)) => s.epoch,
            Err(_) => 0,
        };
        self.epoch_samples(epoch).unwrap_or(0) as usize
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<O>> {
        let mut j = self.clone();
        j.device = device.clone();
        Arc::new(j)
    }

    /// A loader over the samples at epoch positions `start..end` only (positions after the shuffle).
    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<O>> {
        let mut shared = (*self.shared).clone_config();
        shared.config.range = Some((start as u64, end as u64));
        Arc::new(Juicer {
            shared: Arc::new(shared),
            batcher: self.batcher.clone(),
            device: self.device.clone(),
            next: Arc::new(Mutex::new(Next::Epoch(0))),
        })
    }
}
