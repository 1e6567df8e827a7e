//! Compute device selection: `cpu` (burn's pure-Rust `flex` backend), `wgpu[:N]`, `cuda[:N]` (with the `cuda`
//! feature: burn's CUDA backend, for NVIDIA servers without a Vulkan driver), or `auto`.
//!
//! `auto` takes a hardware GPU (discrete, else integrated) when wgpu finds one and the CPU backend
//! otherwise. It never picks a software adapter (Mesa lavapipe/llvmpipe report themselves as `Cpu`): on a
//! machine without a GPU those run 25-40× slower than `flex`. `wgpu` without an index forces wgpu's default
//! adapter, software or not, which is what the wgpu-vs-flex parity tests want.
//!
//! # Errors, not panics
//! burn opens a device on its first use and panics when it cannot (a `wgpu:0` on a machine whose only adapter is
//! a software driver, a `cuda:1` on a one-GPU machine). [`DeviceSpec::resolve`] checks first: a `wgpu` request
//! against the adapters wgpu lists ([`adapters`]), a `cuda` one by opening it once. A request that cannot be
//! served is an [`Error::Device`] naming what was asked, what exists and what to ask for instead.
//!
//! # CPU threads of a model replica
//! burn's CPU backend runs its kernels on a rayon pool. Left to the global pool, every model replica would spread
//! each op over all cores, and two replicas on two cores would each run on both, with most ops too small to
//! gain from it (one MobileNetV2 forward at micro-batch 1 ran 1.2× faster on 2 threads than on 1). An
//! [`IntraOp`] gives each replica its own pool of `n` threads instead: a model stage then occupies
//! `model_workers × intra_op_threads` cores, no more. Each clone of an [`IntraOp`] starts its own pool (lazily,
//! on first use, in the replica's thread), so cloning a stage per replica gives each replica its own threads.
//!
//! # Allocator arenas
//! Each epoch runs a new graph, and a graph starts new threads. glibc's malloc gives threads arenas of their own,
//! up to 8 per core, and each arena keeps its own free memory: over a 1,000,000-sample soak (100 epochs) the
//! RSS of `juicer bench` grew by 19 MiB without settling. [`cap_malloc_arenas`] caps the arenas at one per core
//! (at least 2); the `juicer` binary calls it first thing. With the cap the same soak stays flat and lower
//! (89–95 MiB against 113–132), at a CPU cost per sample within the run-to-run spread on the cam path; mimalloc,
//! also measured, stayed flat but 100 MiB higher (README, "Soak").
//!
//! Capped, a million samples through the whole graph (extract and enrich included) still crept up by 4.7 MiB,
//! decelerating, while the live heap did not grow (heaptrack, 5 against 25 epochs: peak 49.5 against 50.5 MB,
//! 9.1 MB alive at exit in both): glibc keeps freed pages inside its arenas and returns only the top of each
//! heap. [`release_free_memory`] (`malloc_trim(0)`) hands the free pages back; a [`crate::JuicerIter`] calls it
//! at most every [`TRIM_EVERY`] as it delivers batches, so RSS follows the live heap over any epoch length.
//!
//! # Headless Vulkan
//! `auto` probes wgpu's adapters, and creating a Vulkan instance loads Mesa's implicit layer
//! `VK_LAYER_MESA_device_select`, which connects to a Wayland compositor to order the GPUs for its display. On a
//! server there is none: libwayland prints `error: XDG_RUNTIME_DIR is invalid or not set in the environment.`
//! twice on stderr before juicer says anything, on every machine with Mesa's Vulkan drivers (CI's included).
//! [`quiet_headless_vulkan`] turns the layer off through its own switch (`NODEVICE_SELECT=1`) when there is no
//! session to order devices for; adapters and their order are otherwise unchanged.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{Error, Result};

