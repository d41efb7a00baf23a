//! Shared-prefix parallel sampling over any [`Step`]: one context, `b`
//! samples decoded from it at once.
//!
//! ```text
//! Session::new(step, &manifest)       checks the decode interface (DecodeLayout)
//! session.bind_weights(&weights)      once
//! session.fill_context(&prompt_ids)   steps the graph over the prompt (b = 1)
//!     → logits of the last prompt position
//! session.sample(&options, on_step)   b samples, `steps` tokens each
//! ```
//!
//! **Filling the context.** The context cache of a layer, `[g, m_c, k]`, has
//! the layout of a one-sample decode cache `[1, g, m_d, k]`. So the context
//! is filled by stepping the compiled graph itself with `b = 1`, `m_c = 0`
//! over the prompt tokens one at a time (positions `0..L`), appending each
//! step's new K/V rows to a one-sample decode cache; afterwards that cache,
//! without its `b` axis, is the context cache (`m_c = L`). It takes `L`
//! steps at `b = 1`: meant for prompts of up to a few thousand tokens (a
//! prefill step is the way for long ones: [`Session::fill_context_prefill`]
//! runs the model compiled with `n > 1` new tokens per step over the
//! prompt `n` tokens at a time, appending each chunk's K/V rows to the
//! context). [`Session::random_context`] and [`Session::set_context`]
//! install a context without stepping. The session keeps a host copy of
//! the context's caches in f32 unless told not to
//! ([`Session::keep_host_context`]): without one, a context is bound as it
//! is installed and the step alone holds it.
//!
//! **Where the decode caches live.** When the backend keeps caches
//! ([`Step::reserve_rows`] returns true: CUDA and the CPU JIT do), each
//! decode cache is reserved once with room for all the rows to come and
//! every step's new rows are appended inside the backend
//! ([`Step::append_rows`]): a step uploads only the token ids and
//! positions. Otherwise the session keeps them on the host ([`KvCache`])
//! and binds the dense caches every step.
//!
//! **Sampling.** The fill's last logits are the distribution of the first
//! generated token. [`Session::sample`] draws `b` different first tokens
//! from them (one generator per sample), then runs `steps` decode steps:
//! step `s` feeds every sample's token `s` at position `L + s` with
//! `m_d = s` decoded rows, appends the new K/V rows to the per-sample decode
//! caches `[b, g, m_d, k]` and draws token `s + 1` from the step's logits.
//! Each sample gets `steps` tokens; the last step's logits (the
//! distribution of token `steps`) are returned on request. Weights and the
//! context caches are bound once; each step binds only the token ids and
//! positions (and the decode caches, when the backend keeps none).

mod cache;
mod context;
mod layout;
mod sampler;

pub use cache::KvCache;
pub use context::Context;
pub use layout::{ContextOnHost, DecodeLayout, LayerBuffers, PrefillChunks, MAX_POSITION};
pub use sampler::{sample_rng, sample_token, sample_tokens, SampleError};

use crate::manifest::Manifest;
use crate::rng::SplitMix64;
use crate::{HostTensor, Step, StepError};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Each message says its cause; none is also given as the `source()`, so
/// an error chain (`anyhow`'s `{:#}`) words each error once.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The manifest is not a single-level decode step this session can drive.
    #[error("not a decode step this session can drive: {0}")]
    Layout(String),
    #[error(transparent)]
    Step(#[from] StepError),
    /// The step returned something other than the manifest promises.
    #[error("step output `{name}`: {message}")]
    Output { name: String, message: String },
    #[error("sampling sample {sample} at step {step}: {error}")]
    Sample { sample: usize, step: usize, error: SampleError },
    #[error("{0}")]
    Usage(String),
}

/// What [`Session::sample`] does.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOptions {
    /// `b`: samples decoded together.
    pub samples: usize,
    /// Tokens generated per sample (= decode steps run).
    pub steps: usize,
    /// 0 for greedy.
    pub temperature: f32,
    pub seed: u64,
    /// Return the last step's logits `[b, vocab]`.
    pub keep_last_logits: bool,
}

