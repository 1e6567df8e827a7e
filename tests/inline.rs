//! Host-side batches ([`HostBatch`]), juicing samples held in memory ([`Juicer::juice`]) and `set_epoch`:
//! what the Python package is built on.

use std::collections::BTreeMap;
use std::io::Read;

use juicer::{ArrayBatcher, DeviceSpec, HostBatch, JuicedBatch, JuicerBuilder, RawSample};

use crate::util::{Fault, fixtures, make_shards, specs};

fn fixture_shard() -> String {
    fixtures().join("shards/gcompris-000000.tar").to_string_lossy().into_owned()
}

/// The first 6 fixture photos with the default (cam) scorer, one batch.
fn photos() -> JuicerBuilder {
    JuicedBatch::builder([fixture_shard()]).batch_size(6).limit(6).device(DeviceSpec::Cpu)
}

/// The shard's members by key: (image bytes, caption).
fn members(path: &str) -> BTreeMap<String, (Vec<u8>, Option<String>)> {
    let mut out: BTreeMap<String, (Vec<u8>, Option<String>)> = BTreeMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let (key, ext) = name.split_once('.').unwrap();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        let slot = out.entry(key.to_string()).or_default();
        match ext {
            "txt" => slot.1 = Some(String::from_utf8(bytes).unwrap()),
            "webp" | "jpg" | "png" => slot.0 = bytes,
            _ => {}
        }
    }
    out
}

fn tensor_f32(t: &burn::tensor::Tensor<3>) -> Vec<f32> {
    t.to_data().try_to_vec::<f32>().unwrap()
}

fn tensor_i64(t: &burn::tensor::Tensor<2, burn::tensor::Int>) -> Vec<i64> {
    t.to_data().try_to_vec_as::<i64>().unwrap()
}

fn tensor_bool(t: &burn::tensor::Tensor<2, burn::tensor::Bool>) -> Vec<bool> {
    t.to_data().try_to_vec::<bool>().unwrap()
}

#[test]
fn host_batches_equal_tensor_batches_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[5, 6], |_| Fault::None));
    let host = crate::util::small_loader(shards.clone()).scorer(juicer::ScorerSpec::Random);
    let host: Vec<HostBatch> =
        host.build_with(ArrayBatcher::default()).unwrap().iter().unwrap().map(|b| b.unwrap()).collect();
    let tensors = crate::util::small_loader(shards).scorer(juicer::ScorerSpec::Random).build().unwrap();
    let tensors: Vec<JuicedBatch> = tensors.iter().unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(host.len(), 3);
    assert_eq!(host.len(), tensors.len());
    for (h, t) in host.iter().zip(&tensors) {
        let [b, k, d] = t.patches.dims();
        assert_eq!(h.shape, (b, k, d));
        assert_eq!(h.keys, t.keys);
        assert_eq!(h.patches.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), {
            tensor_f32(&t.patches).iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        });
        assert_eq!(h.positions, tensor_i64(&t.positions));
        assert_eq!(h.patch_mask, tensor_bool(&t.patch_mask));
        assert_eq!(h.tokens, tensor_i64(&t.tokens));
        assert_eq!(h.token_mask, tensor_bool(&t.token_mask));
        assert_eq!((h.enriched.clone(), h.kept.clone()), (t.enriched.clone(), t.kept.clone()));
        // Padding is zero and unmasked; real patches are masked.
        for (i, kept) in h.kept.iter().enumerate() {
            let n = kept.len().min(k);
            assert!(h.patch_mask[i * k..i * k + n].iter().all(|&m| m));
            assert!(h.patch_mask[i * k + n..(i + 1) * k].iter().all(|&m| !m));
            assert!(h.patches[(i * k + n) * d..(i + 1) * k * d].iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn juice_gives_what_the_loader_gives_for_the_same_samples() {
    let loader = photos().build_with(ArrayBatcher::default()).unwrap();
    let from_shard = loader.iter().unwrap().next().unwrap().unwrap();
    assert_eq!(from_shard.len(), 6);
    let mut members = members(&fixture_shard());
    let mut samples: Vec<RawSample> = from_shard
        .keys
        .iter()
        .map(|k| {
            let (image, caption) = members.remove(k).unwrap();
            RawSample::in_memory(k.clone(), image, caption)
        })
        .collect();
    // A bad image in the middle: dropped, named, and the others still come out in order.
    samples.insert(3, RawSample::in_memory("not-an-image", b"GIF89a and nothing else".to_vec(), None));
    let no_sources = JuicedBatch::builder(Vec::<String>::new()).batch_size(6).device(DeviceSpec::Cpu);
    let inline = no_sources.build_inline(ArrayBatcher::default()).unwrap();
    let (juiced, dropped) = inline.juice(samples).unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].key, "not-an-image");
    assert_eq!(dropped[0].reason, juicer::DropReason::UndecodableImage);
    assert_eq!(juiced.keys, from_shard.keys);
    assert_eq!(juiced.shape, from_shard.shape);
    assert_eq!(juiced.patches, from_shard.patches);
    assert_eq!(juiced.positions, from_shard.positions);
    assert_eq!(juiced.tokens, from_shard.tokens);
    assert_eq!(juiced.scores, from_shard.scores);
    assert_eq!(juiced.classes, from_shard.classes);
    assert_eq!(juiced.enriched, from_shard.enriched);
    // Classes were extracted for these photos: the comparison is not of empty lists.
    assert!(juiced.classes.iter().any(|c| !c.is_empty()), "{:?}", juiced.classes);

    // A juicer built for `juice` has no shards to iterate.
    let err = inline.iter().err().unwrap();
    assert!(err.to_string().contains("no shards to iterate"), "{err}");
    // And a loader needs sources.
    let err = JuicedBatch::builder(Vec::<String>::new()).build_with(ArrayBatcher::default()).unwrap_err();
    assert!(err.to_string().contains("no sources given"), "{err}");
}

