//! burn models: torchvision MobileNetV2 (the embedded default for the `cam` scorer and class extraction) and a
//! HuggingFace-layout ViT (the `attention` scorer).

pub mod mobilenet_v2;
pub mod vit;