/// Progress of one decode step, for the `on_step` callback.
#[derive(Clone, Debug)]
pub struct StepReport<'a> {
    /// 0-based step index (= `m_d` during the step).
    pub step: usize,
    /// The token each sample fed into this step.
    pub fed: &'a [u32],
    /// Wall time of the step (bind + run + outputs), milliseconds.
    pub ms: f64,
}

/// What [`Session::sample`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOutput {
    /// Per sample, the generated token ids (`steps` each).
    pub tokens: Vec<Vec<u32>>,
    /// Per step, wall milliseconds of bind + run + outputs.
    pub step_ms: Vec<f64>,
    /// The last step's logits `[b, vocab]`, when asked for.
    pub last_logits: Option<HostTensor>,
    /// Wall milliseconds before the first step: the context bound for
    /// sampling, the decode caches made, the step readied for `b` samples
    /// ([`Step::reserve`]: on the CPU, the plan a run at `b` takes
    /// JIT-compiled at its first use), the first tokens drawn. A one-time
    /// cost that rates of tokens a second leave out.
    pub setup_ms: f64,
}

impl SampleOutput {
    /// Generated tokens (every sample's) a second of `wall_s`, the wall
    /// seconds of the [`Session::sample`] call, its set-up left out
    /// ([`SampleOutput::setup_ms`]); 0 where no time is left.
    pub fn tokens_per_s(&self, wall_s: f64) -> f64 {
        let tokens: usize = self.tokens.iter().map(Vec::len).sum();
        let seconds = wall_s - self.setup_ms / 1e3;
        if seconds > 0.0 {
            tokens as f64 / seconds
        } else {
            0.0
        }
    }
}

/// The decode caches of one fill or sampling run.
enum Caches {
    /// Kept by the session, bound every step.
    Host(Vec<[KvCache; 2]>),
    /// Kept by the backend ([`Step::reserve_rows`]); `len` rows so far.
    Backend { len: usize },
}

impl Caches {
    fn len(&self) -> usize {
        match self {
            Caches::Host(c) => c.first().map_or(0, |c| c[0].len()),
            Caches::Backend { len } => *len,
        }
    }
}

/// The decode loop over a step `S` (any backend; `&mut dyn Step` works too).
pub struct Session<S: Step> {
    step: S,
    layout: DecodeLayout,
    context: Option<Context>,
    /// Whether the step holds the current context's caches.
    context_bound: bool,
    /// Whether the session keeps a host copy of each context's caches
    /// ([`Session::keep_host_context`]).
    keep_host: bool,
}

fn dims(b: usize, m_c: usize, m_d: usize) -> BTreeMap<String, i64> {
    BTreeMap::from([("b".to_string(), b as i64), ("m_c".to_string(), m_c as i64), ("m_d".to_string(), m_d as i64)])
}

/// One token per sample (see [`sample_tokens`]).
fn draw(
    rows: &[f32],
    vocab: usize,
    shared: bool,
    rngs: &mut [SplitMix64],
    temperature: f32,
    step: usize,
) -> Result<Vec<u32>, SessionError> {
    sample_tokens(rows, vocab, shared, temperature, rngs).map_err(|(sample, error)| SessionError::Sample {
        sample,
        step,
        error,
    })
}

/// `ctx` (`[g, m, k]`) followed by the one-sample rows `rows`
/// (`[1, g, r, k]`): `[g, m + r, k]`.
fn append_context(ctx: &HostTensor, rows: &HostTensor, g: usize, k: usize) -> HostTensor {
    append_first_rows(ctx, rows, g, k, rows.shape.get(2).copied().unwrap_or(0))
}

/// [`append_context`] of the first `take` of each group's rows (a padded
/// prefill run's real tokens).
fn append_first_rows(ctx: &HostTensor, rows: &HostTensor, g: usize, k: usize, take: usize) -> HostTensor {
    let m = ctx.shape.get(1).copied().unwrap_or(0);
    let r = rows.shape.get(2).copied().unwrap_or(0);
    let take = take.min(r);
    let mut data = Vec::with_capacity(g * (m + take) * k);
    for gi in 0..g {
        data.extend_from_slice(&ctx.data[gi * m * k..(gi + 1) * m * k]);
        data.extend_from_slice(&rows.data[gi * r * k..(gi * r + take) * k]);
    }
    HostTensor { shape: vec![g, m + take, k], data }
}

