//! MobileNetV2: parity with torchvision's reference outputs, batching, strict weight loading, class names, wgpu.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Instant;

use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot};
use burn::tensor::{Device, Tensor, TensorData};
use juicer::Error;
use juicer::model::mobilenet_v2::{self, MobileNetV2, MobileNetV2Config, imagenet_classes};

const PHOTOS: [&str; 4] = ["animals-giant_panda", "animals-koala", "monuments-neuschwanstein_castle", "farm-sheep"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mobilenet_v2")
}

fn weights_path() -> PathBuf {
    fixtures().join("mobilenet_v2.safetensors")
}

/// One tensor of a safetensors file: dtype, shape and raw little-endian bytes.
#[derive(Clone, Debug)]
struct Raw {
    dtype: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Raw {
    fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.dtype, "F32");
        self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn tensor<const D: usize>(&self, device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(self.f32s(), self.shape.clone()), device)
    }
}

/// A safetensors file's tensors in data order.
type Tensors = Vec<(String, Raw)>;

/// Parses a safetensors file (8-byte LE header length, JSON header, data), keeping the header's tensor order.
fn read_safetensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out: Vec<(usize, String, Raw)> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(name, v)| {
            let offsets: Vec<usize> =
                v["data_offsets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let shape = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let raw = Raw {
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape,
                bytes: data[offsets[0]..offsets[1]].to_vec(),
            };
            (offsets[0], name, raw)
        })
        .collect();
    out.sort_by_key(|(offset, _, _)| *offset);
    out.into_iter().map(|(_, name, raw)| (name, raw)).collect()
}

fn read_map(path: &Path) -> BTreeMap<String, Raw> {
    read_safetensors(path).into_iter().collect()
}

/// Writes tensors as a safetensors file in the given order (metadata `{"format": "pt"}`).
fn write_safetensors(path: &Path, tensors: &[(String, Raw)]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0;
    for (name, raw) in tensors {
        let end = offset + raw.bytes.len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": raw.dtype, "shape": raw.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for (_, raw) in tensors {
        out.extend_from_slice(&raw.bytes);
    }
    std::fs::write(path, out).unwrap();
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn top_k(logits: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(k);
    idx
}

static MODEL: LazyLock<MobileNetV2> = LazyLock::new(|| mobilenet_v2::embedded(&Device::flex()).unwrap());

fn reference(photo: &str) -> BTreeMap<String, Raw> {
    read_map(&fixtures().join("reference").join(format!("{photo}.safetensors")))
}

/// The top-5 class ids recorded in `summary.json` for `photo`.
fn summary_top5(photo: &str) -> Vec<usize> {
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("reference/summary.json")).unwrap()).unwrap();
    let entry = summary["photos"].as_array().unwrap().iter().find(|p| p["key"] == photo).unwrap();
    entry["top5"].as_array().unwrap().iter().map(|t| t["index"].as_u64().unwrap() as usize).collect()
}

#[test]
fn mobilenet_module_paths_are_torchvision_keys() {
    let model = MobileNetV2Config::new().init(&Device::flex());
    let ours: BTreeMap<String, Vec<usize>> = model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|t| (t.name, t.shape.to_vec()))
        .collect();
    let file: BTreeMap<String, Vec<usize>> =
        read_safetensors(&weights_path()).into_iter().map(|(name, raw)| (name, raw.shape)).collect();
    assert_eq!(ours.len(), 262);
    assert_eq!(ours, file);
}

#[test]
fn mobilenet_reference_parity() {
    reference_parity(&MODEL);
}

/// The model the pipeline runs: BatchNorms folded into the convolutions keeps the reference's tolerances.
#[test]
fn mobilenet_with_folded_batch_norms_keeps_reference_parity() {
    let folded = mobilenet_v2::embedded(&Device::flex()).unwrap().fold_batch_norms();
    assert!(folded.features.iter().all(|f| match f {
        mobilenet_v2::Feature::ConvBnRelu6((conv, _)) => conv.bias.is_some(),
        mobilenet_v2::Feature::InvertedResidual(_) => true,
    }));
    reference_parity(&folded);
}

