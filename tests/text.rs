//! The text branch inside the pipeline: enriched captions and CLIP tokens in every batch.

use juicer::text::tokenizer::{CONTEXT, EOT, SOT};
use juicer::{DeviceSpec, DropReason, JuicedBatch, JuicerBuilder};

use crate::util::{fixtures, png};
use juicer::source::ShardWriter;

fn fixture_builder() -> JuicerBuilder {
    JuicedBatch::builder([fixtures().join("shards/gcompris-{000000..000002}.tar").display().to_string()])
        .device(DeviceSpec::Cpu)
        .batch_size(16)
        .decode_workers(2)
        .shuffle_buffer(0)
}

#[test]
fn batches_carry_enriched_captions_and_their_tokens() {
    let loader = fixture_builder().seed(3).build().unwrap();
    let mut it = loader.iter().unwrap();
    let mut n = 0;
    let mut added = 0;
    for b in it.by_ref() {
        let b = b.unwrap();
        assert_eq!(b.tokens.dims(), [b.len(), CONTEXT]);
        let tokens = b.tokens.to_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        let mask = b.token_mask.to_data().try_to_vec::<bool>().unwrap();
        for i in 0..b.len() {
            let ids = &b.token_ids[i];
            assert_eq!(ids.first(), Some(&SOT));
            assert_eq!(ids.last(), Some(&EOT));
            let row = &tokens[i * CONTEXT..(i + 1) * CONTEXT];
            let real: Vec<u32> = row[..ids.len()].iter().map(|&t| t as u32).collect();
            assert_eq!(&real, ids, "{}", b.keys[i]);
            assert!(row[ids.len()..].iter().all(|&t| t == 0), "zero padding");
            assert_eq!(mask[i * CONTEXT..(i + 1) * CONTEXT].iter().filter(|&&m| m).count(), ids.len());
            let caption = b.captions[i].as_deref().unwrap();
            let e = &b.enriched[i];
            if !e.starts_with(caption) {
                // Only a caption that fills the context is cut (at a word boundary) to make room for the classes.
                let head = e.split(", with ").next().unwrap();
                assert!(caption.starts_with(head) && !b.added[i].is_empty(), "{}: {e}", b.keys[i]);
                assert!(ids.len() > CONTEXT - 12, "{}: cut although it fits ({} tokens)", b.keys[i], ids.len());
            }
            for c in &b.added[i] {
                assert!(b.enriched[i].contains(&c.name), "{} added {}", b.keys[i], c.name);
                assert!(b.classes[i].iter().any(|k| k.id == c.id), "only extracted classes are added");
            }
            added += b.added[i].len();
            n += 1;
        }
    }
    assert_eq!(n, 73);
    assert!(added > 0);
    assert_eq!(it.summary().classes_added, added as u64);
}

#[test]
fn mix_zero_leaves_every_caption_unchanged() {
    let loader = fixture_builder().mix(0.0).build().unwrap();
    for b in loader.iter().unwrap() {
        let b = b.unwrap();
        for i in 0..b.len() {
            assert_eq!(Some(b.enriched[i].as_str()), b.captions[i].as_deref());
            assert!(b.added[i].is_empty());
        }
    }
}

#[test]
fn huge_empty_and_broken_captions_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(dir.path(), "t", 100, u64::MAX).unwrap();
    let huge = "a very long caption about a dog ".repeat(32 * 1024); // 1 MB
    let img = png(1, 64, 64);
    w.write("huge", &[("png", &img), ("txt", huge.as_bytes())]).unwrap();
    w.write("empty", &[("png", &img), ("txt", b"")]).unwrap();
    w.write("none", &[("png", &img)]).unwrap();
    w.write("broken", &[("png", &img), ("txt", b"caf\xe9")]).unwrap();
    let shards: Vec<String> = w.finish().unwrap().iter().map(|p| p.display().to_string()).collect();
    let builder = || JuicedBatch::builder(shards.clone()).device(DeviceSpec::Cpu).batch_size(8).shuffle_buffer(0);
    // By default a caption above 64 KiB is refused before it is read.
    let mut it = builder().build().unwrap().iter().unwrap();
    let b = it.next().unwrap().unwrap();
    assert_eq!(b.keys, vec!["empty", "none"]);
    assert!(it.next().is_none());
    let dropped = it.take_dropped();
    let reasons: Vec<_> = dropped.iter().map(|e| (e.key.as_str(), e.reason)).collect();
    assert_eq!(reasons, [("huge", DropReason::MemberTooLarge), ("broken", DropReason::InvalidCaption)]);
    assert!(dropped[0].detail.contains("max_caption_bytes"), "{}", dropped[0].detail);
    drop(it);
    // Allowed in, the 1 MB caption goes through the tokenizer.
    let loader = builder().max_caption_bytes(2 << 20).build().unwrap();
    let mut it = loader.iter().unwrap();
    let b = it.next().unwrap().unwrap();
    assert_eq!(b.keys, vec!["huge", "empty", "none"]);
    for i in 0..b.len() {
        assert!(b.token_ids[i].len() <= CONTEXT && b.token_ids[i].last() == Some(&EOT), "{}", b.keys[i]);
    }
    // The 1 MB caption fills the context; its classes, if any, were put in before the tokenizer cut.
    assert_eq!(b.token_ids[0].len(), CONTEXT);
    for i in [1, 2] {
        let e = &b.enriched[i];
        assert!(e.is_empty() || e.starts_with("a photo of "), "{}: {e}", b.keys[i]);
    }
    assert!(it.next().is_none());
    let dropped = it.take_dropped();
    assert_eq!(dropped.len(), 1);
    assert_eq!((dropped[0].key.as_str(), dropped[0].reason), ("broken", DropReason::InvalidCaption));
}