/// A `[1, len]` tensor of integers (one sample's tokens or positions).
fn row(values: impl Iterator<Item = usize>) -> HostTensor {
    let data: Vec<f32> = values.map(|v| v as f32).collect();
    HostTensor { shape: vec![1, data.len()], data }
}

/// A `[rows, 1]` tensor of integers.
fn column(values: impl Iterator<Item = usize>) -> HostTensor {
    let data: Vec<f32> = values.map(|v| v as f32).collect();
    HostTensor { shape: vec![data.len(), 1], data }
}

impl<S: Step> Session<S> {
    /// A session over `step`, which runs the step that `manifest` describes.
    pub fn new(step: S, manifest: &Manifest) -> Result<Self, SessionError> {
        let layout = DecodeLayout::from_manifest(manifest)?;
        let mut step_dims = step.runtime_dims();
        step_dims.sort();
        let mut manifest_dims = manifest.dims.runtime.clone();
        manifest_dims.sort();
        if step_dims != manifest_dims {
            return Err(SessionError::Layout(format!(
                "the step takes runtime dims {step_dims:?} but the manifest has {manifest_dims:?}"
            )));
        }
        if layout.n != 1 {
            return Err(SessionError::Layout(format!(
                "this step feeds n = {} tokens per sample: it is a prefill step (`bifurc run --prefill`, `Session::fill_context_prefill`), not a decode step",
                layout.n
            )));
        }
        Ok(Session { step, layout, context: None, context_bound: false, keep_host: true })
    }

    pub fn layout(&self) -> &DecodeLayout {
        &self.layout
    }

    pub fn step(&self) -> &S {
        &self.step
    }

    /// The step, to bind or run it directly (the session re-binds the
    /// context from its host copy before its next [`Session::sample`];
    /// without one, [`Session::keep_host_context`], the context must be
    /// installed again).
    pub fn step_mut(&mut self) -> &mut S {
        self.context_bound = false;
        &mut self.step
    }

    pub fn into_step(self) -> S {
        self.step
    }

    /// Binds every weight of the layout from `weights` (by manifest name).
    pub fn bind_weights(&mut self, weights: &HashMap<String, HostTensor>) -> Result<(), SessionError> {
        for name in &self.layout.weights {
            let tensor =
                weights.get(name).ok_or_else(|| SessionError::Usage(format!("no tensor for weight `{name}`")))?;
            self.step.bind(name, tensor)?;
        }
        Ok(())
    }