fn reference_parity(model: &MobileNetV2) {
    let device = Device::flex();
    let classes = imagenet_classes();
    let bias = to_vec(model.classifier_bias());
    for photo in PHOTOS {
        let r = reference(photo);
        let start = Instant::now();
        let (features, logits) = model.forward(r["input"].tensor::<4>(&device));
        assert_eq!(features.dims(), [1, 1280, 7, 7]);
        assert_eq!(logits.dims(), [1, 1000]);
        let logits_v = to_vec(logits);
        let elapsed = start.elapsed();
        let top5 = top_k(&logits_v, 5);
        let cams = model.class_activation_maps(features.clone(), &top5).unwrap();
        assert_eq!(cams.dims(), [1, 5, 7, 7]);
        let (features_v, cams_v) = (to_vec(features), to_vec(cams));

        let d_features = max_abs_diff(&features_v, &r["features"].f32s());
        let d_logits = max_abs_diff(&logits_v, &r["logits"].f32s());
        let d_cam = max_abs_diff(&cams_v, &r["cam_top5"].f32s());
        // mean_hw(cam_c) + b[c] == logit_c.
        let d_cam_logit = top5
            .iter()
            .enumerate()
            .map(|(j, &c)| (cams_v[j * 49..(j + 1) * 49].iter().sum::<f32>() / 49.0 + bias[c] - logits_v[c]).abs())
            .fold(0.0, f32::max);
        let names: Vec<&str> = top5.iter().map(|&c| classes[c]).collect();
        println!(
            "{photo}: forward {elapsed:?}, max|Δ| features {d_features:.2e}, logits {d_logits:.2e}, cam_top5 \
             {d_cam:.2e}, mean(cam)+b-logit {d_cam_logit:.2e}; top-5 {top5:?} {names:?}"
        );
        assert!(d_features <= 1e-4, "{photo}: features differ by {d_features}");
        assert!(d_logits <= 1e-4, "{photo}: logits differ by {d_logits}");
        assert!(d_cam <= 1e-4, "{photo}: cam_top5 differs by {d_cam}");
        assert!(d_cam_logit <= 1e-4, "{photo}: mean(cam) + bias differs from the logit by {d_cam_logit}");
        assert_eq!(top5, top_k(&r["logits"].f32s(), 5), "{photo}: top-5 differs from the reference logits");
        assert_eq!(top5, summary_top5(photo), "{photo}: top-5 differs from summary.json");
    }
}

#[test]
fn mobilenet_intermediates_match() {
    let device = Device::flex();
    let r = read_map(&fixtures().join("reference/intermediates.safetensors"));
    let mut x = r["input"].tensor::<4>(&device);
    for (i, feature) in MODEL.features.iter().take(4).enumerate() {
        x = feature.forward(x);
        let want = &r[&format!("features.{i}")];
        assert_eq!(x.dims().to_vec(), want.shape);
        let d = max_abs_diff(&to_vec(x.clone()), &want.f32s());
        println!("features.{i}: max|Δ| {d:.2e}");
        assert!(d <= 1e-4, "features.{i} differs by {d}");
    }
}

#[test]
fn mobilenet_batch_matches_single() {
    let device = Device::flex();
    let model = &*MODEL;
    let inputs: Vec<Tensor<4>> = PHOTOS.iter().map(|p| reference(p)["input"].tensor::<4>(&device)).collect();
    let start = Instant::now();
    let (features, logits) = model.forward(Tensor::cat(inputs.clone(), 0));
    let cams = model.class_activation_maps(features.clone(), &[388, 105, 483, 348]).unwrap();
    assert_eq!(features.dims(), [4, 1280, 7, 7]);
    assert_eq!(logits.dims(), [4, 1000]);
    assert_eq!(cams.dims(), [4, 4, 7, 7]);
    let (features, logits, cams) = (to_vec(features), to_vec(logits), to_vec(cams));
    println!("batch of 4: {:?}", start.elapsed());
    let (mut d_features, mut d_logits, mut d_cams) = (0f32, 0f32, 0f32);
    for (i, input) in inputs.into_iter().enumerate() {
        let (f1, l1) = model.forward(input);
        let c1 = to_vec(model.class_activation_maps(f1.clone(), &[388, 105, 483, 348]).unwrap());
        let (f1, l1) = (to_vec(f1), to_vec(l1));
        d_features = d_features.max(max_abs_diff(&features[i * f1.len()..(i + 1) * f1.len()], &f1));
        d_logits = d_logits.max(max_abs_diff(&logits[i * 1000..(i + 1) * 1000], &l1));
        d_cams = d_cams.max(max_abs_diff(&cams[i * c1.len()..(i + 1) * c1.len()], &c1));
    }
    println!("batch vs single: max|Δ| features {d_features:.2e}, logits {d_logits:.2e}, cams {d_cams:.2e}");
    assert!(d_features <= 1e-5 && d_logits <= 1e-5 && d_cams <= 1e-5);
}

