//! Compute device selection: `cpu` (burn's pure-Rust `flex` backend), `wgpu[:N]`, or `auto`.
//!
//! `auto` takes a hardware GPU (discrete, else integrated) when wgpu finds one and the CPU backend
//! otherwise. It never picks a software adapter (Mesa lavapipe/llvmpipe report themselves as `Cpu`): on a
//! machine without a GPU those run 25-40× slower than `flex`. `wgpu` without an index forces wgpu's default
//! adapter, software or not, which is what the wgpu-vs-flex parity tests want.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{Error, Result};

/// A device request as the user writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// A hardware GPU when there is one, else the CPU backend.
    #[default]
    Auto,
    /// burn's `flex` CPU backend.
    Cpu,
    /// wgpu: the default adapter (`None`) or the N-th discrete GPU.
    Wgpu(Option<usize>),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Device { device: s.to_string(), detail: "expected auto, cpu, wgpu or wgpu:N".into() };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" | "flex" => Ok(DeviceSpec::Cpu),
            "wgpu" => Ok(DeviceSpec::Wgpu(None)),
            other => match other.strip_prefix("wgpu:") {
                Some(n) => n.parse().map(|n| DeviceSpec::Wgpu(Some(n))).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Wgpu(None) => f.write_str("wgpu"),
            DeviceSpec::Wgpu(Some(n)) => write!(f, "wgpu:{n}"),
        }
    }
}

/// Kinds of hardware adapters wgpu reports: `(discrete, integrated)` counts. Zero without the `wgpu` feature.
pub fn hardware_gpus() -> (usize, usize) {
    #[cfg(feature = "wgpu")]
    {
        // Vulkan, Metal and DX12 only, the backends burn's wgpu kernels run on; probing GL (EGL) as well would
        // only add start-up time and could count an adapter burn cannot use.
        let descriptor = wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        };
        let instance = wgpu::Instance::new(descriptor);
        let adapters = futures::executor::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
        let count = |t: wgpu::DeviceType| adapters.iter().filter(|a| a.get_info().device_type == t).count();
        (count(wgpu::DeviceType::DiscreteGpu), count(wgpu::DeviceType::IntegratedGpu))
    }
    #[cfg(not(feature = "wgpu"))]
    {
        (0, 0)
    }
}

impl DeviceSpec {
    /// The burn device for this request. `Auto` resolves to a concrete choice here.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::flex()),
            DeviceSpec::Auto => {
                let (discrete, integrated) = hardware_gpus();
                if discrete + integrated > 0 { DeviceSpec::Wgpu(None).resolve() } else { Ok(Device::flex()) }
            }
            #[cfg(feature = "wgpu")]
            DeviceSpec::Wgpu(None) => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "wgpu")]
            DeviceSpec::Wgpu(Some(n)) => Ok(Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(n))),
            #[cfg(not(feature = "wgpu"))]
            DeviceSpec::Wgpu(_) => Err(Error::Device {
                device: self.to_string(),
                detail: "juicer was built without the `wgpu` feature".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("wgpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu(None));
        assert_eq!("wgpu:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu(Some(1)));
        assert!("cuda".parse::<DeviceSpec>().is_err());
        assert!("wgpu:x".parse::<DeviceSpec>().is_err());
    }
}
