//! Where the next epoch starts: the epoch counter (`set_epoch`), exact resumption from a checkpointed
//! [`LoaderState`] (validated field by field against this loader's plan before any thread starts), and elastic
//! resumption of states taken on another world size ([`ElasticState`]).

use super::{Juicer, Next};
use crate::error::{Error, Result};
use crate::plan::{ElasticState, LoaderState, ShardPlan, StateShape};
use crate::rng::derive;
use crate::sample::SourcePos;

impl<O: Send + 'static> Juicer<O> {
    /// The epoch the next `iter()`/`stream()` runs (or continues, after [`Juicer::resume`]).
    pub fn next_epoch(&self) -> Result<u64> {
        match &*self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))? {
            Next::Epoch(e) => Ok(*e),
            Next::Resume(s) => Ok(s.epoch),
        }
    }

    /// The state the next `iter()`/`stream()` starts from: a loaded one, or the start of the next epoch.
    pub fn next_state(&self) -> Result<LoaderState> {
        let next = self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))?.clone();
        Ok(match next {
            Next::Epoch(e) => self.fresh_state(e),
            Next::Resume(s) => *s,
        })
    }

    /// Makes the next `iter()`/`stream()` run `epoch` from its start, unless a state loaded by
    /// [`Juicer::resume`] points into that same epoch, which then continues where it stopped: the `set_epoch(n)`
    /// that PyTorch samplers and Lightning call before every epoch, also after loading a checkpoint.
    pub fn set_epoch(&self, epoch: u64) -> Result<()> {
        let mut next = self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))?;
        if !matches!(&*next, Next::Resume(s) if s.epoch == epoch) {
            *next = Next::Epoch(epoch);
        }
        Ok(())
    }

    /// Makes the next `iter()`/`stream()` continue exactly from `state` (taken from [`crate::JuicerIter::state`]).
    pub fn resume(&self, state: LoaderState) -> Result<()> {
        let s = &self.shared;
        let mut problems = Vec::new();
        if !(LoaderState::MIN_VERSION..=LoaderState::VERSION).contains(&state.version) {
            problems.push(format!(
                "state version {} (this build reads {} to {})",
                state.version,
                LoaderState::MIN_VERSION,
                LoaderState::VERSION
            ));
        }
        if state.seed != s.config.seed {
            problems.push(format!("seed {} (loader has {})", state.seed, s.config.seed));
        }
        if state.world != s.world {
            problems.push(format!("world {:?} (loader has {:?})", state.world, s.world));
        }
        if state.sources != s.fingerprint {
            problems.push("the shard list differs from the one the state was taken with".into());
        }
        if state.shuffle_buffer != s.config.shuffle_buffer {
            problems.push(format!("shuffle buffer {} (loader has {})", state.shuffle_buffer, s.config.shuffle_buffer));
        }
        if problems.is_empty() {
            // The state is this loader's: now its positions and counters must fit the epoch's plan.
            problems.extend(state.problems(&self.state_shape(&state)?));
        }
        if !problems.is_empty() {
            return Err(Error::State(problems.join("; ")));
        }
        let next = if state.epoch_complete { Next::Epoch(state.epoch + 1) } else { Next::Resume(Box::new(state)) };
        *self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))? = next;
        Ok(())
    }

    /// The shape of this loader's plan for `state`'s epoch, which the state's positions must fit.
    pub(super) fn state_shape(&self, state: &LoaderState) -> Result<StateShape> {
        let s = &self.shared;
        let cfg = &s.config;
        let (shards_per_pass, max_passes) = match state.ranges {
            Some(_) => (0, 1),
            None => {
                let plan = ShardPlan::new(s.shards.len(), cfg.seed, state.epoch, s.world, cfg.shuffle_shards)?;
                (plan.shards_per_pass(), self.epoch_target(state.epoch)?.1)
            }
        };
        Ok(StateShape {
            n_shards: s.shards.len(),
            shuffle_shards: cfg.shuffle_shards,
            shuffle_buffer: cfg.shuffle_buffer,
            batch_size: cfg.batch_size,
            shards_per_pass,
            max_passes,
        })
    }

    /// Continues from checkpointed states, whichever kind they are: one state of this juicer's world and rank
    /// resumes exactly ([`Juicer::resume`]); otherwise the states (every rank of another world, or of this one)
    /// are merged ([`LoaderState::merge`]) and the epoch continues on this world ([`Juicer::resume_elastic`]).
    pub fn resume_from(&self, mut states: Vec<LoaderState>) -> Result<()> {
        if states.len() == 1 && states[0].world == self.shared.world {
            return self.resume(states.remove(0));
        }
        self.resume_elastic(&LoaderState::merge(&states)?)
    }

    pub(super) fn fresh_state(&self, epoch: u64) -> LoaderState {
        let s = &self.shared;
        LoaderState {
            n_shards: Some(s.shards.len()),
            shuffle_shards: Some(s.config.shuffle_shards),
            ..LoaderState::start(s.config.seed, epoch, s.world, s.fingerprint.clone(), s.config.shuffle_buffer)
        }
    }

    /// Makes the next `iter()`/`stream()` continue an epoch that ranks of another world size stopped in, from
    /// their states combined by [`LoaderState::merge`]: every sample of the epoch they had not emitted yet is
    /// emitted exactly once across this juicer's world.
    ///
    /// The remaining samples ([`ElasticState::remaining`]) are cut into one contiguous piece per rank of this
    /// world, of nearly equal sample counts ([`ElasticState::pieces`], using [`Juicer::shard_counts`]); this rank
    /// reads its piece, range by range (each opened at its byte offset where the merged state knows it), through
    /// its shuffle buffer, and the epoch ends when the piece is exhausted: no samples are dropped or repeated to
    /// equalise ranks in that epoch, and batch counts across ranks differ by at most one (plus the effect of
    /// dropped bad samples). The epochs after it follow this world's plan, exactly as a fresh run of this world
    /// would. When every old rank had completed the epoch, the next epoch starts.
    ///
    /// The rank's state during the resumed epoch ([`crate::JuicerIter::state`], holding its range list) resumes with
    /// [`Juicer::resume`] on the same world, and merges again with [`LoaderState::merge`].
    ///
    /// What is bit-identical: the samples the old ranks emitted before the checkpoint are what they were;
    /// the epochs after the resumed one are those of a fresh run on this world. What cannot be: the order of
    /// the resumed epoch's remaining samples matches neither world's plan (its shuffle buffers are new).
    pub fn resume_elastic(&self, merged: &ElasticState) -> Result<()> {
        let s = &self.shared;
        let mut problems = Vec::new();
        if !(LoaderState::MIN_VERSION..=LoaderState::VERSION).contains(&merged.version) {
            problems.push(format!(
                "merged state version {} (this build reads up to {})",
                merged.version,
                LoaderState::VERSION
            ));
        }
        if merged.seed != s.config.seed {
            problems.push(format!("seed {} (loader has {})", merged.seed, s.config.seed));
        }
        if merged.sources != s.fingerprint || merged.n_shards != s.shards.len() {
            problems.push("the shard list differs from the one the states were taken with".into());
        }
        if !problems.is_empty() {
            return Err(Error::State(problems.join("; ")));
        }
        let next = if merged.epoch_complete {
            Next::Epoch(merged.epoch.saturating_add(1))
        } else {
            let counts = self.shard_counts()?;
            let w = s.world;
            let piece = merged.pieces(&counts, w.world_size)?.swap_remove(w.rank);
            let mut state = self.fresh_state(merged.epoch);
            if let Some(first) = piece.first() {
                state.cursor = SourcePos { pass: 0, shard: 0, index: first.start };
                state.cursor_offset = first.offset;
            }
            state.shuffle_rng = derive(s.config.seed, &[merged.epoch, w.rank as u64, w.world_size as u64, 0x454c_4153]);
            state.ranges = Some(piece);
            Next::Resume(Box::new(state))
        };
        *self.next.lock().map_err(|_| Error::State("loader lock poisoned".into()))? = next;
        Ok(())
    }
}
