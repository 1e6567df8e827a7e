//! `juicer._juicer`: the pyo3 layer under the `juicer` Python package (python/python/juicer).
//!
//! A thin layer over the crate's builder and iterator; everything a trainer sees as Python (the
//! `IterableDataset`, `state_dict`, dicts of numpy arrays or torch tensors) is in `juicer/__init__.py`.
//!
//! - [`Loader`] wraps a [`Juicer`] whose batcher is the crate's host-side [`ArrayBatcher`]: batches are plain
//!   `Vec`s, never burn tensors. Keyword options are parsed here ([`options`]), each error naming its option.
//! - [`Epoch`] is one epoch in progress (a [`JuicerIter`]). `__next__` waits for the next batch with the GIL
//!   released: the graph's threads never need the GIL, and a Python thread waiting on juicer never blocks them.
//! - [`Array`] hands one batch buffer to Python **without a copy**: it owns the `Vec` and exposes it through
//!   numpy's array interface (address, type, shape), so `numpy.asarray(array)` is a view of the Rust allocation
//!   and `torch.from_numpy` of that a view again. The `Vec` is freed when the last view goes. The interface is
//!   plain Python data, so the module builds for CPython's stable ABI (one abi3 wheel for 3.9 and later).
//! - Fork safety: juicer's threads do not survive `fork()`. The first process that builds a loader owns the
//!   module; a forked child that builds or iterates one gets a `RuntimeError` saying what to do instead, never a
//!   hang on a thread that does not exist.
//!
//! Errors: the crate's [`juicer::Error`] becomes `juicer.JuicerError` with the same message (a bad weights file
//! names the tensor, a missing shard names the shard); option errors are `TypeError`/`ValueError` naming the
//! option.
//!
//! Every item here is private (Python sees the module, not the Rust items): read these docs with
//! `cargo doc -p juicer-python --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

use std::ffi::c_void;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use juicer::{ArrayBatcher, Class, HostBatch, Juicer, JuicerIter, LoaderState, RawSample};
use pyo3::exceptions::{PyException, PyRuntimeError, PyStopIteration};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

mod options;

pyo3::create_exception!(
    _juicer,
    JuicerError,
    PyException,
    "An error of juicer's core: bad configuration, an unreadable source, bad weights, a bad resume state."
);

/// The crate's error as a `JuicerError` with the same message.
fn py_err(e: juicer::Error) -> PyErr {
    JuicerError::new_err(e.to_string())
}

/// The process that first built a loader (0: none yet). A forked child inherits it and sees a different pid.
static OWNER: AtomicU32 = AtomicU32::new(0);

/// Refuses to run in a forked child of the process that started juicer.
fn check_fork() -> PyResult<()> {
    let me = std::process::id();
    match OWNER.compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => Ok(()),
        Err(owner) if owner == me => Ok(()),
        Err(owner) => Err(PyRuntimeError::new_err(format!(
            "juicer is used in process {me}, a fork of process {owner} that started juicer's threads, and \
             threads do not survive fork(). Iterate the loader in the main process, with \
             DataLoader(loader, batch_size=None, num_workers=0): juicer runs its own decode and model threads. \
             If worker processes are needed, start them with the 'spawn' or 'forkserver' multiprocessing context \
             (DataLoader(..., multiprocessing_context='spawn'))"
        ))),
    }
}

/// The loader: a [`Juicer`] producing host-side batches.
#[pyclass(module = "juicer._juicer", frozen)]
struct Loader {
    juicer: Juicer<HostBatch>,
    /// The state after the last batch of the newest epoch iterator, until `load_state`/`set_epoch` replace it.
    current: std::sync::Arc<Mutex<Option<LoaderState>>>,
}

#[pymethods]
impl Loader {
    /// `Loader(sources, **options)`: see `juicer.Loader` for the options.
    #[new]
    #[pyo3(signature = (sources, **options))]
    fn new(py: Python<'_>, sources: Vec<String>, options: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        check_fork()?;
        let builder = options::builder(sources, options)?;
        let juicer = py.detach(|| builder.build_with(ArrayBatcher { budget: None })).map_err(py_err)?;
        Ok(Self { juicer, current: Default::default() })
    }

    /// A juicer without sources, for `juice()` only (`Loader.inline(**options)`).
    #[staticmethod]
    #[pyo3(signature = (**options))]
    fn inline(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        check_fork()?;
        let builder = options::builder(Vec::new(), options)?;
        let juicer = py.detach(|| builder.build_inline(ArrayBatcher { budget: None })).map_err(py_err)?;
        Ok(Self { juicer, current: Default::default() })
    }

