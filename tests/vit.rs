//! ViT parity against the HuggingFace references in `fixtures/vit/` (CLIP vision tower and HF ViT / DINO, both
//! made with transformers 5.24 eager attention), and the loader's refusals of bad weights and configs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use juicer::model::vit::{Activation, CLIP_MEAN, CLIP_STD, Layout, Preprocess, ViTConfig, load_dir};
use serde_json::{Value, json};

use crate::util::fixtures;

const TOL: f32 = 1e-4;

/// A tensor from a safetensors file: dtype, shape, raw little-endian bytes.
#[derive(Clone)]
struct Raw {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Raw {
    fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, "F32");
        self.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    fn f32(shape: Vec<usize>, values: &[f32]) -> Raw {
        Raw { dtype: "F32".into(), shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
}

/// Parses a safetensors file by hand: 8-byte LE header length, JSON header, data.
fn read_safetensors(path: &Path) -> BTreeMap<String, Raw> {
    let bytes = fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let off: Vec<usize> =
                v["data_offsets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let shape = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let raw = Raw { dtype: v["dtype"].as_str().unwrap().into(), shape, data: data[off[0]..off[1]].to_vec() };
            (k, raw)
        })
        .collect()
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Raw>) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (k, t) in tensors {
        let begin = data.len();
        data.extend_from_slice(&t.data);
        header.insert(k.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [begin, data.len()]}));
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    fs::write(path, out).unwrap();
}

fn vit_dir(name: &str) -> PathBuf {
    fixtures().join("vit").join(name)
}

fn device() -> Device {
    Device::flex()
}

fn to_tensor<const D: usize>(raw: &Raw, device: &Device) -> Tensor<D> {
    let shape: [usize; D] = raw.shape.clone().try_into().unwrap();
    Tensor::from_data(TensorData::new(raw.f32s(), shape), device)
}

/// Max absolute difference, after checking the shape.
fn max_diff<const D: usize>(name: &str, got: Tensor<D>, want: &Raw) -> f32 {
    assert_eq!(got.dims().to_vec(), want.shape, "{name}: shape");
    let got = got.into_data().try_to_vec::<f32>().unwrap();
    got.iter().zip(want.f32s()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max)
}

/// Runs the folder's model on both inputs and checks every reference tensor; returns the measured diffs.
fn check_parity(model_dir: &Path, reference_dir: &Path) -> Vec<(String, f32)> {
    let device = device();
    let (model, _) = load_dir(model_dir, &device).unwrap();
    let input = read_safetensors(&reference_dir.join("input.safetensors"));
    let expected = read_safetensors(&reference_dir.join("expected.safetensors"));
    let mut diffs = Vec::new();
    for (input_name, suffix, grid) in [("pixel_values", "", [4, 4]), ("pixel_values_interp", "_interp", [5, 7])] {
        let pixels: Tensor<4> = to_tensor(&input[input_name], &device);
        let out = model.forward(pixels.clone());
        assert_eq!(out.grid, grid);
        let e = |k: &str| &expected[&format!("{k}{suffix}")];
        let mut check = |k: &str, d: f32| {
            diffs.push((format!("{k}{suffix}"), d));
            assert!(d <= TOL, "{}: {k}{suffix} max abs diff {d}", model_dir.display());
        };
        check("last_hidden_state", max_diff("last_hidden_state", out.last_hidden_state, e("last_hidden_state")));
        check("pooler_output", max_diff("pooler_output", out.pooler_output.unwrap(), e("pooler_output")));
        check(
            "last_layer_attentions",
            max_diff("last_layer_attentions", out.last_layer_attentions, e("last_layer_attentions")),
        );
        check("cls_patch_logits", max_diff("cls_patch_logits", out.cls_patch_logits, e("cls_patch_logits")));
        let cheap = model.cls_patch_logits(pixels);
        diffs.push((format!("cls_patch_logits{suffix} (cheap path)"), max_diff("cheap", cheap, e("cls_patch_logits"))));
        let d = diffs.last().unwrap().1;
        assert!(d <= TOL, "cheap cls_patch_logits{suffix} max abs diff {d}");
    }
    for (k, d) in &diffs {
        eprintln!("{}: {k} max abs diff {d:.3e}", model_dir.display());
    }
    diffs
}