#[test]
fn juice_under_on_error_fail_names_the_bad_sample() {
    let inline = photos().on_error(juicer::OnError::Fail).build_inline(ArrayBatcher::default()).unwrap();
    let err = inline.juice(vec![RawSample::in_memory("broken", vec![0xff, 0xd8, 0xff], None)]).unwrap_err();
    assert!(err.to_string().contains("broken"), "{err}");
}

#[test]
fn set_epoch_runs_that_epoch_and_keeps_a_loaded_state_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let shards = specs(&make_shards(dir.path(), &[6, 6, 6], |_| Fault::None));
    let build = || {
        crate::util::small_loader(shards.clone())
            .scorer(juicer::ScorerSpec::Random)
            .shuffle_buffer(5)
            .shuffle_shards(true)
            .build_with(ArrayBatcher::default())
            .unwrap()
    };
    let keys = |it: juicer::JuicerIter<HostBatch>| -> Vec<String> { it.flat_map(|b| b.unwrap().keys).collect() };
    let loader = build();
    assert_eq!(loader.next_epoch().unwrap(), 0);
    let epoch3 = keys(loader.iter_epoch(3).unwrap());
    assert_ne!(epoch3, keys(loader.iter_epoch(0).unwrap()), "epochs shuffle differently");
    loader.set_epoch(3).unwrap();
    assert_eq!(loader.next_epoch().unwrap(), 3);
    assert_eq!(loader.epoch_batches(3).unwrap(), 5);
    assert_eq!(keys(loader.iter().unwrap()), epoch3);
    assert_eq!(loader.next_epoch().unwrap(), 4);

    // A state taken two batches into epoch 3, loaded into a fresh loader, survives set_epoch(3) ...
    let mut it = loader.iter_epoch(3).unwrap();
    let head: Vec<String> = it.by_ref().take(2).flat_map(|b| b.unwrap().keys).collect();
    let state = it.state().clone();
    drop(it);
    let fresh = build();
    fresh.resume(state.clone()).unwrap();
    assert_eq!(fresh.next_state().unwrap(), state);
    fresh.set_epoch(3).unwrap();
    let tail = keys(fresh.iter().unwrap());
    assert_eq!([head, tail].concat(), epoch3);
    // ... and is replaced by set_epoch of another epoch.
    fresh.resume(state).unwrap();
    fresh.set_epoch(1).unwrap();
    assert_eq!(fresh.next_state().unwrap().epoch, 1);
    assert_eq!(keys(fresh.iter().unwrap()), keys(fresh.iter_epoch(1).unwrap()));
}