/// Caps glibc's malloc arenas at the number of cores (at least 2) unless `MALLOC_ARENA_MAX` is set, in which
/// case glibc has already applied the user's value (module docs, "Allocator arenas"). Call it before the
/// program starts threads. Returns the cap it set; `None` when it set nothing (the variable is set, the C
/// library is not glibc, or glibc refused).
pub fn cap_malloc_arenas() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return None;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        let cap = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt sets one of glibc's allocator tunables; it takes the allocator's lock and has no
        // other precondition.
        let set = unsafe { libc::mallopt(libc::M_ARENA_MAX, cap) } == 1;
        set.then_some(cores)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// How often, at most, a [`crate::JuicerIter`] calls [`release_free_memory`] (module docs, "Allocator arenas").
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Returns the free memory inside the C allocator's arenas to the operating system (glibc's `malloc_trim(0)`,
/// which releases free pages anywhere in each arena, not only at its top). Returns whether glibc released
/// anything; `false` where the C library is not glibc.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes each arena's lock while it walks it; it has no precondition.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Sets `NODEVICE_SELECT=1` when the process has no desktop session (`XDG_RUNTIME_DIR` unset or empty) and
/// the user has not set the variable, so that Mesa's device-select Vulkan layer does not print libwayland's
/// errors on stderr (module docs, "Headless Vulkan"). Returns whether it set the variable.
///
/// # Safety
/// It writes the process environment, which is sound only while no other thread reads or writes it: call it
/// first thing in `main`, before the program starts threads. (Python: the package does the same with
/// `os.environ` when it is imported.)
pub unsafe fn quiet_headless_vulkan() -> bool {
    let no_session = std::env::var_os("XDG_RUNTIME_DIR").is_none_or(|v| v.is_empty());
    if !no_session || std::env::var_os("NODEVICE_SELECT").is_some() {
        return false;
    }
    // SAFETY: the caller guarantees no other thread touches the environment (see # Safety).
    unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    true
}

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
    /// CUDA (the `cuda` feature): the default device (`None`) or device N.
    Cuda(Option<usize>),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Device {
            device: s.to_string(),
            detail: "expected auto, cpu, wgpu, wgpu:N, cuda or cuda:N".into(),
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" | "flex" => Ok(DeviceSpec::Cpu),
            "wgpu" => Ok(DeviceSpec::Wgpu(None)),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            other => {
                if let Some(n) = other.strip_prefix("wgpu:") {
                    n.parse().map(|n| DeviceSpec::Wgpu(Some(n))).map_err(|_| bad())
                } else if let Some(n) = other.strip_prefix("cuda:") {
                    n.parse().map(|n| DeviceSpec::Cuda(Some(n))).map_err(|_| bad())
                } else {
                    Err(bad())
                }
            }
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
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// One adapter wgpu reports: what [`DeviceSpec::resolve`] checks a `wgpu` request against and names in its
/// errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// The adapter's name as its driver reports it (`NVIDIA H200`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// What kind of adapter it is: `discrete`, `integrated`, `virtual`, `cpu` (a software driver) or `other`.
    pub kind: &'static str,
    /// The graphics API it was found through (`Vulkan`, `Metal`, `Dx12`).
    pub api: String,
}

impl fmt::Display for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.kind, self.api)
    }
}

/// Every adapter wgpu finds on Vulkan, Metal and DX12, the graphics APIs burn's wgpu kernels run on (probing GL
/// as well would only add start-up time and could list an adapter burn cannot use), in wgpu's order. Probed once
/// per process; empty without the `wgpu` feature or without a Vulkan loader.
pub fn adapters() -> &'static [Adapter] {
    static ADAPTERS: std::sync::OnceLock<Vec<Adapter>> = std::sync::OnceLock::new();
    ADAPTERS.get_or_init(|| {
        #[cfg(feature = "wgpu")]
        {
            let descriptor = wgpu::InstanceDescriptor {
                backends: wgpu::Backends::PRIMARY,
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            };
            let instance = wgpu::Instance::new(descriptor);
            futures::executor::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
                .iter()
                .map(|a| {
                    let info = a.get_info();
                    let kind = match info.device_type {
                        wgpu::DeviceType::DiscreteGpu => "discrete",
                        wgpu::DeviceType::IntegratedGpu => "integrated",
                        wgpu::DeviceType::VirtualGpu => "virtual",
                        wgpu::DeviceType::Cpu => "cpu",
                        wgpu::DeviceType::Other => "other",
                    };
                    Adapter { name: info.name, kind, api: format!("{:?}", info.backend) }
                })
                .collect()
        }
        #[cfg(not(feature = "wgpu"))]
        Vec::new()
    })
}