#[test]
fn mobilenet_cam_rejects_bad_class() {
    let model = MobileNetV2Config::new().init(&Device::flex());
    let features = Tensor::<4>::zeros([1, 1280, 7, 7], &Device::flex());
    let err = model.class_activation_maps(features, &[1, 1000]).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("class id 1000 is out of range"), "{err}");
}

#[test]
fn mobilenet_loads_from_path_and_bytes() {
    let device = Device::flex();
    let from_path = mobilenet_v2::load(&weights_path(), &device).unwrap();
    let from_bytes = mobilenet_v2::load_bytes(&std::fs::read(weights_path()).unwrap(), &device).unwrap();
    let file = read_map(&weights_path());
    for model in [&from_path, &from_bytes, &*MODEL] {
        assert_eq!(to_vec(model.classifier_weight()), file["classifier.1.weight"].f32s());
        assert_eq!(to_vec(model.classifier_bias()), file["classifier.1.bias"].f32s());
    }
}

/// Writes `tensors` into a fresh file, loads it, and returns the `Error::Weights` detail after checking its file.
fn load_error(dir: &Path, name: &str, bytes: Option<Vec<u8>>, tensors: &[(String, Raw)]) -> String {
    let path = dir.join(format!("{name}.safetensors"));
    match bytes {
        Some(bytes) => std::fs::write(&path, bytes).unwrap(),
        None => write_safetensors(&path, tensors),
    }
    match mobilenet_v2::load(&path, &Device::flex()) {
        Err(Error::Weights { file, detail }) => {
            assert_eq!(file, path.display().to_string());
            let message = Error::Weights { file, detail: detail.clone() }.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            println!("{name}: {message}");
            detail
        }
        Err(other) => panic!("{name}: expected Error::Weights, got {other:?}"),
        Ok(_) => panic!("{name}: bad weights loaded"),
    }
}

