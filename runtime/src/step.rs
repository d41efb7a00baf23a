//! The interface every backend implements: bind named host tensors, run one
//! decode step at given runtime dims, get the outputs back.
//!
//! Names are the graph's input names (weights under their Hugging Face
//! names, `token_ids`, `positions`, `cache.{layer}.k_ctx`, …) and output
//! names (`logits`, `layer.{layer}.k_new`, …), as listed in the manifest's
//! buffer table. Data crosses the interface as `f32` (integers as exact
//! `f32` values below 2^24); a backend converts to the storage dtype.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// A dense row-major host tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `shape` holding `data`; `None` when the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(Self { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self { shape, data: vec![0.0; n] }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Checks that the shape holds as many values as `data` (for binding
    /// it as input `name`).
    pub fn check(&self, name: &str) -> Result<(), StepError> {
        let n = self.shape.iter().product::<usize>();
        if n != self.data.len() {
            return Err(StepError::Backend(format!(
                "`{name}`: shape {:?} holds {n} values but {} were given",
                self.shape,
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// Errors a backend reports. Messages name the buffer, kernel or dim at fault.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("input `{0}` is not bound")]
    Unbound(String),
    #[error("`{name}`: expected shape {expected:?} at these dims, got {got:?}")]
    Shape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("no buffer named `{0}` in this artifact")]
    UnknownBuffer(String),
    #[error("runtime dims: {0}")]
    Dims(String),
    #[error("{0}")]
    Backend(String),
}

/// One compiled decode step on some device.
pub trait Step {
    /// The runtime dims the step takes (`b`, `m_c`, `m_d`, …), in order.
    fn runtime_dims(&self) -> Vec<String>;

    /// Binds input `name` to `tensor` until it is bound again. A backend may
    /// keep it on the device (weights are bound once).
    fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError>;

    /// Runs one step with every input bound, at `dims` (each runtime dim),
    /// and returns the outputs named in `wanted`, or every output when it
    /// is `None` (a backend may skip reading the others back: the CUDA
    /// backend downloads only these; one that returns more has them
    /// dropped by [`Step::run_for`]). Every output stays available to
    /// [`Step::append_rows`]. The one method a backend
    /// must run steps with; [`Step::run`] and [`Step::run_for`] call it.
    fn run_selected(
        &mut self,
        dims: &BTreeMap<String, i64>,
        wanted: Option<&[&str]>,
    ) -> Result<HashMap<String, HostTensor>, StepError>;

    /// Runs one step (see [`Step::run_selected`]) and returns every output
    /// by name.
    fn run(&mut self, dims: &BTreeMap<String, i64>) -> Result<HashMap<String, HostTensor>, StepError> {
        self.run_selected(dims, None)
    }

    /// [`Step::run`], returning only the outputs named in `wanted`.
    fn run_for(
        &mut self,
        dims: &BTreeMap<String, i64>,
        wanted: &[&str],
    ) -> Result<HashMap<String, HostTensor>, StepError> {
        let mut outputs = self.run_selected(dims, Some(wanted))?;
        outputs.retain(|name, _| wanted.contains(&name.as_str()));
        Ok(outputs)
    }

    /// Keeps decode cache `name` — an input with a pitch
    /// ([`crate::manifest::Pitch`]) — inside the backend: it becomes empty
    /// (`shape`: its dense shape with 0 rows) with room for `capacity` rows
    /// (it grows when they run out), and [`Step::append_rows`] adds a row
    /// after each step without re-binding it. Binding it again with
    /// [`Step::bind`] makes it an ordinary input. Returns `false` when the
    /// backend keeps no caches (the caller then binds the dense cache every
    /// step).
    fn reserve_rows(&mut self, name: &str, shape: &[usize], capacity: usize) -> Result<bool, StepError> {
        let _ = (name, shape, capacity);
        Ok(false)
    }

    /// Drops decode cache `name` kept by [`Step::reserve_rows`]: its rows,
    /// its memory, and its hold on its dim's capacity (which the caches
    /// along one dim share: once none is kept, the next reservation along
    /// it gets the room it asks for, not the largest any cache had). It is
    /// unbound afterwards. Nothing happens where `name` is not kept (the
    /// provided version: a backend that keeps no caches).
    fn release_rows(&mut self, name: &str) -> Result<(), StepError> {
        let _ = name;
        Ok(())
    }

    /// Makes room, before a run of steps, for everything a step at `dims`
    /// needs besides its inputs (intermediates, outputs): `dims` is the
    /// largest point of the steps to come (a decode loop's last), so that
    /// they run without allocating or faulting in fresh memory, the first
    /// as fast as the others. Inputs need not be bound yet. The provided
    /// version does nothing; a backend that allocates by the step
    /// overrides it.
    fn reserve(&mut self, dims: &BTreeMap<String, i64>) -> Result<(), StepError> {
        let _ = dims;
        Ok(())
    }

    /// Appends output `rows` of the last [`Step::run`] (the cache's shape
    /// with `r` on the rows axis, possibly with leading axes of size 1: a
    /// decode step's `[b, g, 1, k]`, a prefill step's `[1, g, n, k]` for a
    /// context `[g, m_c, k]`) to cache `name`, kept by
    /// [`Step::reserve_rows`]: its rows axis grows by `r`.
    fn append_rows(&mut self, name: &str, rows: &str) -> Result<(), StepError> {
        Err(StepError::Backend(format!("this backend keeps no caches (appending `{rows}` to `{name}`)")))
    }

    /// The rows of cache `name` (kept by [`Step::reserve_rows`]) so far, dense.
    fn read_rows(&mut self, name: &str) -> Result<HostTensor, StepError> {
        Err(StepError::Backend(format!("this backend keeps no caches (reading `{name}`)")))
    }

    /// Runs the step once untimed (warm-up; a backend may skip it when its
    /// last step ran at the same dims), then `repeats` times, and returns the
    /// time of each timed run in milliseconds. Outputs are discarded; inputs
    /// stay bound.
    ///
    /// The provided version times [`Step::run`] with a wall clock, outputs
    /// included; a backend overrides it to time the step alone (the CUDA
    /// backend uses events and downloads nothing).
    fn run_timed(&mut self, dims: &BTreeMap<String, i64>, repeats: usize) -> Result<Vec<f64>, StepError> {
        self.run(dims)?;
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let start = Instant::now();
            self.run(dims)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok(times)
    }
}

/// `impl Step` for a pointer type `$t` over `S` that forwards every method
/// to `**self`.
macro_rules! forward_step {
    ($($(#[$doc:meta])* $t:ty;)*) => {$(
        $(#[$doc])*
        impl<S: Step + ?Sized> Step for $t {
            fn runtime_dims(&self) -> Vec<String> {
                (**self).runtime_dims()
            }

            fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError> {
                (**self).bind(name, tensor)
            }

            fn run_selected(
                &mut self,
                dims: &BTreeMap<String, i64>,
                wanted: Option<&[&str]>,
            ) -> Result<HashMap<String, HostTensor>, StepError> {
                (**self).run_selected(dims, wanted)
            }

            fn reserve_rows(&mut self, name: &str, shape: &[usize], capacity: usize) -> Result<bool, StepError> {
                (**self).reserve_rows(name, shape, capacity)
            }

            fn release_rows(&mut self, name: &str) -> Result<(), StepError> {
                (**self).release_rows(name)
            }

            fn reserve(&mut self, dims: &BTreeMap<String, i64>) -> Result<(), StepError> {
                (**self).reserve(dims)
            }

            fn append_rows(&mut self, name: &str, rows: &str) -> Result<(), StepError> {
                (**self).append_rows(name, rows)
            }

            fn read_rows(&mut self, name: &str) -> Result<HostTensor, StepError> {
                (**self).read_rows(name)
            }

            fn run_timed(&mut self, dims: &BTreeMap<String, i64>, repeats: usize) -> Result<Vec<f64>, StepError> {
                (**self).run_timed(dims, repeats)
            }
        }
    )*};
}

forward_step! {
    /// A step borrowed mutably is a step (so `Session<&mut dyn Step>` works).
    &mut S;
    /// A boxed step is a step (so `Session<Box<dyn Step>>` works).
    Box<S>;
}

/// A step whose decode caches stay with the caller: [`Step::reserve_rows`]
/// answers `false`, so a [`crate::Session`] keeps them on the host and
/// binds them densely every step (the path of a backend that keeps no
/// caches). For checking the in-place path against it.
pub struct BoundCaches<S>(pub S);

impl<S: Step> Step for BoundCaches<S> {
    fn runtime_dims(&self) -> Vec<String> {
        self.0.runtime_dims()
    }

    fn bind(&mut self, name: &str, tensor: &HostTensor) -> Result<(), StepError> {
        self.0.bind(name, tensor)
    }

    fn run_selected(
        &mut self,
        dims: &BTreeMap<String, i64>,
        wanted: Option<&[&str]>,
    ) -> Result<HashMap<String, HostTensor>, StepError> {
        self.0.run_selected(dims, wanted)
    }

    fn reserve(&mut self, dims: &BTreeMap<String, i64>) -> Result<(), StepError> {
        self.0.reserve(dims)
    }

    fn run_timed(&mut self, dims: &BTreeMap<String, i64>, repeats: usize) -> Result<Vec<f64>, StepError> {
        self.0.run_timed(dims, repeats)
    }
}