/// Kinds of hardware adapters wgpu reports: `(discrete, integrated)` counts. Zero without the `wgpu` feature.
pub fn hardware_gpus() -> (usize, usize) {
    let count = |kind: &str| adapters().iter().filter(|a| a.kind == kind).count();
    (count("discrete"), count("integrated"))
}

/// The adapters as one line for an error message: `found: A (discrete, Vulkan); B (cpu, Vulkan)`, or why there
/// are none.
fn found_adapters(list: &[Adapter]) -> String {
    if list.is_empty() {
        return "wgpu finds no adapter (no GPU driver, or no Vulkan loader libvulkan.so.1 on the library path)"
            .to_string();
    }
    let names: Vec<String> = list.iter().map(Adapter::to_string).collect();
    format!("wgpu finds: {}", names.join("; "))
}

/// Checks a `wgpu` request against the adapters found: `wgpu` needs one of any kind, `wgpu:N` at least `N + 1`
/// discrete GPUs (burn's numbering: the N-th discrete GPU). The error names what was asked and what exists, and
/// what to ask for instead.
pub fn check_wgpu_request(index: Option<usize>, list: &[Adapter]) -> Result<()> {
    let spec = DeviceSpec::Wgpu(index);
    let err = |detail: String| Err(Error::Device { device: spec.to_string(), detail });
    match index {
        None if list.is_empty() => err(found_adapters(list)),
        None => Ok(()),
        Some(n) => {
            let discrete = list.iter().filter(|a| a.kind == "discrete").count();
            if n < discrete {
                return Ok(());
            }
            let hint = if list.is_empty() {
                "use --device cpu".to_string()
            } else if discrete > 0 {
                format!("wgpu:0 to wgpu:{} are the discrete GPUs; `wgpu` takes the default adapter", discrete - 1)
            } else {
                "`wgpu` takes the default adapter whatever its kind; `cpu` the CPU backend".to_string()
            };
            err(format!("no discrete GPU #{n} ({discrete} found); {}; {hint}", found_adapters(list)))
        }
    }
}

/// The intra-op thread pool of one model replica on the CPU (module docs). `n = 0`: the global pool.
#[derive(Debug, Default)]
pub struct IntraOp {
    n: usize,
    pool: std::sync::OnceLock<Option<rayon::ThreadPool>>,
}

impl Clone for IntraOp {
    /// A clone has the same thread count and a pool of its own.
    fn clone(&self) -> Self {
        Self::new(self.n)
    }
}

impl IntraOp {
    /// A pool of `n` threads, started on first use (`0`: run on the global pool).
    pub fn new(n: usize) -> Self {
        Self { n, pool: std::sync::OnceLock::new() }
    }

    /// The thread count (`0`: the global pool).
    pub fn threads(&self) -> usize {
        self.n
    }

    /// Runs `f` with the backend's kernels on this replica's threads. If the pool cannot be started (the OS
    /// refuses a thread), `f` runs on the global pool: slower, never wrong.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let pool = self.pool.get_or_init(|| {
            (self.n > 0)
                .then(|| {
                    rayon::ThreadPoolBuilder::new().num_threads(self.n).thread_name(|i| format!("intra-op-{i}")).build()
                })
                .and_then(|p| p.ok())
        });
        match pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }
}

/// Intra-op threads per model replica when the setting is 0: the cores shared out among the `model_workers`
/// replicas (at least 1) on the CPU; 0 (the global pool, unused by the GPU backend) on a GPU.
pub fn auto_intra_op_threads(device: &Device, cores: usize, model_workers: usize) -> usize {
    if *device == Device::flex() { (cores / model_workers.max(1)).max(1) } else { 0 }
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
            DeviceSpec::Wgpu(index) => {
                // burn panics on first use of an adapter that does not exist: check before handing one out.
                check_wgpu_request(index, adapters())?;
                let kind = match index {
                    None => burn::tensor::DeviceKind::DefaultDevice,
                    Some(n) => burn::tensor::DeviceKind::DiscreteGpu(n),
                };
                Ok(Device::wgpu(kind))
            }
            #[cfg(not(feature = "wgpu"))]
            DeviceSpec::Wgpu(_) => Err(Error::Device {
                device: self.to_string(),
                detail: "juicer was built without the `wgpu` feature".into(),
            }),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => cuda_device(n.unwrap_or(0)),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(Error::Device {
                device: self.to_string(),
                detail: "juicer was built without the `cuda` feature (cargo build --features cuda)".into(),
            }),
        }
    }
}

