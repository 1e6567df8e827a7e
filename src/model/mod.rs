//! burn models: torchvision MobileNetV2 (the embedded default for the `cam` scorer and class extraction),
//! EfficientNet-Lite0/1/2 ([`efficientnet_lite`], the stronger class head `--classifier` selects), a
//! HuggingFace-layout ViT (the `attention` scorer) and a small trainable CLIP over juiced batches ([`clip`]: kept
//! patches with their grid positions, CLIP tokens, contrastive loss; the `train_clip` example and the step bench).
//! [`safetensors`] is the one reader of the weights' container framing that the models share; [`depthwise`] and
//! [`pointwise`] are MobileNetV2's depthwise and 1×1 layers as host-memory kernels for the CPU backend, and
//! [`depthwise_same`] EfficientNet-Lite's k×k depthwise layers (TensorFlow padding) likewise.

pub mod clip;
pub mod depthwise;
pub mod depthwise_same;
pub mod efficientnet_lite;
pub mod mobilenet_v2;
pub mod pointwise;
pub mod safetensors;
pub mod vit;