    fn check_output<'a>(
        outputs: &'a HashMap<String, HostTensor>,
        name: &str,
        shape: &[usize],
    ) -> Result<&'a HostTensor, SessionError> {
        let t = outputs.get(name).ok_or_else(|| SessionError::Output {
            name: name.to_string(),
            message: "missing from the step's outputs".into(),
        })?;
        if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
            return Err(SessionError::Output {
                name: name.to_string(),
                message: format!("shape {:?} (data {}), expected {shape:?}", t.shape, t.data.len()),
            });
        }
        Ok(t)
    }

    /// Runs one decode step at `(b, m_c, m_d)` with `tokens` at `positions`
    /// and the decode `caches`; appends the new rows to the caches and
    /// returns the logits `[b, 1, vocab]`.
    fn decode_step(
        &mut self,
        tokens: &[u32],
        positions: usize,
        m_c: usize,
        caches: &mut Caches,
    ) -> Result<HostTensor, SessionError> {
        let b = tokens.len();
        let m_d = caches.len();
        for &t in tokens {
            if t as usize >= self.layout.vocab {
                return Err(SessionError::Usage(format!(
                    "token id {t} is outside the vocabulary (0..{})",
                    self.layout.vocab
                )));
            }
        }
        self.step.bind(&self.layout.token_ids, &column(tokens.iter().map(|&t| t as usize)))?;
        self.step.bind(&self.layout.positions, &column(std::iter::repeat_n(positions, b)))?;
        if let Caches::Host(host) = caches {
            for (layer, kv) in self.layout.layers.iter().zip(host.iter()) {
                for (name, cache) in layer.decode.iter().zip(kv) {
                    self.step.bind(name, &cache.packed())?;
                }
            }
        }
        let mut outputs = match caches {
            Caches::Host(host) => {
                let outputs = self.step.run(&dims(b, m_c, m_d))?;
                for (layer, kv) in self.layout.layers.iter().zip(host.iter_mut()) {
                    for (name, cache) in layer.new.iter().zip(kv) {
                        let rows = Self::check_output(&outputs, name, &[b, layer.g, 1, layer.k])?;
                        cache.append(rows).map_err(|message| SessionError::Output { name: name.clone(), message })?;
                    }
                }
                outputs
            }
            Caches::Backend { len } => {
                // The new rows stay in the backend, appended there (which
                // checks their shape); only the logits come back.
                let outputs = self.step.run_for(&dims(b, m_c, m_d), &[self.layout.logits.as_str()])?;
                for layer in &self.layout.layers {
                    for (cache, name) in layer.decode.iter().zip(&layer.new) {
                        self.step.append_rows(cache, name)?;
                    }
                }
                *len += 1;
                outputs
            }
        };
        Self::check_output(&outputs, &self.layout.logits, &[b, 1, self.layout.vocab])?;
        outputs.remove(&self.layout.logits).ok_or_else(|| SessionError::Usage("logits vanished".into()))
    }

    /// Empty decode caches for `b` samples with room for `capacity` rows:
    /// kept by the backend when it can, else by the session.
    fn new_caches(&mut self, b: usize, capacity: usize) -> Result<Caches, SessionError> {
        // The last run's, if the backend still keeps them: otherwise these
        // would get room for as many rows as those had (all along `m_d`
        // share one capacity), after a long prompt's fill b times its
        // context.
        self.release_decode_caches()?;
        let mut kept = Vec::new();
        for layer in &self.layout.layers {
            for name in &layer.decode {
                kept.push(self.step.reserve_rows(name, &[b, layer.g, 0, layer.k], capacity)?);
            }
        }
        if kept.iter().all(|&k| k) && !kept.is_empty() {
            return Ok(Caches::Backend { len: 0 });
        }
        if kept.iter().any(|&k| k) {
            return Err(SessionError::Usage("the backend kept some decode caches but not others".into()));
        }
        Ok(Caches::Host(
            self.layout
                .layers
                .iter()
                .map(|l| [KvCache::new(b, l.g, l.k, capacity), KvCache::new(b, l.g, l.k, capacity)])
                .collect(),
        ))
    }

    /// Lets the backend drop every decode cache it keeps
    /// ([`Step::release_rows`]).
    fn release_decode_caches(&mut self) -> Result<(), SessionError> {
        for layer in &self.layout.layers {
            for name in &layer.decode {
                self.step.release_rows(name)?;
            }
        }
        Ok(())
    }

    /// Fills the context by stepping the graph over `prompt` (see the module
    /// docs) and returns the logits after its last token (`vocab` values).
    pub fn fill_context(&mut self, prompt: &[u32]) -> Result<Vec<f32>, SessionError> {
        self.fill_context_with(prompt, |_| {})
    }

    /// [`Session::fill_context`], telling `on_tokens` after each step how
    /// many of the prompt's tokens are in the context so far (for progress:
    /// a long prompt on a large model takes minutes).
    pub fn fill_context_with(
        &mut self,
        prompt: &[u32],
        mut on_tokens: impl FnMut(usize),
    ) -> Result<Vec<f32>, SessionError> {
        if prompt.is_empty() {
            return Err(SessionError::Usage("the prompt is empty".into()));
        }
        self.layout.check_positions(prompt.len())?;
        self.context = None;
        self.context_bound = false;
        let empty = self.empty_context();
        let (caches, last_logits) = self.step_prompt(empty, prompt, 0, &mut on_tokens)?;
        self.install(Context { len: prompt.len(), caches, last_logits: last_logits.clone() })?;
        Ok(last_logits)
    }

    /// Fills the context with a prefill step (`prefill`, whose manifest
    /// gives `layout`: the same model compiled with `n` > 1 new tokens per
    /// step, weights already bound): `n` prompt tokens per run at `b = 1`,
    /// each chunk attending to the context so far and, causally, to itself;
    /// its new K/V rows extend the context (appended in place when the
    /// prefill step keeps caches, [`Step::reserve_rows`]; else kept here
    /// and bound every chunk). The last `len mod n` tokens take one more
    /// run padded to `n` tokens, whose padding's rows and logits are
    /// dropped, or, fewer than a quarter of a chunk, are stepped with the
    /// decode step as in [`Session::fill_context`]
    /// ([`DecodeLayout::prefill_chunks`]). Returns the logits after the
    /// last token, and gives the same context (to f32 rounding) as
    /// [`Session::fill_context`] in about `len / n` runs instead of `len`.
    pub fn fill_context_prefill<P: Step + ?Sized>(
        &mut self,
        prefill: &mut P,
        layout: &DecodeLayout,
        prompt: &[u32],
    ) -> Result<Vec<f32>, SessionError> {
        self.fill_context_prefill_with(prefill, layout, prompt, |_| {})
    }

    /// [`Session::fill_context_prefill`], telling `on_tokens` after each
    /// run how many of the prompt's tokens are in the context so far.
    pub fn fill_context_prefill_with<P: Step + ?Sized>(
        &mut self,
        prefill: &mut P,
        layout: &DecodeLayout,
        prompt: &[u32],
        mut on_tokens: impl FnMut(usize),
    ) -> Result<Vec<f32>, SessionError> {
        if prompt.is_empty() {
            return Err(SessionError::Usage("the prompt is empty".into()));
        }
        self.layout.check_positions(prompt.len())?;
        self.layout.check_prefill(layout)?;
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= self.layout.vocab) {
            return Err(SessionError::Usage(format!(
                "token id {t} is outside the vocabulary (0..{})",
                self.layout.vocab
            )));
        }
        self.context = None;
        self.context_bound = false;
        let n = layout.n;
        let mut caches = self.empty_context();
        let mut last_logits = Vec::new();
        // The decode caches of the prefill step stay empty (m_d = 0).
        for l in &layout.layers {
            for name in &l.decode {
                prefill.bind(name, &HostTensor::zeros(vec![1, l.g, 0, l.k]))?;
            }
        }
        let chunks = layout.prefill_chunks(prompt.len());
        let (full, last) = (chunks.whole, chunks.last);
        // The context grows inside the prefill step when it keeps caches
        // (each chunk's rows appended in place), else here (re-bound per chunk).
        let mut kept = Vec::new();
        for l in &layout.layers {
            for name in &l.context {
                kept.push(prefill.reserve_rows(name, &[l.g, 0, l.k], full)?);
            }
        }
        let kept = kept.iter().all(|&k| k);
        if full + chunks.padded > 0 {
            // Room for the last run, over the context of all the others.
            prefill.reserve(&dims(1, last, 0))?;
        }
        // Whole chunks of n, then the rest in one more run padded to n:
        // token 0 at the positions after the real tokens' (held at the
        // model's last position, in a table of learned positions). Under
        // the causal mask no real token sees the padding; its rows and
        // logits are dropped. The padded run reads the context as the
        // chunks left it (kept in the step, or bound here), and its real
        // rows join the context below, once it is read back.
        let padded = (chunks.padded > 0).then_some((full, chunks.padded));
        let runs = (0..full).step_by(n.max(1)).map(|start| (start, n)).chain(padded);
        let last_position = layout.last_position();
        let mut rest_rows = Vec::new();
        for (start, real) in runs {
            if !kept {
                for (l, kv) in layout.layers.iter().zip(&caches) {
                    for (name, t) in l.context.iter().zip(kv) {
                        prefill.bind(name, t)?;
                    }
                }
            }
            let ids = prompt[start..start + real].iter().map(|&t| t as usize).chain(std::iter::repeat_n(0, n - real));
            prefill.bind(&layout.token_ids, &row(ids))?;
            prefill.bind(&layout.positions, &row((start..start + n).map(|p| p.min(last_position))))?;
            let outputs = prefill.run(&dims(1, start, 0))?;
            for (l, kv) in layout.layers.iter().zip(caches.iter_mut()) {
                for ((name, ctx), cache) in l.new.iter().zip(&l.context).zip(kv.iter_mut()) {
                    let rows = Self::check_output(&outputs, name, &[1, l.g, n, l.k])?;
                    if real < n {
                        rest_rows.push(rows.clone());
                    } else if kept {
                        prefill.append_rows(ctx, name)?;
                    } else {
                        *cache = append_context(cache, rows, l.g, l.k);
                    }
                }
            }
            let logits = Self::check_output(&outputs, &layout.logits, &[1, n, layout.vocab])?;
            last_logits = logits.data[(real - 1) * layout.vocab..real * layout.vocab].to_vec();
            on_tokens(start + real);
        }
        if kept {
            for (l, kv) in layout.layers.iter().zip(caches.iter_mut()) {
                for (name, cache) in l.context.iter().zip(kv.iter_mut()) {
                    let t = prefill.read_rows(name)?;
                    if t.shape != [l.g, full, l.k] {
                        return Err(SessionError::Output {
                            name: name.clone(),
                            message: format!("read back with shape {:?}, expected [{}, {full}, {}]", t.shape, l.g, l.k),
                        });
                    }
                    *cache = t;
                    // Read back: the prefill step need not hold it too.
                    prefill.release_rows(name)?;
                }
            }
        }
        if !rest_rows.is_empty() {
            let mut rows = rest_rows.iter();
            for (l, kv) in layout.layers.iter().zip(caches.iter_mut()) {
                for (cache, new) in kv.iter_mut().zip(rows.by_ref()) {
                    *cache = append_first_rows(cache, new, l.g, l.k, chunks.padded);
                }
            }
        }
        let done = full + chunks.padded;
        if done < prompt.len() {
            let (rest, logits) = self.step_prompt(caches, &prompt[done..], done, &mut on_tokens)?;
            caches = rest;
            last_logits = logits;
        }
        self.install(Context { len: prompt.len(), caches, last_logits: last_logits.clone() })?;
        Ok(last_logits)
    }

    /// Per layer, empty K and V context caches `[g, 0, k]`.
    fn empty_context(&self) -> Vec<[HostTensor; 2]> {
        self.layout
            .layers
            .iter()
            .map(|l| [HostTensor::zeros(vec![l.g, 0, l.k]), HostTensor::zeros(vec![l.g, 0, l.k])])
            .collect()
    }

    /// Steps `tokens` at positions `start..` with `b = 1` over the context
    /// `prefix` (`start` tokens, bound as the context caches), collecting
    /// their K/V rows in a one-sample decode cache; returns `prefix` extended
    /// by those rows and the logits after the last token. `on_tokens` is
    /// told the context's length after each step.
    fn step_prompt(
        &mut self,
        prefix: Vec<[HostTensor; 2]>,
        tokens: &[u32],
        start: usize,
        on_tokens: &mut dyn FnMut(usize),
    ) -> Result<(Vec<[HostTensor; 2]>, Vec<f32>), SessionError> {
        self.bind_context(&prefix)?;
        let mut caches = self.new_caches(1, tokens.len())?;
        self.step.reserve(&dims(1, start, tokens.len().saturating_sub(1)))?;
        let mut logits = HostTensor::default();
        for (i, &token) in tokens.iter().enumerate() {
            logits = self.decode_step(&[token], start + i, start, &mut caches)?;
            on_tokens(start + i + 1);
        }
        let mut out = Vec::with_capacity(prefix.len());
        for (l, (layer, kv)) in self.layout.layers.clone().iter().zip(prefix).enumerate() {
            let mut both = Vec::with_capacity(2);
            for (i, ctx) in kv.into_iter().enumerate() {
                // The one-sample decode rows [1, g, r, k].
                let rows = match &caches {
                    Caches::Host(host) => host[l][i].packed(),
                    Caches::Backend { .. } => self.step.read_rows(&layer.decode[i])?,
                };
                if rows.shape != [1, layer.g, tokens.len(), layer.k] {
                    return Err(SessionError::Output {
                        name: layer.decode[i].clone(),
                        message: format!("read back with shape {:?}", rows.shape),
                    });
                }
                both.push(append_context(&ctx, &rows, layer.g, layer.k));
            }
            let [k, v]: [HostTensor; 2] =
                both.try_into().map_err(|_| SessionError::Usage("a layer without K and V".into()))?;
            out.push([k, v]);
        }
        // Read: the one-sample caches (a row per prompt token) go before
        // the context they became is bound.
        self.release_decode_caches()?;
        Ok((out, logits.data))
    }

    /// Decodes `options.samples` samples of `options.steps` tokens from the
    /// context (see the module docs); `on_step` sees every step.
    pub fn sample(
        &mut self,
        options: &SampleOptions,
        mut on_step: impl FnMut(&StepReport),
    ) -> Result<SampleOutput, SessionError> {
        let b = options.samples;
        if b == 0 {
            return Err(SessionError::Usage("at least one sample is needed".into()));
        }
        let context = self.context.take().ok_or_else(|| {
            SessionError::Usage("no context: call fill_context (or set_context / random_context) first".into())
        })?;
        // The last step feeds position `len + steps - 1`.
        let result = match self.layout.check_positions(context.len + options.steps) {
            Ok(()) => self.sample_from(&context, options, &mut on_step),
            Err(e) => Err(e),
        };
        self.context = Some(context);
        result
    }

    fn sample_from(
        &mut self,
        context: &Context,
        options: &SampleOptions,
        on_step: &mut dyn FnMut(&StepReport),
    ) -> Result<SampleOutput, SessionError> {
        let (b, vocab, temperature) = (options.samples, self.layout.vocab, options.temperature);
        let mut rngs: Vec<SplitMix64> = (0..b).map(|s| sample_rng(options.seed, s)).collect();
        let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(options.steps); b];
        let mut step_ms = Vec::with_capacity(options.steps);
        let mut last_logits = None;
        let start = Instant::now();
        if options.steps == 0 {
            return Ok(SampleOutput { tokens, step_ms, last_logits, setup_ms: 0.0 });
        }
        self.bind_for_sampling(context)?;
        // Every sample draws its first token from the same context logits
        // (each with its own generator).
        let mut current = draw(&context.last_logits, vocab, true, &mut rngs, temperature, 0)?;
        let mut caches = self.new_caches(b, options.steps)?;
        // Room for the last step (m_d = steps - 1), so that no step allocates.
        self.step.reserve(&dims(b, context.len, options.steps - 1))?;
        let setup_ms = start.elapsed().as_secs_f64() * 1e3;
        for step in 0..options.steps {
            for (s, t) in current.iter().enumerate() {
                tokens[s].push(*t);
            }
            let start = Instant::now();
            let logits = self.decode_step(&current, context.len + step, context.len, &mut caches);
            // A failed step leaves the decode caches bound in an unknown
            // state; the context caches are still bound.
            let logits = logits?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            step_ms.push(ms);
            on_step(&StepReport { step, fed: &current, ms });
            if step + 1 < options.steps {
                current = draw(&logits.data, vocab, false, &mut rngs, temperature, step + 1)?;
            } else if options.keep_last_logits {
                last_logits = Some(HostTensor { shape: vec![b, self.layout.vocab], data: logits.data });
            }
        }
        Ok(SampleOutput { tokens, step_ms, last_logits, setup_ms })
    }
}