/// `cuda:N`, opened and checked with one small allocation: burn panics on first use of a CUDA device that does
/// not exist or a driver that cannot start, and that panic becomes an [`Error::Device`] here, once, instead of a
/// backtrace in a model thread.
#[cfg(feature = "cuda")]
fn cuda_device(n: usize) -> Result<Device> {
    let device = Device::cuda(n);
    let probe = device.clone();
    let opened = std::panic::catch_unwind(move || {
        burn::tensor::Tensor::<1>::zeros([1], &probe).into_data();
    });
    match opened {
        Ok(()) => Ok(device),
        Err(panic) => {
            let why = crate::error::panic_message(&*panic).unwrap_or_else(|| "the CUDA runtime failed to start".into());
            Err(Error::Device {
                device: DeviceSpec::Cuda(Some(n)).to_string(),
                detail: format!(
                    "cannot open CUDA device {n}: {why} (is the NVIDIA driver loaded? `nvidia-smi` lists the devices)"
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(name: &str, kind: &'static str) -> Adapter {
        Adapter { name: name.into(), kind, api: "Vulkan".into() }
    }

    #[test]
    fn wgpu_requests_are_checked_against_the_adapters_found() {
        let lavapipe = [adapter("llvmpipe (LLVM 15.0.6, 256 bits)", "cpu")];
        let two = [adapter("NVIDIA H200", "discrete"), adapter("NVIDIA H200", "discrete"), lavapipe[0].clone()];
        assert!(check_wgpu_request(None, &lavapipe).is_ok(), "`wgpu` takes the default adapter, software or not");
        assert!(check_wgpu_request(Some(1), &two).is_ok());

        let Error::Device { device, detail } = check_wgpu_request(Some(0), &lavapipe).unwrap_err() else {
            panic!("a device error")
        };
        assert_eq!(device, "wgpu:0");
        assert!(detail.contains("no discrete GPU #0 (0 found)"), "{detail}");
        assert!(detail.contains("llvmpipe (LLVM 15.0.6, 256 bits) (cpu, Vulkan)"), "names what exists: {detail}");
        assert!(detail.contains("`wgpu` takes the default adapter"), "says what to ask for: {detail}");

        let Error::Device { detail, .. } = check_wgpu_request(Some(2), &two).unwrap_err() else { panic!() };
        assert!(detail.contains("no discrete GPU #2 (2 found)") && detail.contains("wgpu:0 to wgpu:1"), "{detail}");

        for index in [None, Some(0)] {
            let Error::Device { detail, .. } = check_wgpu_request(index, &[]).unwrap_err() else { panic!() };
            assert!(detail.contains("no Vulkan loader"), "{detail}");
        }
    }

    #[test]
    fn parse_specs() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("wgpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu(None));
        assert_eq!("wgpu:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu(Some(1)));
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(Some(1)));
        assert_eq!(DeviceSpec::Cuda(None).to_string(), "cuda");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("wgpu:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn intra_op_threads_share_out_the_cores_on_the_cpu() {
        let cpu = Device::flex();
        assert_eq!(auto_intra_op_threads(&cpu, 2, 2), 1);
        assert_eq!(auto_intra_op_threads(&cpu, 16, 2), 8);
        assert_eq!(auto_intra_op_threads(&cpu, 1, 2), 1);
        assert_eq!(auto_intra_op_threads(&cpu, 3, 0), 3);
    }

    #[test]
    fn each_clone_runs_on_threads_of_its_own() {
        let a = IntraOp::new(1);
        let b = a.clone();
        let name = |p: &IntraOp| p.install(|| (rayon::current_num_threads(), std::thread::current().id()));
        let (na, ta) = name(&a);
        let (nb, tb) = name(&b);
        assert_eq!((na, nb), (1, 1), "one thread each");
        assert_ne!(ta, tb, "two clones, two pools");
        assert_eq!(name(&a).1, ta, "a pool is started once");
        assert_eq!(IntraOp::new(0).install(|| 7), 7);
    }
}