#[test]
fn clip_matches_transformers() {
    check_parity(&vit_dir("clip_vision"), &vit_dir("clip_vision"));
}

#[test]
fn clip_prefixed_matches_transformers() {
    check_parity(&vit_dir("clip_vision/prefixed"), &vit_dir("clip_vision"));
}

#[test]
fn vit_dino_matches_transformers() {
    check_parity(&vit_dir("vit_dino"), &vit_dir("vit_dino"));
}

#[test]
fn configs_are_read_from_config_json() {
    let (clip, pre) = load_dir(&vit_dir("clip_vision"), &device()).unwrap();
    let c = clip.config();
    assert_eq!(c.layout, Layout::Clip);
    assert_eq!(
        (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size, c.patch_size, c.image_size),
        (48, 2, 4, 96, 16, 64)
    );
    assert_eq!(c.hidden_act, Activation::QuickGelu);
    assert_eq!(c.layer_norm_eps, 1e-5);
    assert_eq!(pre, Preprocess { mean: CLIP_MEAN, std: CLIP_STD, image_size: 64 });

    let (vit, pre) = load_dir(&vit_dir("vit_dino"), &device()).unwrap();
    let c = vit.config();
    assert_eq!(c.layout, Layout::Vit);
    assert_eq!(c.hidden_act, Activation::Gelu);
    assert_eq!(c.layer_norm_eps, 1e-12);
    assert!(c.qkv_bias);
    assert_eq!(pre, Preprocess { mean: [0.5; 3], std: [0.5; 3], image_size: 64 });
}

/// A scratch copy of a fixture folder (config, weights, preprocessor config) to spoil.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn of(name: &str) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
            fs::copy(vit_dir(name).join(f), dir.path().join(f)).unwrap();
        }
        Scratch { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn weights(&self) -> BTreeMap<String, Raw> {
        read_safetensors(&self.path().join("model.safetensors"))
    }

    fn set_weights(&self, w: &BTreeMap<String, Raw>) {
        write_safetensors(&self.path().join("model.safetensors"), w);
    }

    fn edit_config(&self, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
        let path = self.path().join("config.json");
        let mut v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }

    fn error(&self) -> String {
        match load_dir(self.path(), &device()) {
            Ok(_) => panic!("loading {} should fail", self.path().display()),
            Err(e) => {
                assert!(matches!(e, juicer::Error::Weights { .. }), "not a Weights error: {e:?}");
                let msg = e.to_string();
                eprintln!("{msg}");
                msg
            }
        }
    }
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message does not name `{p}`: {msg}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let s = Scratch::of("clip_vision");
    let mut w = s.weights();
    w.remove("encoder.layers.1.mlp.fc2.bias");
    s.set_weights(&w);
    assert_names(&s.error(), &["model.safetensors", "missing tensor `encoder.layers.1.mlp.fc2.bias`"]);
}

#[test]
fn extra_tensor_is_named() {
    let s = Scratch::of("vit_dino");
    let mut w = s.weights();
    w.insert("encoder.layer.0.attention.attention.extra.weight".into(), Raw::f32(vec![2], &[1.0, 2.0]));
    s.set_weights(&w);
    assert_names(
        &s.error(),
        &["model.safetensors", "unexpected tensor `encoder.layer.0.attention.attention.extra.weight`"],
    );
}

#[test]
fn wrong_shape_is_named() {
    let s = Scratch::of("clip_vision");
    let mut w = s.weights();
    let pos = w["embeddings.position_embedding.weight"].clone();
    w.insert("embeddings.position_embedding.weight".into(), Raw::f32(vec![16, 48], &pos.f32s()[48..]));
    s.set_weights(&w);
    assert_names(&s.error(), &["model.safetensors", "`embeddings.position_embedding.weight` has shape [16, 48]"]);
}

