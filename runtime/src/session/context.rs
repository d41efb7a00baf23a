//! The context a [`Session`] decodes from: installing it (filled, given or
//! drawn), binding it to the step, and whether the session keeps a host
//! copy of its caches once the step holds them.

use super::{LayerBuffers, Session, SessionError};
use crate::random::draws;
use crate::rng::SplitMix64;
use crate::{HostTensor, Step};

/// A context ready to decode from.
#[derive(Clone, Debug, PartialEq)]
pub struct Context {
    /// Tokens in the context (`m_c`).
    pub len: usize,
    /// Per layer (in [`super::DecodeLayout::layers`] order): K and V,
    /// `[g, len, k]`. Empty where the session keeps no host copy
    /// ([`Session::keep_host_context`]): the step alone holds them.
    pub caches: Vec<[HostTensor; 2]>,
    /// The logits after the last context token (`vocab` values): the
    /// distribution of the first generated token.
    pub last_logits: Vec<f32>,
}

impl<S: Step> Session<S> {
    pub fn context(&self) -> Option<&Context> {
        self.context.as_ref()
    }

    /// Whether the session keeps a host copy (f32) of the context's caches
    /// once the step holds them. Kept (the default), [`Session::context`]
    /// returns them, and the session binds them again after
    /// [`Session::step_mut`]. Not kept, every context is bound as soon as
    /// it is installed, each layer's host copy dropped once the step holds
    /// it, and [`Session::random_context`] draws one layer at a time: a
    /// long context is held once, in the step (on a GPU, or in the CPU
    /// step's own storage dtype), instead of also in f32 on the host. Its
    /// [`Context::caches`] are then empty, and after [`Session::step_mut`]
    /// the context must be installed again. Turning it off drops the
    /// current context's copy now (binding it first).
    pub fn keep_host_context(&mut self, keep: bool) -> Result<(), SessionError> {
        self.keep_host = keep;
        match self.context.take() {
            Some(context) if !keep => self.install(context),
            context => {
                self.context = context;
                Ok(())
            }
        }
    }

    /// Makes `context` the current one (not bound); binds it now, dropping
    /// its host copy layer by layer, where the session keeps none. A failed
    /// bind leaves no context.
    pub(super) fn install(&mut self, mut context: Context) -> Result<(), SessionError> {
        self.context = None;
        if self.keep_host || self.held_by_step_alone(&context) {
            self.context_bound = self.context_bound && self.held_by_step_alone(&context);
            self.context = Some(context);
            return Ok(());
        }
        self.context_bound = false;
        let layers = self.layout.layers.clone();
        for (layer, kv) in layers.iter().zip(std::mem::take(&mut context.caches)) {
            self.bind_layer(layer, &kv)?;
        }
        self.context_bound = true;
        self.context = Some(context);
        Ok(())
    }

    /// Whether `context`'s caches were dropped from the host (it has none
    /// of the layout's layers): only the step holds them.
    fn held_by_step_alone(&self, context: &Context) -> bool {
        context.caches.is_empty() && !self.layout.layers.is_empty()
    }

    /// Binds the context caches `[g, len, k]` of every layer.
    pub(super) fn bind_context(&mut self, caches: &[[HostTensor; 2]]) -> Result<(), SessionError> {
        let layers = self.layout.layers.clone();
        for (layer, kv) in layers.iter().zip(caches) {
            self.bind_layer(layer, kv)?;
        }
        Ok(())
    }

    /// Binds one layer's context K and V.
    fn bind_layer(&mut self, layer: &LayerBuffers, kv: &[HostTensor; 2]) -> Result<(), SessionError> {
        for (name, tensor) in layer.context.iter().zip(kv) {
            self.step.bind(name, tensor)?;
        }
        Ok(())
    }

    /// Makes sure the step holds `context`'s caches before sampling from
    /// it: binds them from the host copy where the step may not.
    pub(super) fn bind_for_sampling(&mut self, context: &Context) -> Result<(), SessionError> {
        if self.context_bound {
            return Ok(());
        }
        if self.held_by_step_alone(context) {
            return Err(SessionError::Usage(
                "the step was handed out (Session::step_mut) since it took the context, and the session keeps no \
                 host copy of it (Session::keep_host_context): install the context again"
                    .into(),
            ));
        }
        self.bind_context(&context.caches)?;
        self.context_bound = true;
        Ok(())
    }

    /// Installs a context: per layer K and V `[g, len, k]`, and the logits
    /// after its last token.
    pub fn set_context(&mut self, caches: Vec<[HostTensor; 2]>, last_logits: Vec<f32>) -> Result<(), SessionError> {
        if caches.len() != self.layout.layers.len() {
            return Err(SessionError::Usage(format!(
                "{} context caches for {} layers",
                caches.len(),
                self.layout.layers.len()
            )));
        }
        let len = caches.first().and_then(|c| c[0].shape.get(1).copied()).unwrap_or(0);
        for (layer, kv) in self.layout.layers.iter().zip(&caches) {
            for (i, t) in kv.iter().enumerate() {
                let want = [layer.g, len, layer.k];
                if t.shape != want || t.data.len() != want.iter().product::<usize>() {
                    return Err(SessionError::Usage(format!(
                        "context cache `{}` has shape {:?}, expected {want:?}",
                        layer.context[i], t.shape
                    )));
                }
            }
        }
        if last_logits.len() != self.layout.vocab {
            return Err(SessionError::Usage(format!(
                "{} context logits for a vocabulary of {}",
                last_logits.len(),
                self.layout.vocab
            )));
        }
        self.install(Context { len, caches, last_logits })
    }

    /// Installs a random context of `len` tokens: caches `U[-1, 1)` and
    /// logits `4 U[-1, 1)`, deterministic for `seed` (for benchmarks, where
    /// stepping a long prompt would take too long). Where the session
    /// keeps no host copy ([`Session::keep_host_context`]), each layer is
    /// bound as it is drawn: the host holds one layer's at a time.
    pub fn random_context(&mut self, len: usize, seed: u64) -> Result<(), SessionError> {
        self.random_context_with(len, seed, |_| {})
    }

    /// [`Session::random_context`], telling `on_layers` after each layer
    /// how many are drawn (and, without a host copy, bound): a long
    /// context of a large model takes seconds.
    pub fn random_context_with(
        &mut self,
        len: usize,
        seed: u64,
        mut on_layers: impl FnMut(usize),
    ) -> Result<(), SessionError> {
        self.context = None;
        self.context_bound = false;
        let mut caches = Vec::new();
        for (done, layer) in self.layout.layers.clone().into_iter().enumerate() {
            // Split across the cores: the same values as one generator.
            let draw = |name: &str| HostTensor {
                shape: vec![layer.g, len, layer.k],
                data: draws(&SplitMix64::named(seed, name), layer.g * len * layer.k, SplitMix64::symmetric),
            };
            let kv = [draw(&layer.context[0]), draw(&layer.context[1])];
            if self.keep_host {
                caches.push(kv);
            } else {
                self.bind_layer(&layer, &kv)?;
            }
            on_layers(done + 1);
        }
        let mut rng = SplitMix64::named(seed, &self.layout.logits);
        let last_logits = (0..self.layout.vocab).map(|_| 4.0 * rng.symmetric()).collect();
        if self.keep_host {
            return self.set_context(caches, last_logits);
        }
        self.context = Some(Context { len, caches, last_logits });
        self.context_bound = true;
        Ok(())
    }
}