    /// Starts the next epoch (or continues the loaded state's) and returns its iterator.
    fn iter(&self, py: Python<'_>) -> PyResult<Epoch> {
        check_fork()?;
        let iter = py.detach(|| self.juicer.iter()).map_err(py_err)?;
        *lock(&self.current)? = Some(iter.state().clone());
        Ok(Epoch { iter: Mutex::new(Some(iter)), current: self.current.clone() })
    }

    /// The epoch the next `iter()` runs.
    fn next_epoch(&self) -> PyResult<u64> {
        self.juicer.next_epoch().map_err(py_err)
    }

    /// Makes the next `iter()` run `epoch` (a loaded state of that epoch continues).
    fn set_epoch(&self, epoch: u64) -> PyResult<()> {
        self.juicer.set_epoch(epoch).map_err(py_err)?;
        *lock(&self.current)? = None;
        Ok(())
    }

    /// Batches this rank yields in `epoch` (counts the shards' samples once, if no manifest gives them).
    fn epoch_batches(&self, py: Python<'_>, epoch: u64) -> PyResult<u64> {
        py.detach(|| self.juicer.epoch_batches(epoch)).map_err(py_err)
    }

    /// The checkpoint as JSON: the state after the last batch the newest epoch iterator returned, or the state
    /// the next `iter()` starts from when no epoch has run since the last `load_state`/`set_epoch`.
    fn state_json(&self) -> PyResult<String> {
        let state = match lock(&self.current)?.clone() {
            Some(s) => s,
            None => self.juicer.next_state().map_err(py_err)?,
        };
        serde_json::to_string(&state).map_err(|e| JuicerError::new_err(format!("serialising the state: {e}")))
    }

    /// Makes the next `iter()` continue exactly from a state `state_json` returned (validated first).
    fn load_state_json(&self, py: Python<'_>, state: &str) -> PyResult<()> {
        let state = LoaderState::from_json(state.as_bytes()).map_err(py_err)?;
        py.detach(|| self.juicer.resume(state)).map_err(py_err)?;
        *lock(&self.current)? = None;
        Ok(())
    }

    /// This process's rank.
    #[getter]
    fn rank(&self) -> usize {
        self.juicer.world().rank
    }

    /// The number of ranks.
    #[getter]
    fn world_size(&self) -> usize {
        self.juicer.world().world_size
    }

    /// Samples per batch.
    #[getter]
    fn batch_size(&self) -> usize {
        self.juicer.config().batch_size
    }

    /// Juices in-memory samples: `images` (encoded bytes), `captions`, `keys`, as one batch, on the calling
    /// thread's time (the GIL released). Returns `(batch, dropped)`, `dropped` a list of `(key, reason, detail)`.
    fn juice(
        &self,
        py: Python<'_>,
        images: Vec<Bound<'_, PyBytes>>,
        captions: Vec<Option<String>>,
        keys: Vec<String>,
    ) -> PyResult<(Batch, Vec<Dropped>)> {
        check_fork()?;
        if captions.len() != images.len() || keys.len() != images.len() {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{} images, {} captions and {} keys: one of each per sample",
                images.len(),
                captions.len(),
                keys.len()
            )));
        }
        let samples: Vec<RawSample> = images
            .into_iter()
            .zip(captions)
            .zip(keys)
            .map(|((image, caption), key)| RawSample::in_memory(key, image.as_bytes().to_vec(), caption))
            .collect();
        let (batch, dropped) = py.detach(|| self.juicer.juice(samples)).map_err(py_err)?;
        let dropped = dropped.into_iter().map(|e| (e.key, e.reason.as_str().to_string(), e.detail)).collect();
        Ok((Batch::from(batch), dropped))
    }
}

fn lock<T>(m: &Mutex<T>) -> PyResult<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| PyRuntimeError::new_err("juicer loader lock poisoned by an earlier panic"))
}

/// One epoch in progress. Iterating it yields [`Batch`]es; dropping it (or `close()`) stops the graph and joins
/// its threads.
#[pyclass(module = "juicer._juicer", frozen)]
struct Epoch {
    iter: Mutex<Option<JuicerIter<HostBatch>>>,
    current: std::sync::Arc<Mutex<Option<LoaderState>>>,
}

#[pymethods]
impl Epoch {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next batch, waited for with the GIL released.
    fn __next__(&self, py: Python<'_>) -> PyResult<Batch> {
        check_fork()?;
        let (next, state) = py.detach(|| {
            let mut guard = self.iter.lock().map_err(|_| PyRuntimeError::new_err("epoch lock poisoned"))?;
            let Some(iter) = guard.as_mut() else { return Ok((None, None)) };
            let next = iter.next();
            Ok::<_, PyErr>((next, Some(iter.state().clone())))
        })?;
        if let Some(state) = state {
            *lock(&self.current)? = Some(state);
        }
        match next {
            Some(Ok(batch)) => Ok(Batch::from(batch)),
            Some(Err(e)) => Err(py_err(e)),
            None => Err(PyStopIteration::new_err(())),
        }
    }