#[test]
fn wrong_dtype_is_named() {
    let s = Scratch::of("vit_dino");
    let mut w = s.weights();
    let t = w.get_mut("layernorm.weight").unwrap();
    t.dtype = "I32".into();
    s.set_weights(&w);
    assert_names(&s.error(), &["model.safetensors", "`layernorm.weight` has dtype I32"]);
}

#[test]
fn truncated_file_is_refused() {
    let s = Scratch::of("clip_vision");
    let path = s.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    assert_names(&s.error(), &["model.safetensors", "truncated", "tensor `"]);
    fs::write(&path, &bytes[..100]).unwrap();
    assert_names(&s.error(), &["model.safetensors", "truncated"]);
}

#[test]
fn config_disagreeing_with_weights_is_refused() {
    let s = Scratch::of("clip_vision");
    s.edit_config(|c| {
        c.insert("hidden_size".into(), json!(64));
    });
    assert_names(
        &s.error(),
        &["model.safetensors", "`embeddings.class_embedding` has shape [48], config.json implies [64]"],
    );

    let s = Scratch::of("vit_dino");
    s.edit_config(|c| {
        c.insert("num_hidden_layers".into(), json!(3));
    });
    assert_names(&s.error(), &["model.safetensors", "missing tensor `encoder.layer.2.layernorm_before.weight`"]);

    let s = Scratch::of("vit_dino");
    s.edit_config(|c| {
        c.insert("num_hidden_layers".into(), json!(1));
    });
    assert_names(&s.error(), &["model.safetensors", "unexpected tensors", "`encoder.layer.1.output.dense.bias`"]);

    let s = Scratch::of("vit_dino");
    s.edit_config(|c| {
        c.insert("image_size".into(), json!(80));
    });
    assert_names(&s.error(), &["`embeddings.position_embeddings` has shape [1, 17, 48]"]);
}

#[test]
fn bad_config_values_are_named() {
    let cases: [(&str, &str, Value, &str); 5] = [
        ("clip_vision", "hidden_act", json!("swiglu"), "field `hidden_act`: unsupported activation \"swiglu\""),
        ("vit_dino", "model_type", json!("dinov2"), "field `model_type`: unsupported model type \"dinov2\""),
        ("vit_dino", "num_attention_heads", json!(5), "field `num_attention_heads`"),
        ("clip_vision", "layer_norm_eps", json!("small"), "field `layer_norm_eps`"),
        ("vit_dino", "qkv_bias", json!(1), "field `qkv_bias`"),
    ];
    for (name, field, value, want) in cases {
        let s = Scratch::of(name);
        s.edit_config(|c| {
            c.insert(field.into(), value);
        });
        assert_names(&s.error(), &["config.json", want]);
    }
    let s = Scratch::of("vit_dino");
    fs::remove_file(s.path().join("config.json")).unwrap();
    assert_names(&s.error(), &["config.json", "cannot read"]);
}

