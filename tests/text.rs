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