/// The fixture run with this context and tree-rule threshold: (caption, enriched text, added classes) per sample.
fn fixture_texts(context: usize, class_threshold: f32) -> Vec<(String, String, Vec<juicer::Class>)> {
    let mut config = juicer::Config::default();
    config.text.context = context;
    let shards = fixtures().join("shards/gcompris-{000000..000002}.tar").display().to_string();
    let loader = JuicedBatch::builder([shards])
        .config(config)
        .device(DeviceSpec::Cpu)
        .batch_size(16)
        .shuffle_buffer(0)
        .class_threshold(class_threshold)
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in loader.iter().unwrap() {
        let b = b.unwrap();
        for i in 0..b.len() {
            out.push((b.captions[i].clone().unwrap_or_default(), b.enriched[i].clone(), b.added[i].clone()));
        }
    }
    assert_eq!(out.len(), 73);
    out
}

/// Every concept a caption names, read independently of the enrich stage's scan and more broadly: every run of
/// one to four words (not only the longest at each word), each base form of its last word, with every
/// hierarchy ancestor of what WordNet's nouns say it is.
fn named_by_any_phrase(caption: &str) -> std::collections::HashSet<u32> {
    use juicer::text::nouns::Nouns;
    use juicer::vision::hierarchy::Hierarchy;
    let (nouns, h) = (Nouns::wordnet().unwrap(), Hierarchy::imagenet().unwrap());
    let lower = caption.to_lowercase();
    let words: Vec<&str> = juicer::text::phrase::words(&lower).collect();
    let mut named = std::collections::HashSet::new();
    for start in 0..words.len() {
        for end in start + 1..=(start + 4).min(words.len()) {
            let init = words[start..end - 1].join(" ");
            for last in nouns.base_forms(words[end - 1]) {
                let lemma = if init.is_empty() { last } else { format!("{init} {last}") };
                for &id in nouns.lemma(&lemma).unwrap_or_default() {
                    named.insert(id);
                    named.extend(h.ancestors(id));
                }
            }
        }
    }
    named
}

#[test]
fn no_added_concept_is_one_its_caption_already_names() {
    use juicer::vision::hierarchy::{Hierarchy, is_generic};
    let h = Hierarchy::imagenet().unwrap();
    let (mut added, mut checked) = (0, 0);
    // The default threshold, and a low one that puts far more concepts up for adding.
    for threshold in [0.5, 0.15] {
        for (caption, _, added_classes) in fixture_texts(77, threshold) {
            let named = named_by_any_phrase(&caption);
            for c in &added_classes {
                let id = h.by_wnid(&c.wnid).expect("an ImageNet concept");
                assert!(!named.contains(&id), "`{caption}` already names {} ({})", c.name, c.wnid);
                assert!(!is_generic(h, id), "`{caption}` gained the generic {}", c.name);
                added += 1;
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 146);
    println!("{added} added concepts checked");
    assert!(added >= 10, "only {added} concepts were added: the check saw too little");
}

#[test]
fn captions_are_cut_only_at_sentence_or_clause_ends() {
    let mut cut = 0;
    for context in [77, 40, 28] {
        for (caption, text, added) in fixture_texts(context, 0.15) {
            if added.is_empty() {
                assert_eq!(text, caption);
                continue;
            }
            let head = [", with ", " Pictured: "].iter().filter_map(|sep| text.rfind(sep)).max().map(|at| &text[..at]);
            let Some(head) = head else { panic!("{text}") };
            let caption = caption.trim();
            assert!(caption.starts_with(head) && !head.is_empty(), "{text}");
            if head == caption {
                continue;
            }
            cut += 1;
            let rest = caption[head.len()..].trim_start();
            let sentence = head.trim_end_matches(['"', '\'', ')', '”', '’']).ends_with(['.', '!', '?', '…']);
            let clause = rest.starts_with([',', ';', ':', '—', '–', '-']);
            assert!(sentence || clause, "cut mid-phrase: `{head}` | `{rest}`");
        }
    }
    println!("{cut} cut captions checked");
    assert!(cut >= 10, "only {cut} captions were cut: the check saw too little");
}