#[test]
fn bad_preprocessor_config_is_named() {
    let s = Scratch::of("clip_vision");
    fs::write(s.path().join("preprocessor_config.json"), r#"{"image_mean": [0.5, 0.5], "crop_size": 64}"#).unwrap();
    assert_names(&s.error(), &["preprocessor_config.json", "field `image_mean`"]);
}

#[test]
fn preprocess_defaults_without_preprocessor_config() {
    let s = Scratch::of("vit_dino");
    fs::remove_file(s.path().join("preprocessor_config.json")).unwrap();
    let (_, pre) = load_dir(s.path(), &device()).unwrap();
    assert_eq!(pre, Preprocess { mean: [0.5; 3], std: [0.5; 3], image_size: 64 });

    let s = Scratch::of("clip_vision");
    fs::write(
        s.path().join("preprocessor_config.json"),
        r#"{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"shortest_edge": 72}, "crop_size": {"height": 64, "width": 64}}"#,
    )
    .unwrap();
    let (_, pre) = load_dir(s.path(), &device()).unwrap();
    assert_eq!(pre, Preprocess { mean: [0.1, 0.2, 0.3], std: [0.4, 0.5, 0.6], image_size: 64 });
}

/// A full `CLIPModel` checkpoint: `vision_model.`-prefixed keys, a text tower and projections to ignore, and a
/// `model_type: "clip"` config with the vision settings under `vision_config`.
#[test]
fn full_clip_checkpoint_loads_vision_tower() {
    let s = Scratch::of("clip_vision");
    let mut w: BTreeMap<String, Raw> = s.weights().into_iter().map(|(k, v)| (format!("vision_model.{k}"), v)).collect();
    w.insert("text_model.embeddings.token_embedding.weight".into(), Raw::f32(vec![2, 2], &[0.0; 4]));
    w.insert("visual_projection.weight".into(), Raw::f32(vec![2, 48], &[0.0; 96]));
    w.insert("logit_scale".into(), Raw::f32(vec![], &[2.6592]));
    s.set_weights(&w);
    let vision: Value = serde_json::from_str(&fs::read_to_string(s.path().join("config.json")).unwrap()).unwrap();
    let full = json!({"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 2,
        "text_config": {"hidden_size": 2}, "vision_config": vision});
    fs::write(s.path().join("config.json"), full.to_string()).unwrap();
    check_parity(s.path(), &vit_dir("clip_vision"));

    // An unknown `vision_model.` tensor is still refused.
    w.insert("vision_model.encoder.layers.0.bogus".into(), Raw::f32(vec![1], &[0.0]));
    s.set_weights(&w);
    assert_names(&s.error(), &["unexpected tensor `vision_model.encoder.layers.0.bogus`"]);
}

/// `ViTForImageClassification` (`vit.` prefix, `classifier.*`) and DINO (no pooler) layouts.
#[test]
fn vit_prefix_and_missing_pooler() {
    let s = Scratch::of("vit_dino");
    let mut w: BTreeMap<String, Raw> = s.weights().into_iter().map(|(k, v)| (format!("vit.{k}"), v)).collect();
    w.insert("classifier.weight".into(), Raw::f32(vec![2, 48], &[0.0; 96]));
    w.insert("classifier.bias".into(), Raw::f32(vec![2], &[0.0; 2]));
    s.set_weights(&w);
    check_parity(s.path(), &vit_dir("vit_dino"));

    let s = Scratch::of("vit_dino");
    let mut w = s.weights();
    w.retain(|k, _| !k.starts_with("pooler."));
    s.set_weights(&w);
    let device = device();
    let (model, _) = load_dir(s.path(), &device).unwrap();
    let input = read_safetensors(&vit_dir("vit_dino").join("input.safetensors"));
    let expected = read_safetensors(&vit_dir("vit_dino").join("expected.safetensors"));
    let out = model.forward(to_tensor(&input["pixel_values"], &device));
    assert!(out.pooler_output.is_none());
    assert!(max_diff("lhs", out.last_hidden_state, &expected["last_hidden_state"]) <= TOL);
}

#[test]
fn config_parses_full_clip_and_defaults() {
    let c =
        ViTConfig::from_json(r#"{"model_type": "clip", "vision_config": {"patch_size": 14}}"#, "config.json").unwrap();
    assert_eq!((c.layout, c.hidden_size, c.patch_size, c.image_size), (Layout::Clip, 768, 14, 224));
    assert_eq!(c.hidden_act, Activation::QuickGelu);
    let e = ViTConfig::from_json(r#"{"model_type": "clip", "vision_config": {"hidden_act": "mish"}}"#, "x/config.json")
        .unwrap_err()
        .to_string();
    assert_names(&e, &["x/config.json", "field `vision_config.hidden_act`"]);
    let e = ViTConfig::from_json(r#"{"hidden_size": 8}"#, "config.json").unwrap_err().to_string();
    assert_names(&e, &["config.json", "field `model_type` is missing"]);
}
