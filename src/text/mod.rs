//! The text branch: OpenAI CLIP's tokenizer (byte-level BPE through HF `tokenizers`), the enrich stage that
//! folds the extracted concepts into the caption, [`nouns`] (what a caption already names, through WordNet's
//! nouns), and [`phrase`], the English it phrases them in.

pub mod enrich;
pub mod nouns;
pub mod phrase;
pub mod tokenizer;

use crate::error::SampleError;
use crate::sample::JuicedSample;
use crate::stage::Stage;
use enrich::Enricher;
use tokenizer::ClipTokenizer;

/// The enrich stage: folds the extracted classes into the caption, names the classes the caption names by a
/// synonym as the caption does ([`Enricher::name_as_caption`]), and tokenises the result.
pub struct EnrichStage {
    /// Caption rules and the mix draw.
    pub enricher: Enricher,
    /// The process-wide tokenizer.
    pub tokenizer: &'static ClipTokenizer,
    /// Epoch of the run (the mix draw depends on it).
    pub epoch: u64,
}

impl Stage for EnrichStage {
    type In = JuicedSample;
    type Out = JuicedSample;

    fn name(&self) -> &'static str {
        "enrich"
    }

    fn process(&self, mut s: JuicedSample) -> Result<JuicedSample, SampleError> {
        let tok = self.tokenizer;
        let out = self.enricher.enrich(&s.key, self.epoch, s.caption.as_deref(), &s.classes, &|t| tok.count(t));
        self.enricher.name_as_caption(s.caption.as_deref(), &mut s.classes);
        s.tokens = tok.encode(&out.text);
        s.enriched = out.text;
        s.added = out.added;
        Ok(s)
    }
}