    /// Counters of this epoch so far, as JSON (`juicer.Summary` in Rust).
    fn summary_json(&self) -> PyResult<String> {
        let guard = lock(&self.iter)?;
        let iter = guard.as_ref().ok_or_else(|| PyRuntimeError::new_err("the epoch was closed"))?;
        serde_json::to_string(&iter.summary()).map_err(|e| JuicerError::new_err(format!("summary: {e}")))
    }

    /// Samples dropped since the last call: `(key, reason, detail)` each.
    fn take_dropped(&self) -> PyResult<Vec<Dropped>> {
        let mut guard = lock(&self.iter)?;
        let iter = guard.as_mut().ok_or_else(|| PyRuntimeError::new_err("the epoch was closed"))?;
        Ok(iter.take_dropped().into_iter().map(|e| (e.key, e.reason.as_str().to_string(), e.detail)).collect())
    }

    /// Stops the graph and joins its threads (the GIL released while they finish).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let iter = lock(&self.iter)?.take();
        py.detach(move || drop(iter));
        Ok(())
    }
}

/// One host batch: the arrays (each an [`Array`], handed over once) and the per-sample lists.
#[pyclass(module = "juicer._juicer", frozen)]
struct Batch {
    arrays: Mutex<Option<[Array; 5]>>,
    host: HostBatch,
}

impl From<HostBatch> for Batch {
    fn from(mut b: HostBatch) -> Self {
        let (n, k, d) = b.shape;
        let ctx = juicer::sample::CONTEXT;
        let arrays = [
            Array::new(Data::F32(std::mem::take(&mut b.patches)), &[n, k, d]),
            Array::new(Data::I64(std::mem::take(&mut b.positions)), &[n, k]),
            Array::new(Data::Bool(std::mem::take(&mut b.patch_mask)), &[n, k]),
            Array::new(Data::I64(std::mem::take(&mut b.tokens)), &[n, ctx]),
            Array::new(Data::Bool(std::mem::take(&mut b.token_mask)), &[n, ctx]),
        ];
        Self { arrays: Mutex::new(Some(arrays)), host: b }
    }
}

fn classes_py<'py>(py: Python<'py>, classes: &[Vec<Class>]) -> PyResult<Bound<'py, PyList>> {
    let rows = PyList::empty(py);
    for row in classes {
        let list = PyList::empty(py);
        for c in row {
            let d = PyDict::new(py);
            d.set_item("name", &c.name)?;
            d.set_item("wnid", &c.wnid)?;
            d.set_item("id", c.id)?;
            d.set_item("prob", c.prob)?;
            list.append(d)?;
        }
        rows.append(list)?;
    }
    Ok(rows)
}

#[pymethods]
impl Batch {
    /// The five arrays, `(patches, positions, patch_mask, tokens, token_mask)`, each an object exposing its
    /// buffer through numpy's array interface (numpy.asarray views it without a copy). Handed over once: the batch keeps no reference.
    fn take_arrays(&self) -> PyResult<(Array, Array, Array, Array, Array)> {
        let [a, b, c, d, e] = lock(&self.arrays)?
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the arrays of this batch were taken already"))?;
        Ok((a, b, c, d, e))
    }

    /// Everything else, as a dict of lists: keys, captions, enriched, classes, added, kept, scores, token_ids,
    /// grid, patch.
    fn lists<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let h = &self.host;
        let d = PyDict::new(py);
        d.set_item("keys", &h.keys)?;
        d.set_item("captions", &h.captions)?;
        d.set_item("enriched", &h.enriched)?;
        d.set_item("classes", classes_py(py, &h.classes)?)?;
        d.set_item("added", classes_py(py, &h.added)?)?;
        d.set_item("kept", &h.kept)?;
        d.set_item("scores", &h.scores)?;
        d.set_item("token_ids", &h.token_ids)?;
        d.set_item("grid", h.grid)?;
        d.set_item("patch", h.patch)?;
        Ok(d)
    }

    fn __len__(&self) -> usize {
        self.host.len()
    }
}

/// The element buffer of an [`Array`].
enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl Data {
    /// The first element's address and numpy's type string of the elements.
    fn parts(&mut self) -> (*mut c_void, &'static str) {
        match self {
            Data::F32(v) => (v.as_mut_ptr().cast(), "<f4"),
            Data::I64(v) => (v.as_mut_ptr().cast(), "<i8"),
            // `bool` is one byte holding 0 or 1 in Rust, as numpy's `|b1`.
            Data::Bool(v) => (v.as_mut_ptr().cast(), "|b1"),
        }
    }
}