#[test]
fn mobilenet_bad_weights_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let good = read_safetensors(&weights_path());
    let edit = |f: &dyn Fn(&mut Tensors)| {
        let mut t = good.clone();
        f(&mut t);
        t
    };
    let find = |t: &Tensors, name: &str| t.iter().position(|(n, _)| n == name).unwrap();

    // The unmodified tensors written by this helper load fine (the helper is not the cause of the failures).
    let path = dir.path().join("rewritten.safetensors");
    write_safetensors(&path, &good);
    mobilenet_v2::load(&path, &Device::flex()).unwrap();

    let missing = edit(&|t| {
        let i = find(t, "features.5.conv.1.1.running_var");
        t.remove(i);
    });
    let d = load_error(dir.path(), "missing", None, &missing);
    assert!(d.contains("missing tensor `features.5.conv.1.1.running_var`"), "{d}");

    let extra = edit(&|t| {
        t.push(("features.19.0.weight".into(), Raw { dtype: "F32".into(), shape: vec![2], bytes: vec![0; 8] }))
    });
    let d = load_error(dir.path(), "extra", None, &extra);
    assert!(d.contains("unexpected tensor `features.19.0.weight`"), "{d}");

    let reshaped = edit(&|t| {
        let i = find(t, "classifier.1.weight");
        t[i].1.shape = vec![1280, 1000];
    });
    let d = load_error(dir.path(), "shape", None, &reshaped);
    assert!(d.contains("tensor `classifier.1.weight` has shape [1280, 1000], expected [1000, 1280]"), "{d}");

    let fewer_classes = edit(&|t| {
        let i = find(t, "classifier.1.bias");
        t[i].1.shape = vec![999];
        t[i].1.bytes.truncate(999 * 4);
    });
    let d = load_error(dir.path(), "shape_bias", None, &fewer_classes);
    assert!(d.contains("tensor `classifier.1.bias` has shape [999], expected [1000]"), "{d}");

    for (dtype, width) in [("F16", 2), ("F64", 8), ("BF16", 2), ("I64", 8)] {
        let retyped = edit(&|t| {
            let i = find(t, "features.0.0.weight");
            t[i].1.dtype = dtype.into();
            t[i].1.bytes = vec![0; 32 * 27 * width];
        });
        let d = load_error(dir.path(), &format!("dtype_{dtype}"), None, &retyped);
        assert!(d.contains(&format!("tensor `features.0.0.weight` has dtype {dtype}, expected F32")), "{d}");
    }

    let bytes = std::fs::read(weights_path()).unwrap();
    let last = read_safetensors(&weights_path()).last().unwrap().0.clone();
    let d = load_error(dir.path(), "truncated", Some(bytes[..bytes.len() - 100].to_vec()), &[]);
    assert!(d.contains(&format!("tensor `{last}` spans bytes")) && d.contains("truncated"), "{d}");

    let d = load_error(dir.path(), "truncated_header", Some(bytes[..1000].to_vec()), &[]);
    assert!(d.contains("truncated or not a safetensors file"), "{d}");

    let d = load_error(dir.path(), "tiny", Some(bytes[..5].to_vec()), &[]);
    assert!(d.contains("truncated or not a safetensors file"), "{d}");

    let mut corrupt = bytes.clone();
    corrupt[8..20].copy_from_slice(b"not json at ");
    let d = load_error(dir.path(), "corrupt_header", Some(corrupt), &[]);
    assert!(d.contains("corrupt safetensors header"), "{d}");

    let mut trailing = bytes.clone();
    trailing.extend_from_slice(&[0; 16]);
    let d = load_error(dir.path(), "trailing", Some(trailing), &[]);
    assert!(d.contains("16 unexplained trailing bytes"), "{d}");

    // load_bytes reports its own file name.
    match mobilenet_v2::load_bytes(&bytes[..bytes.len() - 4], &Device::flex()) {
        Err(Error::Weights { file, detail }) => {
            assert_eq!(file, mobilenet_v2::BYTES_WEIGHTS_NAME);
            assert!(detail.contains(&format!("`{last}`")), "{detail}");
        }
        other => panic!("expected Error::Weights, got {:?}", other.map(|_| ())),
    }

    let d = load_error(dir.path(), "not_there_dir", Some(Vec::new()), &[]);
    assert!(d.contains("truncated or not a safetensors file"), "{d}");
    match mobilenet_v2::load(&dir.path().join("absent.safetensors"), &Device::flex()) {
        Err(Error::Weights { file, detail }) => {
            assert!(file.ends_with("absent.safetensors") && detail.contains("cannot read"), "{file}: {detail}")
        }
        other => panic!("expected Error::Weights, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn mobilenet_class_names() {
    let classes = imagenet_classes();
    assert_eq!(classes.len(), 1000);
    assert_eq!(classes[388], "giant panda");
    assert_eq!(classes[0], "tench");
    assert_eq!(classes[999], "toilet tissue");
    assert!(classes.iter().all(|c| !c.is_empty()));
}

/// Runs the forward on the default wgpu device against flex; skipped (with a note) when there is no adapter.
#[cfg(feature = "wgpu")]
#[test]
fn mobilenet_wgpu_matches_flex() {
    let instance = wgpu::Instance::default();
    let adapters = futures::executor::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    if adapters.is_empty() {
        println!("SKIPPED mobilenet_wgpu_matches_flex: no wgpu adapter available");
        return;
    }
    let names: Vec<String> = adapters
        .iter()
        .map(|a| format!("{} ({:?}, {:?})", a.get_info().name, a.get_info().device_type, a.get_info().backend))
        .collect();
    drop(adapters);
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    let start = Instant::now();
    let model = mobilenet_v2::embedded(&device).unwrap();
    let r = reference(PHOTOS[0]);
    let (features, logits) = model.forward(r["input"].tensor::<4>(&device));
    let (features, logits) = (to_vec(features), to_vec(logits));
    let first = start.elapsed();
    let start = Instant::now();
    let (_, again) = model.forward(r["input"].tensor::<4>(&device));
    let _ = to_vec(again);
    let second = start.elapsed();
    let (flex_features, flex_logits) = MODEL.forward(r["input"].tensor::<4>(&Device::flex()));
    let d_features = max_abs_diff(&features, &to_vec(flex_features));
    let d_logits = max_abs_diff(&logits, &to_vec(flex_logits));
    println!(
        "wgpu {names:?}: load+first forward {first:?}, second forward {second:?}; max|Δ| vs flex features \
         {d_features:.2e}, logits {d_logits:.2e}"
    );
    assert!(d_features <= 1e-3 && d_logits <= 1e-3);
    assert_eq!(top_k(&logits, 5), top_k(&r["logits"].f32s(), 5));
}

/// The `cam` scorer as the pipeline runs it (folded BatchNorms, micro-batch of the four reference photos) on
/// wgpu's default adapter against the CPU path: the same top-5 classes per photo, probabilities and saliency
/// within the tolerances above. Skipped (with a note) when there is no adapter; on CI Mesa's software Vulkan
/// driver runs it, burn's autotuned GPU kernels included.
#[cfg(feature = "wgpu")]
#[test]
fn cam_scorer_wgpu_matches_cpu() {
    use juicer::DeviceSpec;
    use juicer::decode::{DecodeConfig, Decoder};
    use juicer::sample::{Decoded, RawSample};
    use juicer::stage::BatchStage;
    use juicer::vision::{CamScorer, Classifier};

    if juicer::device::adapters().is_empty() {
        println!("SKIPPED cam_scorer_wgpu_matches_cpu: no wgpu adapter available");
        return;
    }
    let decoder = Decoder::new(DecodeConfig::default());
    let decoded = || -> Vec<Decoded> {
        PHOTOS
            .iter()
            .map(|key| {
                let image = std::fs::read(fixtures().join(format!("../gcompris/{key}.webp"))).unwrap();
                let raw = RawSample {
                    key: key.to_string(),
                    image: image.into(),
                    image_ext: "webp".into(),
                    caption: None,
                    meta: None,
                };
                decoder.decode(raw).unwrap()
            })
            .collect()
    };
    let scorer = |device: &Device| CamScorer {
        classifier: Classifier::load(None, device).unwrap(),
        patch: 16,
        cam_top: 5,
        top_k: 3,
        score_size: 0,
    };
    let wgpu = DeviceSpec::Wgpu(None).resolve().unwrap();
    let start = Instant::now();
    let on_gpu = scorer(&wgpu).process_batch(decoded());
    let first = start.elapsed();
    let on_cpu = scorer(&Device::flex()).process_batch(decoded());
    for ((g, c), key) in on_gpu.into_iter().zip(on_cpu).zip(PHOTOS) {
        let (g, c) = (g.unwrap(), c.unwrap());
        assert_eq!(top_k(&g.probs, 5), top_k(&c.probs, 5), "{key}: top-5 classes");
        let d_probs = max_abs_diff(&g.probs, &c.probs);
        let scale = c.scores.iter().fold(0f32, |m, s| m.max(s.abs())).max(1.0);
        let d_scores = max_abs_diff(&g.scores, &c.scores) / scale;
        println!(
            "{key}: wgpu vs cpu max|Δp| {d_probs:.2e}, saliency max|Δ|/max {d_scores:.2e} (first batch {first:?})"
        );
        assert!(d_probs <= 1e-3, "{key}: probabilities differ by {d_probs}");
        assert!(d_scores <= 1e-3, "{key}: saliency differs by {d_scores} of its range");
        let (gc, cc) = (g.candidates.unwrap(), c.candidates.unwrap());
        assert_eq!(gc.iter().map(|x| x.id).collect::<Vec<_>>(), cc.iter().map(|x| x.id).collect::<Vec<_>>());
    }
}