/// One batch buffer, owned here and lent to numpy through its array interface (writable, C-contiguous).
#[pyclass(module = "juicer._juicer")]
struct Array {
    data: Data,
    shape: Vec<usize>,
}

impl Array {
    fn new(data: Data, shape: &[usize]) -> Self {
        Self { data, shape: shape.to_vec() }
    }
}

#[pymethods]
impl Array {
    /// The address of the first element: equal to `numpy.asarray(a).ctypes.data` when no copy was made.
    #[getter]
    fn address(&mut self) -> usize {
        self.data.parts().0 as usize
    }

    /// numpy's array interface (version 3): `numpy.asarray(a)` makes a writable, C-contiguous view of this
    /// buffer, not a copy, whose `base` is this object, so the buffer lives as long as any view of it. Plain
    /// Python data: it works under CPython's stable ABI (the abi3 wheel, 3.9 and later), where the buffer
    /// protocol would need 3.11.
    #[getter]
    fn __array_interface__<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (ptr, typestr) = self.data.parts();
        let d = PyDict::new(py);
        d.set_item("version", 3)?;
        d.set_item("shape", PyTuple::new(py, &self.shape)?)?;
        d.set_item("typestr", typestr)?;
        // (address, read-only flag)
        d.set_item("data", (ptr as usize, false))?;
        d.set_item("strides", py.None())?;
        Ok(d)
    }
}

/// Test and benchmark hook: one epoch of the crate's own Rust loader (burn tensors, [`juicer::JuicedBatcher`])
/// for the same sources and options, each batch as `(keys, patches, positions, patch_mask, tokens,
/// token_mask)` with the arrays as raw little-endian bytes of the tensors' data. What the Python `Loader`
/// yields must equal it bit for bit.
#[pyfunction]
#[pyo3(signature = (sources, **options))]
fn _reference_batches(
    py: Python<'_>,
    sources: Vec<String>,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<Vec<RefBatch>> {
    check_fork()?;
    let builder = options::builder(sources, options)?;
    py.detach(|| {
        let loader = builder.build()?;
        let mut out = Vec::new();
        for b in loader.iter()? {
            let b = b?;
            let bytes = |d: burn::tensor::TensorData| d.as_bytes().to_vec();
            out.push((
                b.keys.clone(),
                bytes(b.patches.to_data()),
                bytes(b.positions.to_data().convert::<i64>()),
                b.patch_mask.to_data().try_to_vec::<bool>().map_err(tensor_err)?,
                bytes(b.tokens.to_data().convert::<i64>()),
                b.token_mask.to_data().try_to_vec::<bool>().map_err(tensor_err)?,
            ));
        }
        Ok::<_, juicer::Error>(out)
    })
    .map_err(py_err)
}

/// A dropped sample as Python sees it: `(key, reason, detail)`.
type Dropped = (String, String, String);

type RefBatch = (Vec<String>, Vec<u8>, Vec<u8>, Vec<bool>, Vec<u8>, Vec<bool>);

fn tensor_err(e: impl std::fmt::Debug) -> juicer::Error {
    juicer::Error::Config(vec![format!("reading a tensor back: {e:?}")])
}

/// Benchmark hook: iterates one epoch of a `Loader` built from the same options in Rust, without Python (the
/// GIL released throughout), and returns `(samples, batches, seconds)`: the baseline of the Python iteration
/// overhead (`benches/python_overhead.py`).
#[pyfunction]
#[pyo3(signature = (sources, **options))]
fn _rust_epoch(py: Python<'_>, sources: Vec<String>, options: Option<&Bound<'_, PyDict>>) -> PyResult<(u64, u64, f64)> {
    check_fork()?;
    let builder = options::builder(sources, options)?;
    py.detach(|| {
        let loader = builder.build_with(ArrayBatcher { budget: None })?;
        let start = std::time::Instant::now();
        let (mut samples, mut batches) = (0u64, 0u64);
        for b in loader.iter()? {
            samples += b?.len() as u64;
            batches += 1;
        }
        Ok::<_, juicer::Error>((samples, batches, start.elapsed().as_secs_f64()))
    })
    .map_err(py_err)
}

#[pymodule]
fn _juicer(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_reference_batches, m)?)?;
    m.add_function(wrap_pyfunction!(_rust_epoch, m)?)?;
    m.add_class::<Loader>()?;
    m.add_class::<Epoch>()?;
    m.add_class::<Batch>()?;
    m.add_class::<Array>()?;
    m.add("JuicerError", m.py().get_type::<JuicerError>())?;
    m.add("OPTIONS", options::NAMES.to_vec())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
